"""numpy arrays <-> Open Inference Protocol (KServe v2) tensors, with validation.

One place for the wire format of tensors: datatype strings, raw little-endian contents, typed
contents, and the checks a request must pass before it reaches a model (name, datatype, rank,
shape, byte length, batch limit). Both the device server and the aggregator use it, so a
tensor is encoded and checked the same way on each side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from tritonclient.grpc import service_pb2 as pb

__all__ = [
    "TensorError",
    "TensorSpec",
    "DATATYPES",
    "numpy_dtype",
    "datatype_of",
    "datatype_from_onnx",
    "check_shape",
    "decode_input",
    "decode_output",
    "encode_array",
    "input_tensor",
    "output_tensor",
    "bytes_per_item",
    "decode_request_inputs",
    "requested_outputs",
    "parameter_value",
    "make_parameter",
    "parameters_dict",
]


class TensorError(ValueError):
    """A tensor on the wire does not match what the model expects (maps to INVALID_ARGUMENT)."""


# KServe v2 datatype string -> little-endian numpy dtype. BYTES (variable-length strings) is not
# a fixed-size type and no NoNN model uses it, so it is rejected with a clear message.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

# ONNX Runtime's type strings for the same element types.
_ONNX_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}

# Which InferTensorContents field carries each datatype when a client sends typed contents.
_TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype for a KServe datatype string; TensorError for an unknown or unsupported one."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise TensorError(
            f"unsupported datatype {datatype!r}; expected one of {', '.join(DATATYPES)}"
        ) from None


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


def datatype_from_onnx(onnx_type: str) -> str:
    """The KServe datatype string for an ONNX Runtime type string ("tensor(float)" -> "FP32")."""
    try:
        return _ONNX_TYPES[onnx_type]
    except KeyError:
        raise TensorError(f"ONNX type {onnx_type!r} is not supported by the device server") from None


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the protocol describes it: name, datatype, shape (-1 = any)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        numpy_dtype(self.datatype)
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < -1 for d in self.shape):
            raise TensorError(f"tensor {self.name!r}: shape {list(self.shape)} has a dimension below -1")

    @property
    def dtype(self) -> np.dtype:
        return numpy_dtype(self.datatype)

    @property
    def batched(self) -> bool:
        """True when the first dimension is the dynamic batch dimension."""
        return bool(self.shape) and self.shape[0] == -1

    def metadata(self) -> pb.ModelMetadataResponse.TensorMetadata:
        return pb.ModelMetadataResponse.TensorMetadata(
            name=self.name, datatype=self.datatype, shape=list(self.shape)
        )

    @classmethod
    def from_metadata(cls, meta: Any) -> "TensorSpec":
        """From a ModelMetadataResponse.TensorMetadata (or anything with name/datatype/shape)."""
        return cls(str(meta.name), str(meta.datatype), tuple(int(d) for d in meta.shape))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def bytes_per_item(spec: TensorSpec) -> int | None:
    """Bytes of one batch item of `spec`, or None when a non-batch dimension is dynamic."""
    dims = spec.shape[1:] if spec.batched else spec.shape
    if any(d < 0 for d in dims):
        return None
    return math.prod(dims) * spec.dtype.itemsize


def check_shape(spec: TensorSpec, shape: Sequence[int], max_batch: int | None = None) -> tuple[int, ...]:
    """Check a concrete `shape` against `spec`; return it as a tuple or raise TensorError."""
    shape = tuple(int(d) for d in shape)
    if len(shape) != len(spec.shape):
        raise TensorError(
            f"input {spec.name!r}: rank {len(shape)} (shape {list(shape)}) does not match the "
            f"model's rank {len(spec.shape)} (shape {list(spec.shape)})"
        )
    if any(d < 0 for d in shape):
        raise TensorError(f"input {spec.name!r}: shape {list(shape)} has a negative dimension")
    for axis, (got, want) in enumerate(zip(shape, spec.shape)):
        if want != -1 and got != want:
            raise TensorError(
                f"input {spec.name!r}: dimension {axis} is {got}, expected {want} "
                f"(model shape {list(spec.shape)}, got {list(shape)})"
            )
    if spec.batched:
        if shape[0] == 0:
            raise TensorError(f"input {spec.name!r}: batch size is 0")
        if max_batch is not None and shape[0] > max_batch:
            raise TensorError(
                f"input {spec.name!r}: batch size {shape[0]} is above this server's limit of {max_batch}"
            )
    return shape


def encode_array(array: np.ndarray, datatype: str | None = None) -> bytes:
    """Raw little-endian, C-order bytes of `array` (cast to `datatype` when given)."""
    dtype = numpy_dtype(datatype) if datatype else numpy_dtype(datatype_of(array.dtype))
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def _from_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    dtype = numpy_dtype(datatype)
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise TensorError(
            f"tensor {name!r}: {len(raw)} bytes of raw contents, but shape {list(shape)} of "
            f"{datatype} needs {expected} bytes"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _from_typed(name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents) -> np.ndarray:
    field = _TYPED_FIELDS.get(datatype)
    if field is None:
        raise TensorError(f"tensor {name!r}: datatype {datatype} must be sent in raw contents")
    values = getattr(contents, field)
    expected = math.prod(shape)
    if len(values) != expected:
        raise TensorError(
            f"tensor {name!r}: {len(values)} values in {field}, but shape {list(shape)} needs {expected}"
        )
    return np.asarray(values, dtype=numpy_dtype(datatype)).reshape(shape)


def decode_input(
    spec: TensorSpec,
    tensor: pb.ModelInferRequest.InferInputTensor,
    raw: bytes | None,
    max_batch: int | None = None,
) -> np.ndarray:
    """Validate one request tensor against the model's `spec` and return it as an array.

    `raw` is the tensor's entry in raw_input_contents, or None when the request carries typed
    contents instead. Every mismatch raises TensorError naming the tensor and the problem.
    """
    if tensor.datatype != spec.datatype:
        raise TensorError(
            f"input {spec.name!r}: datatype {tensor.datatype or '(empty)'} does not match the "
            f"model's {spec.datatype}"
        )
    shape = check_shape(spec, tensor.shape, max_batch)
    if raw is not None:
        if tensor.HasField("contents"):
            raise TensorError(f"input {spec.name!r}: both raw and typed contents were sent")
        return _from_raw(spec.name, spec.datatype, shape, raw)
    return _from_typed(spec.name, spec.datatype, shape, tensor.contents)


def decode_output(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes | None) -> np.ndarray:
    """An array from one response tensor (raw contents, or typed contents when raw is None)."""
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"output {tensor.name!r}: shape {list(shape)} has a negative dimension")
    if raw is not None:
        return _from_raw(tensor.name, tensor.datatype, shape, raw)
    return _from_typed(tensor.name, tensor.datatype, shape, tensor.contents)


def input_tensor(name: str, array: np.ndarray, datatype: str | None = None) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes]:
    """A request tensor header and its raw contents for `array`."""
    datatype = datatype or datatype_of(array.dtype)
    header = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(array.shape))
    return header, encode_array(array, datatype)


def output_tensor(name: str, array: np.ndarray) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """A response tensor header and its raw contents for `array`."""
    datatype = datatype_of(array.dtype)
    header = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=list(array.shape))
    return header, encode_array(array, datatype)


def decode_request_inputs(
    specs: Sequence[TensorSpec],
    request: pb.ModelInferRequest,
    max_batch: int | None = None,
) -> dict[str, np.ndarray]:
    """Validate every input of a ModelInferRequest against the model's `specs`.

    Checks the set of input names (none missing, none unknown, no duplicates), the count of
    raw contents, each tensor (see decode_input) and that batched inputs agree on the batch size.
    """
    by_name = {spec.name: spec for spec in specs}
    names = [t.name for t in request.inputs]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise TensorError(f"unknown input {unknown[0]!r}; the model's inputs are {sorted(by_name)}")
    if len(set(names)) != len(names):
        raise TensorError(f"input names repeat in the request: {names}")
    missing = [n for n in by_name if n not in names]
    if missing:
        raise TensorError(f"missing input {missing[0]!r}; the model's inputs are {sorted(by_name)}")
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise TensorError(
            f"{len(raws)} raw_input_contents entries for {len(request.inputs)} inputs; "
            "send one per input, in input order"
        )
    arrays: dict[str, np.ndarray] = {}
    batch_sizes: set[int] = set()
    for index, tensor in enumerate(request.inputs):
        spec = by_name[tensor.name]
        array = decode_input(spec, tensor, raws[index] if raws else None, max_batch)
        if spec.batched:
            batch_sizes.add(array.shape[0])
        arrays[tensor.name] = array
    if len(batch_sizes) > 1:
        raise TensorError(f"inputs disagree on the batch size: {sorted(batch_sizes)}")
    return arrays


def requested_outputs(specs: Sequence[TensorSpec], request: pb.ModelInferRequest) -> list[TensorSpec]:
    """The outputs a request asks for (all of them when it names none); TensorError for unknown ones."""
    if not request.outputs:
        return list(specs)
    by_name = {spec.name: spec for spec in specs}
    chosen = []
    for out in request.outputs:
        if out.name not in by_name:
            raise TensorError(f"unknown output {out.name!r}; the model's outputs are {sorted(by_name)}")
        chosen.append(by_name[out.name])
    return chosen


def parameter_value(param: pb.InferParameter) -> Any:
    """The Python value of an InferParameter (whichever oneof field is set)."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def make_parameter(value: Any) -> pb.InferParameter:
    """An InferParameter holding `value` (bool, int, float or str)."""
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def parameters_dict(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in params.items()}
