"""Helpers for the fleet, simulate and report tests: a tiny bundle with a teacher summary, profiles, images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import runtime_testing

from nonn.runtime.bundle import Bundle, LayerSummary, TeacherSummary

INPUT_SHAPE = (1, 4, 4)


def make_bundle(root: Path, feature_sizes=(3, 2, 3), classes: int = 3, seed: int = 0, input_shape=INPUT_SHAPE,
                mean: float = 0.5, std: float = 0.25) -> Bundle:
    """runtime_testing.make_bundle with the fleet tests' defaults and a small teacher summary,
    so the planner's comparisons have something to compare against."""
    teacher = TeacherSummary(
        arch={"name": "tiny-teacher"},
        params=50_000,
        flops=2_000_000,
        input_shape=list(input_shape),
        layers=[LayerSummary("conv1", [8, *input_shape[1:]], 1_000_000, 20_000),
                LayerSummary("conv2", [8, *input_shape[1:]], 1_000_000, 30_000)],
    )
    return runtime_testing.make_bundle(root, feature_sizes, input_shape, classes, seed=seed, mean=mean, std=std, teacher=teacher)


def ensemble_predictions(bundle: Bundle, images: np.ndarray, present=None) -> np.ndarray:
    """The ensemble's classes computed in-process with ONNX Runtime (zeros for absent students)."""
    import onnxruntime as ort

    pre = bundle.input_contract
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
