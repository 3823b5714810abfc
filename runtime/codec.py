"""Open Inference Protocol (KServe v2) tensors on the wire, with validation; no numpy.

One place for the wire format of tensors: raw little-endian contents, typed contents, and the
checks a request must pass before it reaches a model (name, datatype, rank,
shape, byte length, batch limit). A tensor here is a `RawTensor` (datatype, shape, bytes): the
device server passes those bytes to ONNX Runtime as they are, so it never imports numpy.
`nonn.runtime.arrays` converts between RawTensors and numpy arrays for the aggregator; the
datatypes themselves and TensorSpec are in `nonn.runtime.datatypes`.
"""

from __future__ import annotations

import array
import math
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from nonn.runtime.datatypes import DATATYPES, TensorError, TensorSpec, datatype_from_numpy, itemsize
from nonn.runtime.protocol import pb

__all__ = [
    "TensorError",
    "TensorSpec",
    "RawTensor",
    "tensor_metadata",
    "check_shape",
    "decode_input",
    "decode_output",
    "as_raw_tensor",
    "output_tensor",
    "bytes_per_item",
    "decode_request_inputs",
    "requested_outputs",
    "parameter_value",
    "make_parameter",
    "parameters_dict",
]


def tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    """A TensorSpec as ModelMetadata describes a tensor."""
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


def bytes_per_item(spec: TensorSpec) -> int | None:
    """Bytes of one batch item of `spec`, or None when a non-batch dimension is dynamic."""
    dims = spec.shape[1:] if spec.batched else spec.shape
    if any(d < 0 for d in dims):
        return None
    return math.prod(dims) * spec.itemsize


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


@dataclass(frozen=True)
class RawTensor:
    """A tensor as the wire carries it: datatype, concrete shape, raw little-endian C-order bytes."""

    datatype: str
    shape: tuple[int, ...]
    data: bytes

    def expected_bytes(self) -> int:
        """Bytes the shape and datatype call for (data must have exactly this many)."""
        return math.prod(self.shape) * itemsize(self.datatype)


def as_raw_tensor(value: Any) -> RawTensor:
    """`value` as a RawTensor: a RawTensor as is, or a numpy array (anything with dtype, shape, tobytes)."""
    if isinstance(value, RawTensor):
        return value
    dtype = getattr(value, "dtype", None)
    datatype = datatype_from_numpy(getattr(dtype, "str", None))
    if datatype is None or not hasattr(value, "tobytes"):
        raise TensorError(f"cannot send {type(value).__name__} (dtype {dtype}) as an Open Inference Protocol tensor")
    return RawTensor(datatype, tuple(int(d) for d in value.shape), value.tobytes())


def _from_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> RawTensor:
    tensor = RawTensor(datatype, shape, raw)
    expected = tensor.expected_bytes()
    if len(raw) != expected:
        raise TensorError(
            f"tensor {name!r}: {len(raw)} bytes of raw contents, but shape {list(shape)} of "
            f"{datatype} needs {expected} bytes"
        )
    return tensor


def _from_typed(name: str, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents) -> RawTensor:
    entry = DATATYPES.get(datatype)
    if entry is None:
        itemsize(datatype)  # raises, naming the datatypes there are
    field, typecode = entry.contents_field, entry.typecode
    if field is None:
        raise TensorError(f"tensor {name!r}: datatype {datatype} must be sent in raw contents")
    values = getattr(contents, field)
    expected = math.prod(shape)
    if len(values) != expected:
        raise TensorError(
            f"tensor {name!r}: {len(values)} values in {field}, but shape {list(shape)} needs {expected}"
        )
    try:
        packed = array.array(typecode, values)
    except OverflowError as exc:
        raise TensorError(f"tensor {name!r}: a value in {field} does not fit {datatype} ({exc})") from None
    if sys.byteorder == "big":
        packed.byteswap()
    return RawTensor(datatype, shape, packed.tobytes())


def decode_input(
    spec: TensorSpec,
    tensor: pb.ModelInferRequest.InferInputTensor,
    raw: bytes | None,
    max_batch: int | None = None,
) -> RawTensor:
    """Validate one request tensor against the model's `spec` and return it as a RawTensor.

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


def decode_output(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes | None) -> RawTensor:
    """A checked RawTensor from one response tensor (raw contents, or typed contents when raw is None)."""
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"output {tensor.name!r}: shape {list(shape)} has a negative dimension")
    if raw is not None:
        return _from_raw(tensor.name, tensor.datatype, shape, raw)
    return _from_typed(tensor.name, tensor.datatype, shape, tensor.contents)


def output_tensor(name: str, value: Any) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """A response tensor header and its raw contents for a RawTensor (or numpy array)."""
    tensor = as_raw_tensor(value)
    header = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=tensor.datatype, shape=list(tensor.shape))
    return header, tensor.data


def decode_request_inputs(
    specs: Sequence[TensorSpec],
    request: pb.ModelInferRequest,
    max_batch: int | None = None,
) -> dict[str, RawTensor]:
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
    decoded: dict[str, RawTensor] = {}
    batch_sizes: set[int] = set()
    for index, tensor in enumerate(request.inputs):
        spec = by_name[tensor.name]
        value = decode_input(spec, tensor, raws[index] if raws else None, max_batch)
        if spec.batched:
            batch_sizes.add(value.shape[0])
        decoded[tensor.name] = value
    if len(batch_sizes) > 1:
        raise TensorError(f"inputs disagree on the batch size: {sorted(batch_sizes)}")
    return decoded


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
