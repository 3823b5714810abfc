"""Wire tensors without numpy (nonn.runtime.codec) against numpy's view of them (nonn.runtime.arrays)."""

from __future__ import annotations

import numpy as np
import pytest

from nonn.runtime.arrays import from_array, numpy_dtype, to_array
from nonn.runtime.codec import RawTensor, TensorError, TensorSpec, as_raw_tensor, decode_input, output_tensor
from nonn.runtime.datatypes import DATATYPES
from nonn.runtime.protocol import model_config_pb2, pb

TYPED = {
    "BOOL": ("bool_contents", [True, False, True, True]),
    "INT8": ("int_contents", [-128, 0, 5, 127]),
    "INT16": ("int_contents", [-32768, 1, 2, 32767]),
    "INT32": ("int_contents", [-(2**31), 3, 4, 2**31 - 1]),
    "INT64": ("int64_contents", [-(2**63), 5, 6, 2**63 - 1]),
    "UINT8": ("uint_contents", [0, 1, 2, 255]),
    "UINT16": ("uint_contents", [0, 1, 2, 65535]),
    "UINT32": ("uint_contents", [0, 1, 2, 2**32 - 1]),
    "UINT64": ("uint64_contents", [0, 1, 2, 2**64 - 1]),
    "FP32": ("fp32_contents", [-1.5, 0.0, 2.25, 3.0e38]),
    "FP64": ("fp64_contents", [-1.5, 0.0, 2.25, 1.0e300]),
}


def typed_request_tensor(datatype: str, field: str, values: list) -> pb.ModelInferRequest.InferInputTensor:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=[2, 2])
    getattr(tensor.contents, field).extend(values)
    return tensor


def test_the_datatype_table_agrees_with_numpy_onnx_and_the_protocol():
    import onnx

    contents_fields = pb.InferTensorContents.DESCRIPTOR.fields_by_name
    for t in DATATYPES.values():
        assert np.dtype(t.numpy).itemsize == t.size
        assert onnx.helper.tensor_dtype_to_np_dtype(t.onnx_element) == np.dtype(t.numpy), t
        assert t.onnx_type == f"tensor({onnx.TensorProto.DataType.Name(t.onnx_element).lower()})", t
        assert model_config_pb2.DataType.Value("TYPE_" + t.name) > 0  # Triton's configs know the name
        assert t.contents_field is None or t.contents_field in contents_fields, t


@pytest.mark.parametrize("datatype", sorted(TYPED))
def test_typed_contents_pack_like_numpy(datatype):
    field, values = TYPED[datatype]
    spec = TensorSpec("x", (-1, 2), datatype)
    got = decode_input(spec, typed_request_tensor(datatype, field, values), None)
    assert (got.datatype, got.shape) == (datatype, (2, 2))
    expected = np.asarray(values, dtype=numpy_dtype(datatype)).reshape(2, 2)
    assert got.data == expected.tobytes()
    np.testing.assert_array_equal(to_array(got), expected)


def test_typed_values_out_of_range_or_without_a_field_are_refused():
    with pytest.raises(TensorError, match="a value in int_contents does not fit INT8"):
        decode_input(TensorSpec("x", (-1, 2), "INT8"), typed_request_tensor("INT8", "int_contents", [1, 2, 3, 300]), None)
    with pytest.raises(TensorError, match="datatype FP16 must be sent in raw contents"):
        decode_input(TensorSpec("x", (-1, 2), "FP16"), pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP16", shape=[2, 2]), None)


def test_arrays_and_raw_tensors_round_trip():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)[:, ::2]  # not C-contiguous
    raw = from_array(x)
    assert raw == RawTensor("FP32", (2, 2), np.ascontiguousarray(x).tobytes())
    np.testing.assert_array_equal(to_array(raw), x)
    assert as_raw_tensor(x) == raw
    header, data = output_tensor("y", x)
    assert (header.name, header.datatype, list(header.shape), data) == ("y", "FP32", [2, 2], raw.data)
    with pytest.raises(TensorError, match="cannot send ndarray \\(dtype >f4\\)"):
        as_raw_tensor(x.astype(">f4"))
