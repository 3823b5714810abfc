"""Which input contract a teacher gets: stated (`--normalize`), recorded by an artifact, or found.

`resolve_contract` is the one place every command that runs a teacher decides how images are
normalised for it: an explicit `--normalize` wins (with a warning when an artifact recorded
something else); otherwise the first contract an artifact recorded (teacher checkpoint,
partition.json, students checkpoint); otherwise, or with `--normalize auto`, the teacher is
scored on a few hundred labelled training images under each candidate (the data set's
statistics, none, ImageNet's) and the best is chosen: the highest accuracy, and among equal
accuracies (an easy data set can give 100 % under two) the lowest cross-entropy. Every score is logged with the choice;
when even the best is near chance the teacher cannot be used as it is, and that is an error
naming what was tried and what is likely wrong.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from nonn.runtime.input_contract import InputContract, NormalizeSpec, contract_for, normalization_candidates
from nonn.students.data import DatasetInfo

if TYPE_CHECKING:
    from nonn.students.teacher_loading import LoadedTeacher

__all__ = ["AUTO_IMAGES", "Recorded", "resolve_contract", "teacher_contract", "score_contracts", "near_chance_threshold"]

log = logging.getLogger(__name__)

AUTO_IMAGES = 512  # labelled training images each candidate is scored on


@dataclass(frozen=True)
class Recorded:
    """A contract an artifact recorded, and which artifact (for messages)."""

    contract: InputContract
    source: str


def near_chance_threshold(num_classes: int, images: int) -> float:
    """Accuracy below which a classifier is indistinguishable from guessing: chance plus three
    binomial standard errors on `images` images, and at least 5 points."""
    chance = 1.0 / max(num_classes, 1)
    return chance + max(0.05, 3.0 * math.sqrt(chance * (1.0 - chance) / max(images, 1)))


@torch.no_grad()
def score_contracts(
    model: nn.Module,
    data: DatasetInfo,
    candidates: Sequence[InputContract],
    *,
    images: int = AUTO_IMAGES,
    seed: int = 0,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
) -> tuple[list[float], list[float], int]:
    """Top-1 accuracy and mean cross-entropy of `model` on a seeded sample of training images
    under each candidate. Each batch is read once and normalised per candidate.

    Returns (accuracies, losses, images used)."""
    n = data.split_size("train")
    pick = np.sort(np.random.default_rng(seed).permutation(n)[: min(images, n)])
    labels = data.labels("train")
    correct = [0] * len(candidates)
    loss = [0.0] * len(candidates)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pick), batch_size):
            index = pick[start : start + batch_size]
            unit = candidates[0].to_unit(data.read("train", index))
            y = torch.from_numpy(labels[index])
            for k, contract in enumerate(candidates):
                logits = model(torch.from_numpy(contract.normalize_unit(unit)).to(device))
                if logits.dim() != 2 or logits.shape[1] != data.num_classes:
                    raise ValueError(
                        f"the teacher returns outputs of shape {tuple(logits.shape)}; data set {data.name!r} has "
                        f"{data.num_classes} classes, so (batch, {data.num_classes}) logits were expected"
                    )
                correct[k] += int((logits.argmax(dim=1).cpu() == y).sum())
                loss[k] += float(nn.functional.cross_entropy(logits.float().cpu(), y, reduction="sum"))
    finally:
        model.train(was_training)
    return [c / len(pick) for c in correct], [v / len(pick) for v in loss], len(pick)


def _auto(model: nn.Module, data: DatasetInfo, device: str | torch.device, what: str) -> InputContract:
    candidates = normalization_candidates(data.input_shape, data.mean, data.std)
    scores, losses, used = score_contracts(model, data, candidates, device=device)
    best = min(range(len(candidates)), key=lambda k: (-scores[k], losses[k], k))
    width = max(len(c.describe()) for c in candidates)
    lines = [
        f"  {c.describe():<{width}}  {100 * s:5.1f}%  loss {loss:7.4f}" + ("  <- chosen" if k == best else "")
        for k, (c, s, loss) in enumerate(zip(candidates, scores, losses))
    ]
    log.info("--normalize auto: %s accuracy on %d training images of %s under each input normalisation:\n%s",
             what, used, data.name, "\n".join(lines))
    threshold = near_chance_threshold(data.num_classes, used)
    if scores[best] < threshold:
        tried = ", ".join(f"{c.normalize} {100 * s:.1f}%" for c, s in zip(candidates, scores))
        classes = ", ".join(data.class_names[:4]) + (", ..." if data.num_classes > 4 else "")
        raise ValueError(
            f"{what} is near chance on {used} training images of {data.name} under every input normalisation tried "
            f"({tried}; chance is {100 / data.num_classes:.1f}%): check that the weights are the trained ones (--weights), "
            f"that the model is the one they were trained for (--teacher-factory), and that the data set's class order "
            f"({classes}) is the order of the teacher's outputs; if the teacher was trained on other normalised images, "
            "state their mean/std with --normalize MEAN,..:STD,.."
        )
    return candidates[best]


def resolve_contract(
    normalize: NormalizeSpec | str | None,
    data: DatasetInfo,
    model: nn.Module,
    recorded: Sequence[Recorded] = (),
    *,
    device: str | torch.device = "cpu",
    what: str = "the teacher",
) -> InputContract:
    """The input contract for `model` on `data` (see the module doc). `recorded` lists the
    contracts artifacts recorded, most authoritative first."""
    spec = NormalizeSpec(normalize) if isinstance(normalize, str) else normalize
    for r in recorded:
        if tuple(r.contract.input_shape) != tuple(data.input_shape):
            raise ValueError(
                f"{r.source} was made for images of shape {list(r.contract.input_shape)}, but data set {data.name!r} "
                f"has {list(data.input_shape)} (resize with --image-size H[,W])"
            )
    if spec is not None and spec.name != "auto":
        contract = contract_for(spec, data.input_shape, data.mean, data.std)
        for r in recorded:
            if not r.contract.same_normalization(contract):
                log.warning("--normalize %s overrides the input normalisation %s recorded in %s", spec, r.contract.describe(), r.source)
                break
        log.info("input normalisation: %s (--normalize)", contract.describe())
        return contract
    if spec is None and recorded:
        contract = recorded[0].contract
        log.info("input normalisation: %s, as recorded in %s", contract.describe(), recorded[0].source)
        return contract.with_datatype("FP32")
    chosen = _auto(model, data, device, what)
    if recorded and not recorded[0].contract.same_normalization(chosen):
        log.warning("--normalize auto chose %s, but %s records %s", chosen.normalize, recorded[0].source, recorded[0].contract.describe())
    return chosen


def teacher_contract(
    normalize: NormalizeSpec | str | None,
    data: DatasetInfo,
    teacher: "LoadedTeacher",
    recorded: Sequence[Recorded] = (),
    *,
    device: str | torch.device = "cpu",
) -> InputContract:
    """`resolve_contract` for a loaded teacher: what its own checkpoint recorded comes first."""
    own = [Recorded(teacher.contract, f"teacher checkpoint {teacher.source}")] if teacher.contract is not None else []
    return resolve_contract(normalize, data, teacher.model, [*own, *recorded], device=device, what=f"teacher {teacher.source}")
