"""numpy arrays <-> Open Inference Protocol tensors (the aggregator's side of `nonn.runtime.codec`)."""

from __future__ import annotations

import numpy as np

from nonn.runtime.codec import RawTensor
from nonn.runtime.datatypes import DATATYPES, TensorError, datatype_from_numpy, datatype_info

__all__ = ["numpy_dtype", "datatype_of", "to_array", "from_array"]


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype for a datatype name; TensorError for an unknown or unsupported one."""
    return np.dtype(datatype_info(name).numpy)


def datatype_of(dtype: np.dtype | type | str) -> str:
    """The datatype name for a numpy dtype (float32 -> "FP32")."""
    dtype = np.dtype(dtype)
    known = datatype_from_numpy(dtype.str)
    if known is not None:
        return known
    for entry in DATATYPES.values():  # e.g. a big-endian dtype: the same kind and size
        candidate = np.dtype(entry.numpy)
        if candidate.kind == dtype.kind and candidate.itemsize == dtype.itemsize:
            return entry.name
    raise TensorError(f"numpy dtype {dtype} has no Open Inference Protocol datatype")


def to_array(tensor: RawTensor) -> np.ndarray:
    """A read-only numpy view of a RawTensor's bytes (no copy)."""
    return np.frombuffer(tensor.data, dtype=numpy_dtype(tensor.datatype)).reshape(tensor.shape)


def from_array(array: np.ndarray, datatype: str | None = None) -> RawTensor:
    """A RawTensor holding `array` (cast to `datatype` when given)."""
    datatype = datatype or datatype_of(array.dtype)
    data = np.ascontiguousarray(array, dtype=numpy_dtype(datatype)).tobytes()
    return RawTensor(datatype, tuple(int(d) for d in array.shape), data)
