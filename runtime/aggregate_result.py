"""One aggregated answer: logits, which students contributed, and what each device cost."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

__all__ = ["AggregateResult"]


@dataclass
class AggregateResult:
    """One aggregated answer: logits, which students contributed, and per device what it cost.

    Per student (in group order): `contributed`, and `answered_by`, the index of the device whose
    features were used. Per device (student by student, each student's replicas in a row; one
    device per student without replication): `devices` (endpoints), `bytes_sent` /
    `bytes_received` (serialized protobuf sizes of the ModelInfer requests and replies, summed
    over attempts; an attempt that found no connection sent nothing), `device_latency_s`,
    `attempts`, `errors`, and `skipped` (the device was down and not called).
    """

    logits: np.ndarray
    contributed: list[bool]
    bytes_sent: list[int]
    bytes_received: list[int]
    latency_s: float
    device_latency_s: list[float | None]
    attempts: list[int]
    errors: list[str | None]
    devices: list[str] = field(default_factory=list)
    answered_by: list[int | None] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def degraded(self) -> bool:
        return not all(self.contributed)

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        answering = set(d for d in self.answered_by if d is not None)
        out: dict[str, Any] = {
            "predictions": self.predictions.tolist(),
            "logits": self.logits.tolist(),
            "degraded": self.degraded,
            "contributed": list(self.contributed),
            "latency_ms": self.latency_s * 1e3,
            "devices": [
                {
                    "endpoint": endpoint,
                    "answered": d in answering,
                    "skipped": bool(self.skipped[d]) if self.skipped else False,
                    "bytes_sent": self.bytes_sent[d],
                    "bytes_received": self.bytes_received[d],
                    "latency_ms": None if self.device_latency_s[d] is None else self.device_latency_s[d] * 1e3,
                    "attempts": self.attempts[d],
                    "error": self.errors[d],
                }
                for d, endpoint in enumerate(self.devices)
            ],
        }
        if class_names:
            out["labels"] = [class_names[i] for i in out["predictions"]]
        return out

    def rows(self, start: int, stop: int, latency_s: float) -> "AggregateResult":
        """The answer for rows start..stop of a shared (coalesced) call: its logits, and its share
        of the bytes by image count."""
        share = (stop - start) / len(self.logits)
        return replace(
            self,
            logits=self.logits[start:stop],
            bytes_sent=[round(b * share) for b in self.bytes_sent],
            bytes_received=[round(b * share) for b in self.bytes_received],
            latency_s=latency_s,
        )
