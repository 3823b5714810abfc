"""One ONNX model in an ONNX Runtime session (Python binding), checked against its sha256 first.

Used in-process (the aggregator's head, evaluation, benchmarks); the device server runs the same
sessions through `nonn.runtime.ort_capi` instead, without numpy. Thread counts default to one
intra-op thread: a device runs one student and shares its few cores with the gRPC server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from nonn.artifacts import ArtifactError
from nonn.runtime.arrays import from_array, to_array
from nonn.runtime.checks import at_least
from nonn.runtime.codec import RawTensor
from nonn.runtime.datatypes import TensorSpec, datatype_from_onnx
from nonn.runtime.ort_capi import ModelIntegrityError, read_verified

__all__ = ["ModelIntegrityError", "OnnxModel"]


def _spec(node: ort.NodeArg) -> TensorSpec:
    # Symbolic or unknown dimensions (strings, None) are dynamic: -1 on the wire.
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, shape, datatype_from_onnx(node.type))


class OnnxModel:
    """An ONNX Runtime session over one model file, with its inputs and outputs as TensorSpecs."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int = 1,
        expected_sha256: str | None = None,
        memory_arena: bool = False,
    ) -> None:
        self.path = Path(path)
        at_least(1, threads=threads)
        data, self.sha256 = read_verified(self.path, expected_sha256)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # A small device: no busy-waiting worker threads, no arena that only ever grows.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_cpu_mem_arena = memory_arena
        options.enable_mem_pattern = memory_arena
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for bad graphs
            raise ArtifactError(f"{self.path}: not a loadable ONNX model ({exc})") from exc
        self.threads = threads
        self.inputs: list[TensorSpec] = [_spec(node) for node in self.session.get_inputs()]
        self.outputs: list[TensorSpec] = [_spec(node) for node in self.session.get_outputs()]

    def run(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model; returns {output name: array} for `outputs` (default: all)."""
        names = list(outputs) if outputs is not None else [spec.name for spec in self.outputs]
        results = self.session.run(names, dict(feeds))
        return dict(zip(names, results))

    def run_tensors(self, feeds: Mapping[str, RawTensor], outputs: Sequence[str] | None = None) -> dict[str, RawTensor]:
        """run() on RawTensors (the device server's form), like CApiModel.run_tensors."""
        results = self.run({name: to_array(tensor) for name, tensor in feeds.items()}, outputs)
        return {name: from_array(array) for name, array in results.items()}

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, inputs={self.inputs}, outputs={self.outputs})"
