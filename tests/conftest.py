"""Fixtures shared by the runtime, fleet and simulation tests.

`bundle` is a bundle of tiny linear students, built once per module; a module changes its
students by setting FEATURE_SIZES (features per student) or SHAPE (the input, C, H, W).
`fresh_bundle` is the same bundle built for one test, to change its files. `devices` serves
each student of `bundle` on a loopback port; `certs` holds test certificates.
"""

from __future__ import annotations

import pytest

from runtime_testing import device_servers, make_bundle, make_certificates

FEATURE_SIZES = (3, 2, 4, 3)
SHAPE = (1, 4, 4)


def _build(request, directory):
    sizes = getattr(request.module, "FEATURE_SIZES", FEATURE_SIZES)
    shape = getattr(request.module, "SHAPE", SHAPE)
    return make_bundle(directory, feature_sizes=sizes, input_shape=shape)


@pytest.fixture(scope="module")
def bundle(request, tmp_path_factory):
    return _build(request, tmp_path_factory.mktemp("bundle") / "b")


@pytest.fixture
def fresh_bundle(request, tmp_path):
    return _build(request, tmp_path / "bundle")


@pytest.fixture(scope="module")
def devices(bundle):
    """One started DeviceServer per student of `bundle`, on loopback."""
    with device_servers(bundle) as servers:
        yield servers


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A CA, server and client certificates, and bad ones (see runtime_testing.make_certificates)."""
    return make_certificates(tmp_path_factory.mktemp("certs"))
