"""Helpers for the fleet, simulate and report tests: a tiny bundle of ONNX students built with onnx.helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nonn.artifacts import sha256_file
from nonn.runtime.bundle import Bundle, LayerSummary, ModelEntry, Preprocessing, StudentEntry, TeacherSummary
from nonn.runtime.bundle import TensorSpec as BundleTensor

INPUT_SHAPE = (1, 4, 4)


def _save(nodes, name, inputs, outputs, initializers, path: Path) -> None:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _student(path: Path, weight: np.ndarray, input_shape=INPUT_SHAPE) -> None:
    """image (N, C, H, W) -> flatten -> matmul -> relu -> (N, F)."""
    features = weight.shape[1]
    _save(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["features"]),
        ],
        "student",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", features])],
        [numpy_helper.from_array(weight, "w")],
        path,
    )


def _head(path: Path, weight: np.ndarray, bias: np.ndarray) -> None:
    _save(
        [helper.make_node("MatMul", ["features", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["logits"])],
        "head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
        path,
    )


def make_bundle(root: Path, feature_sizes=(3, 2, 3), classes: int = 3, seed: int = 0, input_shape=INPUT_SHAPE,
                mean: float = 0.5, std: float = 0.25) -> Bundle:
    """A valid nonn.bundle/1 directory with len(feature_sizes) tiny students and a linear head."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    flat = int(np.prod(input_shape))
    students = []
    start = 0
    for k, f in enumerate(feature_sizes):
        path = root / f"student_{k}.onnx"
        _student(path, rng.normal(size=(flat, f)).astype(np.float32), input_shape)
        students.append(
            StudentEntry(
                name=f"student_{k}",
                file=path.name,
                sha256=sha256_file(path),
                input=BundleTensor("input", [-1, *input_shape]),
                output=BundleTensor("features", [-1, f]),
                params=flat * f,
                flops=2 * flat * f,
                size_bytes=path.stat().st_size,
                feature_size=f,
                group=list(range(start, start + f)),
                index=k,
            )
        )
        start += f
    head_path = root / "head.onnx"
    _head(head_path, rng.normal(size=(start, classes)).astype(np.float32), rng.normal(size=classes).astype(np.float32))
    head = ModelEntry(
        name="head",
        file=head_path.name,
        sha256=sha256_file(head_path),
        input=BundleTensor("features", [-1, start]),
        output=BundleTensor("logits", [-1, classes]),
        params=start * classes + classes,
        flops=2 * start * classes,
        size_bytes=head_path.stat().st_size,
    )
    teacher = TeacherSummary(
        arch={"name": "tiny-teacher"},
        params=50_000,
        flops=2_000_000,
        input_shape=list(input_shape),
        layers=[LayerSummary("conv1", [8, *input_shape[1:]], 1_000_000, 20_000),
                LayerSummary("conv2", [8, *input_shape[1:]], 1_000_000, 30_000)],
    )
    bundle = Bundle(
        students=students,
        head=head,
        preprocessing=Preprocessing(mean=[mean], std=[std], input_shape=list(input_shape)),
        class_names=[f"class{i}" for i in range(classes)],
        teacher=teacher,
        triton_repository_dir=None,
        root=root,
    )
    bundle.save(root)
    return Bundle.load(root)


def ensemble_predictions(bundle: Bundle, images: np.ndarray, present=None) -> np.ndarray:
    """The ensemble's classes computed in-process with ONNX Runtime (zeros for absent students)."""
    import onnxruntime as ort

    pre = bundle.preprocessing
    x = (images.astype(np.float32) - pre.mean[0]) / pre.std[0]
    parts = []
    for k, s in enumerate(bundle.students):
        sess = ort.InferenceSession(str(bundle.path_of(s)), providers=["CPUExecutionProvider"])
        out = sess.run(None, {"input": x})[0]
        parts.append(out if present is None or present[k] else np.zeros_like(out))
    head = ort.InferenceSession(str(bundle.path_of(bundle.head)), providers=["CPUExecutionProvider"])
    return head.run(None, {"features": np.concatenate(parts, axis=1)})[0].argmax(axis=1)


def tiny_images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *INPUT_SHAPE), dtype=np.float32)


def tiny_profile(name: str = "tiny", memory_mb: float = 4096.0, threads: int = 1, bandwidth_mbps=100.0, latency_ms=1.0, loss=0.0) -> dict:
    """A device profile as a plain dict (the fleet reads profiles as objects or dicts)."""
    return {
        "name": name,
        "memory_mb": memory_mb,
        "threads": threads,
        "gflops": 1.0,
        "link": {"bandwidth_mbps": bandwidth_mbps, "latency_ms": latency_ms, "loss": loss},
    }
