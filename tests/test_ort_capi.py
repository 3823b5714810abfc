"""CApiModel (ONNX Runtime's C API through ctypes) against the Python binding, and the device
server's lean imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from runtime_testing import tiny_student

from nonn.artifacts import ArtifactError
from nonn.runtime.arrays import from_array, to_array
from nonn.runtime.codec import RawTensor
from nonn.runtime.onnx_model import OnnxModel
from nonn.runtime.ort_capi import CApiModel, ModelIntegrityError, OrtError, OrtLibraryError, _Api, library_path


def mixed_types_model(path):
    """pixels UINT8 (N, 3) -> DOUBLE (N, 3) scaled, plus the pixels' sum as INT64 (N, 1) and a BOOL mask."""
    nodes = [
        helper.make_node("Cast", ["pixels"], ["as_double"], to=TensorProto.DOUBLE),
        helper.make_node("Constant", [], ["scale"], value=helper.make_tensor("s", TensorProto.DOUBLE, [], [0.5])),
        helper.make_node("Mul", ["as_double", "scale"], ["scaled"]),
        helper.make_node("Cast", ["pixels"], ["as_int"], to=TensorProto.INT64),
        helper.make_node("ReduceSum", ["as_int"], ["total"], keepdims=1),
        helper.make_node("Constant", [], ["limit"], value=helper.make_tensor("l", TensorProto.INT64, [], [100])),
        helper.make_node("Greater", ["as_int", "limit"], ["bright"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["batch", 3])],
        [
            helper.make_tensor_value_info("scaled", TensorProto.DOUBLE, ["batch", 3]),
            helper.make_tensor_value_info("total", TensorProto.INT64, ["batch", 1]),
            helper.make_tensor_value_info("bright", TensorProto.BOOL, ["batch", 3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_same_specs_and_outputs_as_the_python_binding(tmp_path):
    path = tiny_student(tmp_path / "s.onnx", 6, (2, 3, 3))
    native, reference = CApiModel(path), OnnxModel(path)
    assert (native.inputs, native.outputs) == (reference.inputs, reference.outputs)
    assert native.sha256 == reference.sha256
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        x = rng.normal(size=(batch, 2, 3, 3)).astype(np.float32)
        got = native.run_tensors({"input": from_array(x)})
        assert list(got) == ["features"]
        assert got["features"].shape == (batch, 6) and got["features"].datatype == "FP32"
        np.testing.assert_array_equal(to_array(got["features"]), reference.run({"input": x})["features"])


def test_element_types_map_both_ways(tmp_path):
    path = mixed_types_model(tmp_path / "mixed.onnx")
    native, reference = CApiModel(path), OnnxModel(path)
    assert [(s.name, s.datatype, s.shape) for s in native.inputs] == [("pixels", "UINT8", (-1, 3))]
    assert [(s.name, s.datatype) for s in native.outputs] == [("scaled", "FP64"), ("total", "INT64"), ("bright", "BOOL")]
    pixels = np.array([[0, 101, 255], [7, 8, 200]], np.uint8)
    got = native.run_tensors({"pixels": from_array(pixels)})
    want = reference.run({"pixels": pixels})
    for name in ("scaled", "total", "bright"):
        np.testing.assert_array_equal(to_array(got[name]), want[name])
    # Only the outputs asked for, in the order asked.
    assert list(native.run_tensors({"pixels": from_array(pixels)}, ["bright", "total"])) == ["bright", "total"]


def test_errors_name_the_problem(tmp_path):
    path = tiny_student(tmp_path / "s.onnx", 4)
    with pytest.raises(ModelIntegrityError, match="sha256 is .* but the manifest expects 0+"):
        CApiModel(path, expected_sha256="0" * 64)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="garbage.onnx: not a loadable ONNX model"):
        CApiModel(garbage)
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        CApiModel(tmp_path / "nope.onnx")
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        CApiModel(path, threads=0)
    model = CApiModel(path, threads=2)
    # A tensor that skipped the server's validation: ONNX Runtime's own message comes back.
    wrong = RawTensor("FP32", (1, 2, 2), bytes(16))
    with pytest.raises(OrtError, match="Run: .*input"):
        model.run_tensors({"input": wrong})
    # The session still answers a good request afterwards.
    ok = model.run_tensors({"input": RawTensor("FP32", (1, 1, 4, 4), bytes(64))})
    assert ok["features"].shape == (1, 4)


def test_the_library_can_be_named_and_a_bad_one_is_refused(tmp_path, monkeypatch):
    assert library_path().name.startswith("libonnxruntime.so")
    monkeypatch.setenv("NONN_ORT_LIBRARY", str(tmp_path / "libonnxruntime.so"))
    assert library_path() == tmp_path / "libonnxruntime.so"
    (tmp_path / "libonnxruntime.so").write_bytes(b"not a library")
    with pytest.raises(OrtLibraryError, match="cannot load ONNX Runtime's C library: .*libonnxruntime.so.*NONN_ORT_LIBRARY"):
        _Api(library_path())


def test_without_the_c_library_a_device_serves_through_the_python_binding(tmp_path, monkeypatch, caplog):
    from nonn.runtime import model_loading

    def missing(*args, **kwargs):
        raise OrtLibraryError("no libonnxruntime.so in /site-packages/onnxruntime/capi")

    monkeypatch.setattr(model_loading, "CApiModel", missing)
    monkeypatch.delenv("NONN_ORT_LIBRARY", raising=False)
    path = tiny_student(tmp_path / "s.onnx", 4)
    model = model_loading.load_model(path)
    assert isinstance(model, OnnxModel)
    assert "serving through ONNX Runtime's Python binding instead" in caplog.text
    x = RawTensor("FP32", (1, 1, 4, 4), np.ones(16, np.float32).tobytes())
    assert model.run_tensors({"input": x})["features"] == CApiModel(path).run_tensors({"input": x})["features"]
    # A library the user named is not second-guessed.
    monkeypatch.setenv("NONN_ORT_LIBRARY", "/opt/ort/libonnxruntime.so")
    with pytest.raises(OrtLibraryError, match="no libonnxruntime.so"):
        model_loading.load_model(path)


def test_device_server_runs_without_numpy_or_the_python_binding(tmp_path):
    """A device process serves through the C API: numpy and onnxruntime's Python module stay out."""
    path = tiny_student(tmp_path / "s.onnx", 4)
    code = (
        "import sys\n"
        "from nonn.runtime.server import OnnxBackend, student_backend, serve_backends\n"
        "import nonn.cli.runtime\n"
        "from nonn.runtime.ort_capi import CApiModel\n"
        "from nonn.runtime.codec import RawTensor\n"
        f"model = CApiModel({str(path)!r})\n"
        "out = OnnxBackend(model, 's').infer({'input': RawTensor('FP32', (2, 1, 4, 4), bytes(128))}, ['features'])\n"
        "print(out.arrays['features'].shape, sorted(m for m in ('numpy', 'onnxruntime') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 4) []"


def test_tritonclient_still_works_after_the_stubs_load_alone():
    """nonn.runtime.protocol defers tritonclient.grpc's __init__; the client must still import after it."""
    code = (
        "import sys\n"
        "from nonn.runtime.protocol import pb\n"
        "assert 'numpy' not in sys.modules\n"
        "from tritonclient.grpc import service_pb2, InferenceServerClient, InferInput\n"
        "import tritonclient.grpc.aio as aio\n"
        "import tritonclient.grpc as g\n"
        "assert service_pb2 is pb and g.InferInput is InferInput\n"
        "print(InferenceServerClient.__name__, aio.InferenceServerClient.__name__, 'numpy' in sys.modules)\n"
        "try:\n"
        "    g.no_such_name\n"
        "except AttributeError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "InferenceServerClient InferenceServerClient True",
        "module 'tritonclient.grpc' has no attribute 'no_such_name'",
    ]
