"""Numeric precision of a training run: which one a device gets, its autocast, fp16 loss scaling.

`choose_precision` picks by the compute capability of the device actually used (not the
current one): bf16 from capability 8.0 (Ampere and later compute it natively), fp16 with loss
scaling on 7.x (Volta, Turing: tensor cores, but bf16 only emulated, and slowly), fp32 below
that and on CPU. A user may force any of them (`--precision`); forcing bf16 or fp16 on a CPU
runs CPU autocast, which is mostly useful for checking a recipe before it goes to a GPU.

`LossScaler` wraps `torch.amp.GradScaler`. The NoNN loss is large at the start (activation
transfer weighs a squared distance by beta = 1e3..1e4, so the first losses are 10..1000), and
GradScaler's default first scale of 2**16 then overflows fp16 gradients: it skips steps until
the scale has halved far enough, which can be a whole short epoch. The first scale is instead
chosen from the first loss, and skipped steps are counted so that they can be reported.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["PRECISIONS", "Precision", "LossScaler", "choose_precision", "synchronize"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Below this, fp16 gradients of a loss with this scale stayed finite in every case we measured
# (the first overflow came at loss * scale of 1e5 to 1e6).
_SCALED_LOSS_TARGET = 2.0**15
_MAX_INITIAL_SCALE = 2.0**16  # GradScaler's own default

log = logging.getLogger(__name__)


def _capability(device: torch.device) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def choose_precision(
    requested: str,
    device: torch.device,
    capability: Callable[[torch.device], tuple[int, int]] = _capability,
) -> str:
    """The precision to train in on `device`: `requested`, or for "auto" the device's best.

    `capability` answers a CUDA device's (major, minor) compute capability; it is asked about
    `device` itself (cuda:1 is not the current device cuda:0).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r}: expected one of {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        return "fp32" if requested == "auto" else requested
    major, minor = capability(device)
    if requested == "auto":
        return "bf16" if major >= 8 else "fp16" if major >= 7 else "fp32"
    if requested == "bf16" and major < 8:
        log.warning("bf16 on %s (compute capability %d.%d) is emulated and slow; fp16 (--precision fp16) is the fast "
                    "choice there", device, major, minor)
    return requested


@dataclass
class Precision:
    """A chosen precision on a device: its autocast context and, for fp16, its loss scaler."""

    name: str  # fp32, bf16, fp16
    device: torch.device

    @classmethod
    def for_device(cls, requested: str, device: torch.device) -> "Precision":
        return cls(choose_precision(requested, device), device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.name])

    def loss_scaler(self) -> "LossScaler | None":
        """A LossScaler for fp16 (its gradients overflow without one); None otherwise."""
        return LossScaler(self.device.type) if self.name == "fp16" else None


class LossScaler:
    """fp16 loss scaling that starts from a scale the first loss fits, counting skipped steps.

    `step(loss, optimizer)` does backward, the (possibly skipped) optimizer step and the scale
    update; `take_skipped()` returns the steps skipped since it was last called. GradScaler
    already reads its overflow flag on the host every step, so reading the scale adds no wait.
    """

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self._scaler: torch.amp.GradScaler | None = None
        self._scale = 0.0
        self._skipped = 0

    @staticmethod
    def initial_scale(loss: float) -> float:
        """The largest power of two (at most 2**16) that keeps loss * scale under 2**15."""
        if not math.isfinite(loss) or loss <= 0:
            return _MAX_INITIAL_SCALE
        return min(_MAX_INITIAL_SCALE, 2.0 ** max(0, math.floor(math.log2(_SCALED_LOSS_TARGET / loss))))

    def _ensure(self, loss: Tensor) -> torch.amp.GradScaler:
        if self._scaler is None:
            self._scaler = torch.amp.GradScaler(self.device_type, init_scale=self.initial_scale(float(loss.detach())))
            self._scale = self._scaler.get_scale()
        return self._scaler

    def step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        scaler = self._ensure(loss)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scale = scaler.get_scale()
        if scale < self._scale:
            self._skipped += 1
        self._scale = scale

    @property
    def scale(self) -> float:
        return self._scale

    def take_skipped(self) -> int:
        skipped, self._skipped = self._skipped, 0
        return skipped

    def state_dict(self) -> dict[str, float] | None:
        return self._scaler.state_dict() if self._scaler is not None else None

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._scaler = torch.amp.GradScaler(self.device_type)
        self._scaler.load_state_dict(state)
        self._scale = self._scaler.get_scale()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read after it includes that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
