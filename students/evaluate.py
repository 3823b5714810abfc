"""Accuracy of a student ensemble, whole and with devices missing, and of its teacher.

Each student runs once per test image; every "device lost" figure then comes from re-applying
the (cheap) linear head to the stored pooled vectors with that student's vector zeroed, which is
exactly what the aggregator does when a device does not answer.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "EvaluationReport",
    "collect_pooled",
    "masked_accuracy",
    "missing_accuracies",
    "evaluate_ensemble",
    "model_accuracy",
    "evaluate_students",
    "student_name",
]


def student_name(k: int) -> str:
    """The name a student has everywhere (bundle, servers, reports)."""
    return f"student_{k}"


@dataclass
class EvaluationReport:
    """Ensemble accuracy (fraction in [0, 1]) and accuracy with one or two students missing."""

    accuracy: float
    num_images: int
    num_students: int
    missing_one: dict[str, float] = field(default_factory=dict)  # "student_k" -> accuracy without it
    missing_two: dict[str, float] = field(default_factory=dict)  # "student_i+student_j" -> accuracy
    teacher_accuracy: float | None = None

    @property
    def worst_missing_one(self) -> float | None:
        return min(self.missing_one.values()) if self.missing_one else None

    @property
    def mean_missing_one(self) -> float | None:
        return sum(self.missing_one.values()) / len(self.missing_one) if self.missing_one else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["worst_missing_one"] = self.worst_missing_one
        out["mean_missing_one"] = self.mean_missing_one
        return out

    def summary(self) -> str:
        lines = [f"ensemble accuracy: {100 * self.accuracy:.2f}% on {self.num_images} images ({self.num_students} students)"]
        if self.teacher_accuracy is not None:
            lines.append(f"teacher accuracy:  {100 * self.teacher_accuracy:.2f}%")
        for name, acc in self.missing_one.items():
            lines.append(f"without {name}: {100 * acc:.2f}%")
        for name, acc in self.missing_two.items():
            lines.append(f"without {name.replace('+', ' and ')}: {100 * acc:.2f}%")
        return "\n".join(lines)


def _batches(loader: Iterable[tuple[Tensor, Tensor]], progress: bool, desc: str) -> Iterable[tuple[Tensor, Tensor]]:
    if not progress:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, leave=False, total=len(loader) if hasattr(loader, "__len__") else None)


@torch.no_grad()
def collect_pooled(
    ensemble: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[list[Tensor], Tensor]:
    """Each student's pooled vectors over the loader (list of K (N, |P_k|) CPU tensors) and labels."""
    was_training = ensemble.training
    ensemble.eval()
    per_student: list[list[Tensor]] = [[] for _ in ensemble.students]
    labels = []
    try:
        for x, y in _batches(loader, progress, "evaluate"):
            x = x.to(device, non_blocking=True)
            for k, student in enumerate(ensemble.students):
                per_student[k].append(student(x).float().cpu())
            labels.append(y.cpu())
    finally:
        ensemble.train(was_training)
    if not labels:
        raise ValueError("evaluation data is empty")
    return [torch.cat(chunks) for chunks in per_student], torch.cat(labels)


@torch.no_grad()
def masked_accuracy(head: nn.Module, pooled: Sequence[Tensor], labels: Tensor, present: Sequence[bool] | None = None) -> float:
    """Accuracy of the head over stored pooled vectors, absent students' vectors zeroed."""
    head_device = next(head.parameters()).device
    vectors = [v if present is None or present[k] else torch.zeros_like(v) for k, v in enumerate(pooled)]
    logits = head(torch.cat(vectors, dim=1).to(head_device)).cpu()
    return int((logits.argmax(dim=1) == labels).sum().item()) / len(labels)


def missing_accuracies(
    head: nn.Module, pooled: Sequence[Tensor], labels: Tensor, pairs: bool
) -> tuple[dict[str, float], dict[str, float]]:
    """Accuracy with each single student missing, and (if pairs) each pair missing."""
    k = len(pooled)
    one: dict[str, float] = {}
    two: dict[str, float] = {}
    if k < 2:
        return one, two
    for i in range(k):
        present = [j != i for j in range(k)]
        one[student_name(i)] = masked_accuracy(head, pooled, labels, present)
    if pairs and k >= 3:
        for i, j in itertools.combinations(range(k), 2):
            present = [m not in (i, j) for m in range(k)]
            two[f"{student_name(i)}+{student_name(j)}"] = masked_accuracy(head, pooled, labels, present)
    return one, two


def evaluate_ensemble(
    ensemble: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: str | torch.device = "cpu",
    pairs: bool | None = None,
    progress: bool = False,
) -> EvaluationReport:
    """Ensemble accuracy plus each single student missing (and each pair when K >= 4 by default)."""
    pooled, labels = collect_pooled(ensemble, loader, device, progress)
    k = len(pooled)
    one, two = missing_accuracies(ensemble.head, pooled, labels, pairs=(k >= 4) if pairs is None else pairs)
    return EvaluationReport(masked_accuracy(ensemble.head, pooled, labels), len(labels), k, one, two)


@torch.no_grad()
def model_accuracy(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], device: str | torch.device = "cpu", progress: bool = False
) -> float:
    """Top-1 accuracy of any classifier returning logits (e.g. the teacher)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in _batches(loader, progress, "teacher"):
            logits = model(x.to(device, non_blocking=True))
            correct += int((logits.argmax(dim=1).cpu() == y).sum().item())
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("evaluation data is empty")
    return correct / total


def evaluate_students(
    students_path: str,
    dataset: str | None = None,
    data_dir: str | None = None,
    teacher: str | None = None,
    teacher_factory: str | None = None,
    weights: str | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    limit: int | None = None,
    pairs: bool | None = None,
    progress: bool = True,
    image_size: Any = None,
    normalize: Any = None,
) -> EvaluationReport:
    """Load a students checkpoint, evaluate it on a data set's test split (and the teacher, if given).

    The data set defaults to the one the checkpoint records; images are normalised as the
    students were trained (the checkpoint's input contract). The teacher gets `normalize`
    when given, else what its checkpoint records, else the students' contract."""
    from nonn.students.data import resolve_data
    from nonn.students.loader import make_loader
    from nonn.students.normalization import Recorded, teacher_contract
    from nonn.students.teacher import resolve_device
    from nonn.students.train import load_students
    from nonn.students.train_setup import check_dataset_matches

    dev = resolve_device(device)
    loaded = load_students(students_path, map_location="cpu")
    recorded = [(loaded.meta.get("dataset"), students_path), (loaded.meta.get("config"), students_path)]
    data = resolve_data(dataset, data_dir, image_size, recorded)
    check_dataset_matches(loaded.meta.get("dataset") or {}, data, what=f"students checkpoint {students_path}")
    contract = loaded.contract
    loader = make_loader(data, "test", batch_size=batch_size, train=False, limit=limit, contract=contract)
    ensemble = loaded.ensemble.to(dev)
    report = evaluate_ensemble(ensemble, loader, dev, pairs=pairs, progress=progress)
    if teacher is not None or teacher_factory is not None:
        from nonn.students.teacher_loading import load_teacher

        loaded_teacher = load_teacher(teacher, factory=teacher_factory, weights=weights, map_location="cpu")
        teacher_in = teacher_contract(normalize, data, loaded_teacher, [Recorded(contract, f"students checkpoint {students_path}")], device=dev)
        teacher_loader = loader if teacher_in.same_normalization(contract) else make_loader(
            data, "test", batch_size=batch_size, train=False, limit=limit, contract=teacher_in)
        report.teacher_accuracy = model_accuracy(loaded_teacher.model.to(dev), teacher_loader, dev, progress)
    return report
