"""The Open Inference Protocol's generated gRPC stubs, as tritonclient ships them.

`pb` (service_pb2: the messages), `service_pb2_grpc` (the GRPCInferenceService stub and
servicer) and `model_config_pb2` are tritonclient's maintained, generated modules. Importing
them the usual way (`from tritonclient.grpc import service_pb2`) first runs the package's
`__init__`, which loads tritonclient's whole client and numpy with it, neither of which a
device server uses. So when `tritonclient.grpc` is not imported yet, this module registers the
package without running its `__init__`, and runs it on first use of anything else in it: a later
`tritonclient.grpc.InferenceServerClient` (or `import tritonclient.grpc.aio`) works as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

__all__ = ["pb", "service_pb2_grpc", "model_config_pb2", "STUB_MODULES"]

_PACKAGE = "tritonclient.grpc"
STUB_MODULES = ("service_pb2", "service_pb2_grpc", "model_config_pb2")


def _register_package_lazily() -> None:
    """Put `tritonclient.grpc` in sys.modules with its body deferred to first attribute use.

    The body runs once, under a lock; when it fails, every later use raises that same error
    (the package is left half-initialised, so nothing in it can be trusted).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.loader is None:
        raise ImportError(f"{_PACKAGE} is not installed (pip install tritonclient[grpc])")
    package = importlib.util.module_from_spec(spec)
    lock = threading.Lock()
    state: dict[str, object] = {"loaded": False, "error": None}

    def __getattr__(name: str) -> object:
        # The import system probes for submodules before importing them: let it import the stubs.
        if name in STUB_MODULES or name.startswith("__"):
            raise AttributeError(f"module {_PACKAGE!r} has no attribute {name!r}")
        with lock:
            if state["error"] is None and not state["loaded"]:
                try:
                    spec.loader.exec_module(package)  # the real __init__: the client, numpy, ...
                except BaseException as exc:
                    state["error"] = exc
                else:
                    state["loaded"] = True
            error = state["error"]
        if error is not None:
            raise error
        try:
            return package.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {_PACKAGE!r} has no attribute {name!r}") from None

    package.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules[_PACKAGE] = package
    parent = importlib.import_module("tritonclient")
    setattr(parent, "grpc", package)


if _PACKAGE not in sys.modules:
    _register_package_lazily()

pb: types.ModuleType = importlib.import_module(f"{_PACKAGE}.service_pb2")
service_pb2_grpc: types.ModuleType = importlib.import_module(f"{_PACKAGE}.service_pb2_grpc")
model_config_pb2: types.ModuleType = importlib.import_module(f"{_PACKAGE}.model_config_pb2")
