"""Fixtures shared by the runtime tests: a tiny bundle and one device server per student."""

from __future__ import annotations

import pytest

from runtime_testing import device_servers, make_bundle

# Modules may set these to give their tests another bundle.
FEATURE_SIZES = (3, 2, 4, 3)
SHAPE = (1, 4, 4)


@pytest.fixture(scope="module")
def bundle(request, tmp_path_factory):
    """A bundle of tiny linear students (the module's FEATURE_SIZES and SHAPE, if it sets them)."""
    sizes = getattr(request.module, "FEATURE_SIZES", FEATURE_SIZES)
    shape = getattr(request.module, "SHAPE", SHAPE)
    return make_bundle(tmp_path_factory.mktemp("bundle") / "b", feature_sizes=sizes, input_shape=shape)


@pytest.fixture(scope="module")
def devices(bundle):
    """One started DeviceServer per student of `bundle`, on loopback."""
    with device_servers(bundle) as servers:
        yield servers
