"""numpy arrays <-> Open Inference Protocol tensors (the aggregator's side of `nonn.runtime.codec`)."""

from __future__ import annotations

import numpy as np

from nonn.runtime.codec import NUMPY_DTYPE_STRINGS, RawTensor, TensorError, itemsize

__all__ = ["DATATYPES", "numpy_dtype", "datatype_of", "to_array", "from_array"]

# KServe v2 datatype string -> little-endian numpy dtype.
DATATYPES: dict[str, np.dtype] = {name: np.dtype(code) for name, code in NUMPY_DTYPE_STRINGS.items()}


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype for a KServe datatype string; TensorError for an unknown or unsupported one."""
    itemsize(datatype)
    return DATATYPES[datatype]


_DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}


def datatype_of(dtype: np.dtype | type | str) -> str:
    """The KServe datatype string for a numpy dtype (float32 -> "FP32")."""
    dtype = np.dtype(dtype)
    known = _DATATYPE_OF.get(dtype)
    if known is not None:
        return known
    for name, candidate in DATATYPES.items():
        if candidate.kind == dtype.kind and candidate.itemsize == dtype.itemsize:
            return name
    raise TensorError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")


def to_array(tensor: RawTensor) -> np.ndarray:
    """A read-only numpy view of a RawTensor's bytes (no copy)."""
    return np.frombuffer(tensor.data, dtype=numpy_dtype(tensor.datatype)).reshape(tensor.shape)


def from_array(array: np.ndarray, datatype: str | None = None) -> RawTensor:
    """A RawTensor holding `array` (cast to `datatype` when given)."""
    datatype = datatype or datatype_of(array.dtype)
    data = np.ascontiguousarray(array, dtype=numpy_dtype(datatype)).tobytes()
    return RawTensor(datatype, tuple(int(d) for d in array.shape), data)
