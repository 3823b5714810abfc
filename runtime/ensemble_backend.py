"""The whole ensemble served as one model on the Open Inference Protocol (`serve --aggregate`)."""

from __future__ import annotations

from nonn.runtime.aggregator import AggregationError, Aggregator
from nonn.runtime.arrays import to_array
from nonn.runtime.backends import BackendUnavailable, InferOutput, ModelBackend
from nonn.runtime.checks import at_least
from nonn.runtime.codec import RawTensor
from nonn.runtime.datatypes import TensorSpec

__all__ = ["AggregatorBackend"]


class AggregatorBackend(ModelBackend):
    """The whole ensemble as one served model: image in, logits out, on the same protocol.

    Handler threads hand requests to the aggregator's event loop thread, so up to `concurrency`
    requests fan out at once. Response parameters say which devices contributed
    ("contributed": "1,1,0,1", "degraded": true/false).
    """

    platform = "nonn_ensemble"

    def __init__(self, aggregator: Aggregator, name: str = "ensemble", concurrency: int = 32) -> None:
        if not name:
            raise ValueError("a served model needs a non-empty name")
        at_least(1, concurrency=concurrency)
        self.aggregator = aggregator
        self.name = name
        self.inputs = [aggregator.input_spec]
        out = aggregator.head_output
        self.outputs = [TensorSpec(out.name, (-1, out.shape[-1]), out.datatype)]
        self.max_batch = aggregator.max_batch
        self.concurrency = concurrency
        aggregator.__enter__()  # channels live on the aggregator's own loop thread

    def infer(self, inputs: dict[str, RawTensor], outputs: list[str]) -> InferOutput:
        try:
            result = self.aggregator.infer_sync(to_array(inputs[self.inputs[0].name]))
        except AggregationError as exc:
            raise BackendUnavailable(str(exc)) from exc
        return InferOutput(
            {self.outputs[0].name: result.logits},
            {
                "contributed": ",".join("1" if ok else "0" for ok in result.contributed),
                "degraded": result.degraded,
            },
        )

    def close(self) -> None:
        self.aggregator.close_sync()
