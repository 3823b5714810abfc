"""The NoNN training losses, one small module each (NONN.md section 3).

- `KDLoss`: Hinton knowledge distillation, alpha * T^2 * KL(teacher || student) plus
  (1 - alpha) * cross-entropy with the labels.
- `CrossEntropy`: plain cross-entropy, for runs without a teacher signal.
- `PooledActivationTransfer`: the prototype's activation transfer on pooled vectors.
- `SpatialAttentionTransfer`: Zagoruyko & Komodakis attention transfer, one term per student.

Every module returns a scalar tensor averaged over the batch, so the terms can be logged and
summed as they are.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KDLoss",
    "CrossEntropy",
    "PooledActivationTransfer",
    "SpatialAttentionTransfer",
    "attention_map",
    "make_transfer_loss",
    "DEFAULT_BETA",
]

# beta per activation-transfer form, as NONN.md gives them.
DEFAULT_BETA = {"pooled": 1e4, "spatial": 1e3}


class KDLoss(nn.Module):
    """alpha * kl_scale * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y).

    The KL divergence is the true per-sample KL averaged over the batch ("batchmean").
    `kl_scale` is 1 for the textbook form; the authors' prototype multiplies the KL term by
    2 * alpha * T^2, which is `kl_scale=2` (or `KDLoss.prototype()`).
    """

    def __init__(self, alpha: float = 0.9, temperature: float = 4.0, kl_scale: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"KD alpha must lie in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"KD temperature must be positive, got {temperature}")
        if kl_scale <= 0:
            raise ValueError(f"KD kl_scale must be positive, got {kl_scale}")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.kl_scale = float(kl_scale)

    @classmethod
    def prototype(cls, alpha: float = 0.9, temperature: float = 4.0) -> "KDLoss":
        """The authors' weighting: KL term times 2 * alpha * T^2."""
        return cls(alpha=alpha, temperature=temperature, kl_scale=2.0)

    def kl_term(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """T^2 * KL(teacher || student) at temperature T, averaged over the batch (unweighted)."""
        t = self.temperature
        log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
        return kl * (t * t)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        kd = self.kl_term(student_logits, teacher_logits)
        ce = F.cross_entropy(student_logits.float(), target)
        return self.alpha * self.kl_scale * kd + (1.0 - self.alpha) * ce


class CrossEntropy(nn.Module):
    """Cross-entropy with the labels (mean over the batch); the teacher's logits are ignored."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor | None = None, target: Tensor | None = None) -> Tensor:
        if target is None:
            raise ValueError("CrossEntropy needs the target labels")
        return F.cross_entropy(student_logits.float(), target)


def _l2_normalize_rows(x: Tensor) -> Tensor:
    return F.normalize(x.float().flatten(1), p=2, dim=1, eps=1e-12)


class PooledActivationTransfer(nn.Module):
    """beta * mean((n(S) - n(T_P))^2): the prototype's activation transfer.

    S is the (N, F) concatenation of the students' pooled outputs in group order, T_P the
    teacher's pooled final-layer channels taken in the same (partition) order, n() a per-sample
    L2 normalisation over the F features; the mean runs over all N * F entries.
    """

    def __init__(self, beta: float = DEFAULT_BETA["pooled"]) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"activation-transfer beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def forward(self, student_pooled: Tensor, teacher_pooled: Tensor) -> Tensor:
        if student_pooled.shape != teacher_pooled.shape:
            raise ValueError(
                f"pooled student features {tuple(student_pooled.shape)} and teacher channels "
                f"{tuple(teacher_pooled.shape)} differ in shape"
            )
        diff = _l2_normalize_rows(student_pooled) - _l2_normalize_rows(teacher_pooled)
        return self.beta * diff.pow(2).mean()


def attention_map(feature_map: Tensor) -> Tensor:
    """Zagoruyko & Komodakis spatial attention: L2-normalised mean over channels of x^2, (N, H*W)."""
    if feature_map.dim() != 4:
        raise ValueError(f"attention_map expects an (N, C, H, W) map, got shape {tuple(feature_map.shape)}")
    return _l2_normalize_rows(feature_map.float().pow(2).mean(dim=1))


class SpatialAttentionTransfer(nn.Module):
    """beta * sum_k mean((at(S_k) - at(T_Pk))^2): attention transfer, one term per student.

    S_k is student k's feature map (resized to the teacher's spatial size), T_Pk the teacher's
    final map restricted to the channels of group k. The per-student terms are summed, as
    attention transfer sums its per-layer terms.
    """

    def __init__(self, beta: float = DEFAULT_BETA["spatial"]) -> None:
        super().__init__()
        if beta < 0:
            raise ValueError(f"activation-transfer beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def forward(self, student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> Tensor:
        if len(student_maps) != len(teacher_maps):
            raise ValueError(f"{len(student_maps)} student maps but {len(teacher_maps)} teacher maps")
        if not student_maps:
            raise ValueError("SpatialAttentionTransfer needs at least one student map")
        total = student_maps[0].new_zeros((), dtype=torch.float32)
        for k, (s, t) in enumerate(zip(student_maps, teacher_maps)):
            if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:]:
                raise ValueError(
                    f"student {k}: map {tuple(s.shape)} and teacher group map {tuple(t.shape)} "
                    "differ in batch or spatial size"
                )
            total = total + (attention_map(s) - attention_map(t)).pow(2).mean()
        return self.beta * total


def make_transfer_loss(form: str, beta: float | None = None) -> nn.Module | None:
    """The activation-transfer module for `form` ("pooled", "spatial", or "none" -> None)."""
    if form == "none":
        return None
    if form not in DEFAULT_BETA:
        raise ValueError(f"activation transfer form {form!r}: expected one of pooled, spatial, none")
    beta = DEFAULT_BETA[form] if beta is None else beta
    return PooledActivationTransfer(beta) if form == "pooled" else SpatialAttentionTransfer(beta)
