"""Tensor datatypes and tensor specs: the one table every part of the runtime reads.

Each Open Inference Protocol (KServe v2) datatype, e.g. "FP32", with its numpy dtype string
("<f4"), its ONNX element type (1, "tensor(float)"), its size in bytes, and the typed-contents
field a client may send it in. `TensorSpec` is a model input or output (name, shape with -1 for
a dynamic dimension, datatype) as the bundle manifest, the device server, ONNX Runtime and the
aggregator describe it. Standard library only (no numpy, no protobuf), so the device server
and the torch-free bundle code share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "TensorError",
    "DataType",
    "DATATYPES",
    "datatype_info",
    "itemsize",
    "datatype_from_onnx",
    "datatype_from_element",
    "datatype_from_numpy",
    "TensorSpec",
]


class TensorError(ValueError):
    """A tensor does not match what the model expects (maps to INVALID_ARGUMENT on the wire)."""


@dataclass(frozen=True)
class DataType:
    """One datatype: its wire name and every other spelling of it."""

    name: str  # KServe v2 / Open Inference Protocol, e.g. "FP32"
    numpy: str  # numpy's dtype.str, little-endian: "<f4"
    onnx_element: int  # ONNXTensorElementDataType / onnx.TensorProto.DataType
    onnx_type: str  # ONNX Runtime's type string: "tensor(float)"
    size: int  # bytes per element
    contents_field: str | None  # InferTensorContents field for typed contents (None: raw only)
    typecode: str  # the `array` module's typecode that packs typed contents into raw bytes ("": raw only)


# BYTES (variable-length strings) has no fixed size and no NoNN model uses it: it is not served.
DATATYPES: dict[str, DataType] = {
    t.name: t
    for t in (
        DataType("BOOL", "|b1", 9, "tensor(bool)", 1, "bool_contents", "B"),
        DataType("UINT8", "|u1", 2, "tensor(uint8)", 1, "uint_contents", "B"),
        DataType("UINT16", "<u2", 4, "tensor(uint16)", 2, "uint_contents", "H"),
        DataType("UINT32", "<u4", 12, "tensor(uint32)", 4, "uint_contents", "I"),
        DataType("UINT64", "<u8", 13, "tensor(uint64)", 8, "uint64_contents", "Q"),
        DataType("INT8", "|i1", 3, "tensor(int8)", 1, "int_contents", "b"),
        DataType("INT16", "<i2", 5, "tensor(int16)", 2, "int_contents", "h"),
        DataType("INT32", "<i4", 6, "tensor(int32)", 4, "int_contents", "i"),
        DataType("INT64", "<i8", 7, "tensor(int64)", 8, "int64_contents", "q"),
        DataType("FP16", "<f2", 10, "tensor(float16)", 2, None, ""),
        DataType("FP32", "<f4", 1, "tensor(float)", 4, "fp32_contents", "f"),
        DataType("FP64", "<f8", 11, "tensor(double)", 8, "fp64_contents", "d"),
    )
}
_BY_ONNX_TYPE = {t.onnx_type: t.name for t in DATATYPES.values()}
_BY_ELEMENT = {t.onnx_element: t.name for t in DATATYPES.values()}
_BY_NUMPY = {t.numpy: t.name for t in DATATYPES.values()}


def datatype_info(name: str) -> DataType:
    """The table entry for a datatype name; TensorError for an unknown or unsupported one."""
    try:
        return DATATYPES[name]
    except (KeyError, TypeError):
        raise TensorError(f"unsupported datatype {name!r}; expected one of {', '.join(DATATYPES)}") from None


def itemsize(name: str) -> int:
    """Bytes per element of a datatype; TensorError for an unknown or unsupported one."""
    return datatype_info(name).size


def datatype_from_onnx(onnx_type: str) -> str:
    """The datatype name for an ONNX Runtime type string ("tensor(float)" -> "FP32")."""
    try:
        return _BY_ONNX_TYPE[onnx_type]
    except KeyError:
        raise TensorError(f"ONNX type {onnx_type!r} is not supported by the device server") from None


def datatype_from_element(element: int) -> str:
    """The datatype name for an ONNX element type number (1 -> "FP32")."""
    try:
        return _BY_ELEMENT[element]
    except KeyError:
        raise TensorError(f"ONNX element type {element} is not supported by the device server") from None


def datatype_from_numpy(dtype_str: str) -> str | None:
    """The datatype name for a numpy dtype.str ("<f4" -> "FP32"), None when there is none."""
    return _BY_NUMPY.get(dtype_str)


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, shape (-1 = dynamic, e.g. the batch), datatype."""

    name: str
    shape: tuple[int, ...]
    datatype: str = "FP32"

    def __post_init__(self) -> None:
        datatype_info(self.datatype)
        if isinstance(self.shape, (str, bytes)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in self.shape):
            raise TensorError(f"tensor {self.name!r}: shape {self.shape!r} is not a list of integers")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < -1 for d in self.shape):
            raise TensorError(f"tensor {self.name!r}: shape {list(self.shape)} has a dimension below -1")

    @property
    def batched(self) -> bool:
        """True when the first dimension is the dynamic batch dimension."""
        return bool(self.shape) and self.shape[0] == -1

    @property
    def numpy_dtype(self) -> str:
        """numpy's spelling of the datatype ("<f4"), usable as np.dtype(spec.numpy_dtype)."""
        return DATATYPES[self.datatype].numpy

    @property
    def itemsize(self) -> int:
        return DATATYPES[self.datatype].size

    @classmethod
    def from_metadata(cls, meta: Any) -> "TensorSpec":
        """From a ModelMetadataResponse.TensorMetadata (or anything with name/datatype/shape)."""
        return cls(str(meta.name), tuple(int(d) for d in meta.shape), str(meta.datatype))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "datatype": self.datatype}

    def __str__(self) -> str:
        return f"{self.name} {self.datatype}{list(self.shape)}"
