"""One ONNX model run through ONNX Runtime's C API (via ctypes): no numpy, no Python binding.

A device server only moves bytes: the request's raw tensor contents go straight into an
`OrtValue` and the output's bytes straight into the reply. ONNX Runtime's Python binding needs
numpy and a 36 MB extension module for that; its wheel also ships the plain C library
(`libonnxruntime.so`), which this module drives directly. A device process then holds about
14 MB less (README, "Device memory").

The C API is a table of function pointers (`OrtApi`) that ONNX Runtime only ever appends to, so
a member's index never changes between releases. The indices used here are those of
`onnxruntime_c_api.h`; `tests/test_ort_capi.py` checks this module against the Python binding.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib.util
import math
import os
import threading
from ctypes import POINTER, c_char_p, c_int, c_int64, c_size_t, c_uint32, c_void_p
from pathlib import Path
from typing import Mapping, Sequence

from nonn.artifacts import ArtifactError
from nonn.runtime.checks import at_least
from nonn.runtime.codec import RawTensor
from nonn.runtime.datatypes import DATATYPES, TensorError, TensorSpec, datatype_from_element, itemsize

__all__ = ["ModelIntegrityError", "OrtError", "OrtLibraryError", "CApiModel", "read_verified", "library_path"]

# The API version asked for: every member used below exists since ONNX Runtime 1.8.
_API_VERSION = 8
_ORT_LOGGING_LEVEL_ERROR = 3
_ORT_SEQUENTIAL = 0
_ORT_ENABLE_ALL = 99
_ORT_ARENA_ALLOCATOR = 1
_ORT_MEM_TYPE_DEFAULT = 0

_Status = c_void_p
_Out = POINTER(c_void_p)
# OrtApi members used here: (index in the table, return type, argument types).
_MEMBERS = {
    "GetErrorMessage": (2, c_char_p, [c_void_p]),
    "CreateEnv": (3, _Status, [c_int, c_char_p, _Out]),
    "CreateSessionFromArray": (8, _Status, [c_void_p, c_char_p, c_size_t, c_void_p, _Out]),
    "Run": (9, _Status, [c_void_p, c_void_p, POINTER(c_char_p), POINTER(c_void_p), c_size_t, POINTER(c_char_p), c_size_t, POINTER(c_void_p)]),
    "CreateSessionOptions": (10, _Status, [_Out]),
    "SetSessionExecutionMode": (13, _Status, [c_void_p, c_int]),
    "DisableMemPattern": (17, _Status, [c_void_p]),
    "DisableCpuMemArena": (19, _Status, [c_void_p]),
    "SetSessionGraphOptimizationLevel": (23, _Status, [c_void_p, c_int]),
    "SetIntraOpNumThreads": (24, _Status, [c_void_p, c_int]),
    "SetInterOpNumThreads": (25, _Status, [c_void_p, c_int]),
    "SessionGetInputCount": (30, _Status, [c_void_p, POINTER(c_size_t)]),
    "SessionGetOutputCount": (31, _Status, [c_void_p, POINTER(c_size_t)]),
    "SessionGetInputTypeInfo": (33, _Status, [c_void_p, c_size_t, _Out]),
    "SessionGetOutputTypeInfo": (34, _Status, [c_void_p, c_size_t, _Out]),
    "SessionGetInputName": (36, _Status, [c_void_p, c_size_t, c_void_p, _Out]),
    "SessionGetOutputName": (37, _Status, [c_void_p, c_size_t, c_void_p, _Out]),
    "CreateTensorWithDataAsOrtValue": (49, _Status, [c_void_p, c_char_p, c_size_t, POINTER(c_int64), c_size_t, c_int, _Out]),
    "GetTensorMutableData": (51, _Status, [c_void_p, _Out]),
    "CastTypeInfoToTensorInfo": (55, _Status, [c_void_p, _Out]),
    "GetTensorElementType": (60, _Status, [c_void_p, POINTER(c_int)]),
    "GetDimensionsCount": (61, _Status, [c_void_p, POINTER(c_size_t)]),
    "GetDimensions": (62, _Status, [c_void_p, POINTER(c_int64), c_size_t]),
    "GetTensorTypeAndShape": (65, _Status, [c_void_p, _Out]),
    "CreateCpuMemoryInfo": (69, _Status, [c_int, c_int, _Out]),
    "AllocatorFree": (76, _Status, [c_void_p, c_void_p]),
    "GetAllocatorWithDefaultOptions": (78, _Status, [_Out]),
    "ReleaseEnv": (92, None, [c_void_p]),
    "ReleaseStatus": (93, None, [c_void_p]),
    "ReleaseMemoryInfo": (94, None, [c_void_p]),
    "ReleaseSession": (95, None, [c_void_p]),
    "ReleaseValue": (96, None, [c_void_p]),
    "ReleaseTypeInfo": (98, None, [c_void_p]),
    "ReleaseTensorTypeAndShapeInfo": (99, None, [c_void_p]),
    "ReleaseSessionOptions": (100, None, [c_void_p]),
    "AddSessionConfigEntry": (130, _Status, [c_void_p, c_char_p, c_char_p]),
}


class ModelIntegrityError(ArtifactError):
    """The model file's sha256 does not match the manifest: it was modified or replaced."""


class OrtError(RuntimeError):
    """ONNX Runtime reported an error (its message, and the call that failed)."""


class OrtLibraryError(OSError):
    """ONNX Runtime's C library is missing, cannot be loaded, or is too old."""


def read_verified(path: str | os.PathLike[str], expected_sha256: str | None) -> tuple[bytes, str]:
    """The model file's bytes and sha256, refusing a mismatch with `expected_sha256`.

    The hash is taken over exactly the bytes the session is built from, so a file swapped
    between the check and the load cannot slip through.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ONNX model file not found")
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha256 != expected_sha256.strip().lower():
        raise ModelIntegrityError(
            f"{path}: sha256 is {sha256} but the manifest expects {expected_sha256.strip().lower()}; "
            "the model was modified or replaced, refusing to load it"
        )
    return data, sha256


def library_path() -> Path:
    """ONNX Runtime's C library: $NONN_ORT_LIBRARY, else the one in the onnxruntime wheel."""
    override = os.environ.get("NONN_ORT_LIBRARY")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("onnxruntime")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise OrtLibraryError("the onnxruntime package is not installed; set NONN_ORT_LIBRARY to libonnxruntime.so")
    found = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "capi", "libonnxruntime.so*")))
    if not found:
        raise OrtLibraryError(
            f"no libonnxruntime.so in {spec.submodule_search_locations[0]}/capi; "
            "set NONN_ORT_LIBRARY to ONNX Runtime's C library"
        )
    return Path(found[0])


class _Api:
    """The OrtApi members above as callables, one shared environment and CPU memory info."""

    def __init__(self, path: Path) -> None:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            raise OrtLibraryError(
                f"cannot load ONNX Runtime's C library: {exc}; point NONN_ORT_LIBRARY at a libonnxruntime.so"
            ) from None

        class ApiBase(ctypes.Structure):
            _fields_ = [("GetApi", ctypes.CFUNCTYPE(c_void_p, c_uint32)), ("GetVersionString", ctypes.CFUNCTYPE(c_char_p))]

        lib.OrtGetApiBase.restype = POINTER(ApiBase)
        base = lib.OrtGetApiBase().contents
        self.version = base.GetVersionString().decode()
        table = base.GetApi(_API_VERSION)
        if not table:
            raise OrtLibraryError(f"{path}: ONNX Runtime {self.version} does not offer C API version {_API_VERSION}")
        pointers = ctypes.cast(table, POINTER(c_void_p * (max(i for i, _, _ in _MEMBERS.values()) + 1))).contents
        for name, (index, restype, argtypes) in _MEMBERS.items():
            setattr(self, name, ctypes.CFUNCTYPE(restype, *argtypes)(pointers[index]))
        self.lib = lib  # keeps the library loaded as long as the table is in use
        self.env = self.out("CreateEnv", _ORT_LOGGING_LEVEL_ERROR, b"nonn")
        self.cpu_memory = self.out("CreateCpuMemoryInfo", _ORT_ARENA_ALLOCATOR, _ORT_MEM_TYPE_DEFAULT)
        self.allocator = self.out("GetAllocatorWithDefaultOptions")

    def check(self, call: str, status: int | None) -> None:
        """Raise OrtError with ONNX Runtime's message when `status` is an error."""
        if status:
            message = self.GetErrorMessage(status).decode(errors="replace")
            self.ReleaseStatus(status)
            raise OrtError(f"{call}: {message}")

    def call(self, name: str, *args) -> None:
        self.check(name, getattr(self, name)(*args))

    def out(self, name: str, *args) -> int | None:
        """Call a member whose last argument is an out-pointer; return what it wrote."""
        result = c_void_p()
        self.call(name, *args, ctypes.byref(result))
        return result.value

    def string(self, name: str, *args) -> str:
        """Call a member that returns a string allocated with the default allocator."""
        pointer = self.out(name, *args, self.allocator)
        try:
            return ctypes.string_at(pointer).decode()
        finally:
            self.call("AllocatorFree", self.allocator, pointer)

    def tensor_info(self, info: int) -> tuple[str, tuple[int, ...]]:
        """Datatype and shape (-1 for symbolic dimensions) from an OrtTensorTypeAndShapeInfo."""
        element = c_int()
        self.call("GetTensorElementType", info, ctypes.byref(element))
        rank = c_size_t()
        self.call("GetDimensionsCount", info, ctypes.byref(rank))
        dims = (c_int64 * rank.value)()
        self.call("GetDimensions", info, dims, rank.value)
        try:
            datatype = datatype_from_element(element.value)
        except TensorError as exc:
            raise ArtifactError(str(exc)) from None
        return datatype, tuple(d if d >= 0 else -1 for d in dims)


_api: _Api | None = None
_api_lock = threading.Lock()


def _load_api() -> _Api:
    global _api
    with _api_lock:
        if _api is None:
            _api = _Api(library_path())
        return _api


class CApiModel:
    """An ONNX Runtime session over one model file, driven through the C API.

    Same contract as `OnnxModel` for serving: `inputs`/`outputs` as TensorSpecs, `sha256`, and
    `run_tensors()` on RawTensors. ONNX Runtime runs without the GIL.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int = 1,
        expected_sha256: str | None = None,
        memory_arena: bool = False,
    ) -> None:
        at_least(1, threads=threads)
        self.path = Path(path)
        data, self.sha256 = read_verified(self.path, expected_sha256)
        self.threads = threads
        api = self._api = _load_api()
        options = api.out("CreateSessionOptions")
        try:
            api.call("SetIntraOpNumThreads", options, threads)
            api.call("SetInterOpNumThreads", options, 1)
            api.call("SetSessionExecutionMode", options, _ORT_SEQUENTIAL)
            api.call("SetSessionGraphOptimizationLevel", options, _ORT_ENABLE_ALL)
            # A small device: no busy-waiting worker threads, no arena that only ever grows.
            api.call("AddSessionConfigEntry", options, b"session.intra_op.allow_spinning", b"0")
            if not memory_arena:
                api.call("DisableCpuMemArena", options)
                api.call("DisableMemPattern", options)
            try:
                self._session = api.out("CreateSessionFromArray", api.env, data, len(data), options)
            except OrtError as exc:
                raise ArtifactError(f"{self.path}: not a loadable ONNX model ({exc})") from None
        finally:
            api.ReleaseSessionOptions(options)
        self.inputs: list[TensorSpec] = self._specs("Input")
        self.outputs: list[TensorSpec] = self._specs("Output")
        # Built once: what each call passes to Run and how it reads the outputs back.
        self._input_name_array = (c_char_p * len(self.inputs))(*(spec.name.encode() for spec in self.inputs))
        self._output_names = {spec.name: spec.name.encode() for spec in self.outputs}
        self._all_outputs = tuple(spec.name for spec in self.outputs)
        self._output_name_arrays: dict[tuple[str, ...], ctypes.Array] = {}
        self._output_layout = {spec.name: (spec.datatype, len(spec.shape), itemsize(spec.datatype)) for spec in self.outputs}

    def _specs(self, kind: str) -> list[TensorSpec]:
        api = self._api
        count = c_size_t()
        api.call(f"SessionGet{kind}Count", self._session, ctypes.byref(count))
        specs = []
        for index in range(count.value):
            name = api.string(f"SessionGet{kind}Name", self._session, index)
            type_info = api.out(f"SessionGet{kind}TypeInfo", self._session, index)
            try:
                tensor_info = api.out("CastTypeInfoToTensorInfo", type_info)  # owned by type_info
                if not tensor_info:
                    raise ArtifactError(f"{self.path}: {kind.lower()} {name!r} is not a tensor")
                datatype, shape = api.tensor_info(tensor_info)
            finally:
                api.ReleaseTypeInfo(type_info)
            specs.append(TensorSpec(name, shape, datatype))
        return specs

    def run_tensors(self, feeds: Mapping[str, RawTensor], outputs: Sequence[str] | None = None) -> dict[str, RawTensor]:
        """Run the model on validated tensors; returns {output name: RawTensor} for `outputs` (default: all).

        The per-call path is a handful of C calls: the inputs' bytes are wrapped, not copied, and
        each output is copied once into the bytes the reply sends.
        """
        api = self._api
        names = tuple(outputs) if outputs is not None else self._all_outputs
        output_names = self._output_name_arrays.get(names)
        if output_names is None:
            output_names = (c_char_p * len(names))(*(self._output_names[name] for name in names))
            self._output_name_arrays[names] = output_names
        values = (c_void_p * len(self.inputs))()
        results = (c_void_p * len(names))()
        try:
            for slot, spec in enumerate(self.inputs):
                tensor = feeds[spec.name]
                rank = len(tensor.shape)
                created = c_void_p()
                status = api.CreateTensorWithDataAsOrtValue(
                    api.cpu_memory, tensor.data, len(tensor.data), (c_int64 * rank)(*tensor.shape), rank,
                    DATATYPES[tensor.datatype].onnx_element, ctypes.byref(created),
                )
                api.check("CreateTensorWithDataAsOrtValue", status)
                values[slot] = created
            status = api.Run(self._session, None, self._input_name_array, values, len(values), output_names, len(names), results)
            api.check("Run", status)
            return {name: self._read(name, value) for name, value in zip(names, results)}
        finally:
            for value in (*values, *results):
                if value:
                    api.ReleaseValue(value)

    def _read(self, name: str, value: int) -> RawTensor:
        """Copy one output OrtValue into a RawTensor (its datatype and rank are the model's)."""
        api = self._api
        datatype, rank, size = self._output_layout[name]
        info = c_void_p()
        api.check("GetTensorTypeAndShape", api.GetTensorTypeAndShape(value, ctypes.byref(info)))
        try:
            dims = (c_int64 * rank)()
            api.check("GetDimensions", api.GetDimensions(info, dims, rank))
        finally:
            api.ReleaseTensorTypeAndShapeInfo(info)
        shape = tuple(dims)
        size *= math.prod(shape)
        if not size:
            return RawTensor(datatype, shape, b"")
        data = c_void_p()
        api.check("GetTensorMutableData", api.GetTensorMutableData(value, ctypes.byref(data)))
        return RawTensor(datatype, shape, ctypes.string_at(data, size))

    def close(self) -> None:
        """Release the session (also done when the model is garbage-collected)."""
        session, self._session = getattr(self, "_session", None), None
        if session:
            self._api.ReleaseSession(session)

    __del__ = close

    def __repr__(self) -> str:
        return f"CApiModel({str(self.path)!r}, inputs={self.inputs}, outputs={self.outputs})"
