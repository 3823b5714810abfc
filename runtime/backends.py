"""What a device server hosts: models behind one small interface (ModelBackend).

A backend describes its inputs and outputs as TensorSpecs and answers `infer()` on validated
RawTensors from handler threads. `OnnxBackend` serves one ONNX model; the ensemble served as one
model (`serve --aggregate`) is `nonn.runtime.ensemble_backend.AggregatorBackend`.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

from nonn.runtime.checks import at_least
from nonn.runtime.codec import RawTensor
from nonn.runtime.datatypes import TensorSpec

__all__ = ["DEFAULT_MAX_BATCH", "BackendUnavailable", "InferOutput", "ModelBackend", "TensorModel", "OnnxBackend"]

DEFAULT_MAX_BATCH = 64


class BackendUnavailable(RuntimeError):
    """The backend cannot answer now (e.g. the ensemble lost a device in strict mode): UNAVAILABLE."""


@dataclass
class InferOutput:
    """What a backend returns: outputs by name (RawTensors or numpy arrays), plus response parameters."""

    arrays: dict[str, Any]
    parameters: dict[str, Any] = field(default_factory=dict)


class ModelBackend(abc.ABC):
    """One model the server hosts: its protocol description and a thread-safe infer().

    `concurrency` is how many requests the backend runs at once; the server sizes its handler
    thread pool from it. Inputs arrive as validated RawTensors (bytes as the wire carried
    them); `nonn.runtime.arrays.to_array` views one as a numpy array. `sha256`, when known, is
    the model file's, reported in the model configuration so clients can confirm the model.
    """

    name: str
    version: str = "1"
    platform: str = "onnxruntime_onnx"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch: int = DEFAULT_MAX_BATCH
    concurrency: int = 1
    sha256: str | None = None

    @abc.abstractmethod
    def infer(self, inputs: dict[str, RawTensor], outputs: list[str]) -> InferOutput:
        """Run the model on validated inputs; return the requested outputs. Called from handler threads."""

    def close(self) -> None:
        """Release resources (called once after the server stopped)."""


class TensorModel(Protocol):
    """What OnnxBackend serves: CApiModel (what `nonn serve` uses) or OnnxModel."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run_tensors(self, feeds: Mapping[str, RawTensor], outputs: Sequence[str] | None = None) -> dict[str, RawTensor]: ...


class OnnxBackend(ModelBackend):
    """An ONNX model served under `name`; at most `workers` requests run in ONNX Runtime at once."""

    def __init__(self, model: TensorModel, name: str, max_batch: int = DEFAULT_MAX_BATCH, workers: int = 1) -> None:
        if not name:
            raise ValueError("a served model needs a non-empty name")
        at_least(1, max_batch=max_batch, workers=workers)
        self.model = model
        self.name = name
        self.sha256 = getattr(model, "sha256", None)
        self.inputs = list(model.inputs)
        self.outputs = list(model.outputs)
        self.max_batch = max_batch
        self.concurrency = workers
        # One worker (a small device's default): a plain lock, cheaper per request than a semaphore.
        self._slots = threading.Lock() if workers == 1 else threading.BoundedSemaphore(workers)

    def infer(self, inputs: dict[str, RawTensor], outputs: list[str]) -> InferOutput:
        with self._slots:
            return InferOutput(self.model.run_tensors(inputs, outputs))
