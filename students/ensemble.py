"""The NoNN student ensemble: K independent students and the one linear head that joins them.

Student k is a backbone from the model registry, ending in a 1x1 "bridge" convolution to
|P_k| channels + BN + ReLU, resized to the teacher's final spatial size (NONN.md section 3).
Its deployable forward returns the global-average-pooled vector of those |P_k| channels:
that vector is all a device ever sends. The head concatenates the K vectors in group order
and applies one nn.Linear; it is the only part that runs on the aggregating node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nonn.students.models import count_parameters, create_model

__all__ = [
    "StudentSpec",
    "Student",
    "StudentEnsemble",
    "parse_arch_list",
    "sample_presence",
    "build_ensemble",
    "ensemble_from_specs",
    "EnsembleOutput",
]


@dataclass
class StudentSpec:
    """Everything needed to rebuild one student: backbone arch, feature size, output map size."""

    backbone: dict[str, Any]  # a models.create_model(**backbone) spec (name, num_classes, in_channels, kwargs)
    feature_size: int  # |P_k|: channels of the bridge, floats the device sends
    out_hw: tuple[int, int]  # the teacher's final spatial size

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": dict(self.backbone), "feature_size": int(self.feature_size), "out_hw": list(self.out_hw)}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "StudentSpec":
        try:
            return cls(dict(obj["backbone"]), int(obj["feature_size"]), (int(obj["out_hw"][0]), int(obj["out_hw"][1])))
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"malformed student spec {obj!r}: {exc}") from exc


def _strip_classifier(backbone: nn.Module) -> None:
    """Drop the backbone's own classifier: a student only uses forward_features."""
    if hasattr(backbone, "reset_classifier"):
        backbone.reset_classifier(0)
    elif isinstance(getattr(backbone, "fc", None), nn.Linear):
        backbone.fc = nn.Identity()


def _resize(x: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """Resize a feature map to out_hw: identity, average pooling by an integer factor, or bilinear.

    Integer-factor pooling and bilinear interpolation both export to ONNX with static shapes.
    """
    h, w = x.shape[-2:]
    oh, ow = out_hw
    if (h, w) == (oh, ow):
        return x
    if h >= oh and w >= ow and h % oh == 0 and w % ow == 0:
        return F.avg_pool2d(x, kernel_size=(h // oh, w // ow))
    return F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)


class Student(nn.Module):
    """One device's network: backbone -> 1x1 bridge to |P_k| channels + BN + ReLU -> resize -> pool.

    `forward(x)` returns the pooled (N, |P_k|) vector the device sends; `feature_map(x)` the
    (N, |P_k|, H_t, W_t) map before pooling, used by spatial attention transfer.
    """

    def __init__(self, spec: StudentSpec) -> None:
        super().__init__()
        if spec.feature_size < 1:
            raise ValueError(f"a student needs at least one output feature, got {spec.feature_size}")
        self.spec = spec
        self.backbone = create_model(**spec.backbone)
        _strip_classifier(self.backbone)
        self.bridge = nn.Conv2d(self.backbone.num_features, spec.feature_size, kernel_size=1, bias=False)
        self.bridge_bn = nn.BatchNorm2d(spec.feature_size)
        self.act = nn.ReLU()
        nn.init.kaiming_normal_(self.bridge.weight, mode="fan_out", nonlinearity="relu")
        self.feature_size = spec.feature_size
        self.out_hw = tuple(spec.out_hw)

    def feature_map(self, x: Tensor) -> Tensor:
        out = self.act(self.bridge_bn(self.bridge(self.backbone.forward_features(x))))
        return _resize(out, self.out_hw)

    def forward(self, x: Tensor) -> Tensor:
        return self.feature_map(x).mean(dim=(2, 3))

    def num_parameters(self) -> int:
        return count_parameters(self)


def sample_presence(batch: int, num_students: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample student dropout mask, (batch, K) bool: True = the student's features are kept.

    Each student of each sample is dropped independently with probability p; a sample whose
    draw drops every student gets one student (chosen uniformly) back, so no sample ever loses
    all K. With K = 1 nothing is ever dropped.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"student dropout must lie in [0, 1), got {p}")
    if p == 0.0 or num_students == 1:
        return torch.ones(batch, num_students, dtype=torch.bool)
    keep = torch.rand(batch, num_students, generator=generator) >= p
    rescue = torch.randint(num_students, (batch,), generator=generator)
    none_kept = ~keep.any(dim=1)
    keep[none_kept, rescue[none_kept]] = True
    return keep


@dataclass
class EnsembleOutput:
    """What one training forward produces: logits and each student's pooled vector and map."""

    logits: Tensor
    pooled: list[Tensor] = field(default_factory=list)
    maps: list[Tensor] = field(default_factory=list)


class StudentEnsemble(nn.Module):
    """K students plus one head: logits = head(cat(student_k(x) for k in group order))."""

    def __init__(self, students: Sequence[Student], groups: Sequence[Sequence[int]], num_classes: int) -> None:
        super().__init__()
        if len(students) != len(groups):
            raise ValueError(f"{len(students)} students but {len(groups)} filter groups")
        if not students:
            raise ValueError("an ensemble needs at least one student")
        for k, (student, group) in enumerate(zip(students, groups)):
            if student.feature_size != len(group):
                raise ValueError(f"student {k} outputs {student.feature_size} features but its group has {len(group)} filters")
        self.students = nn.ModuleList(students)
        self.groups = [list(map(int, g)) for g in groups]
        self.num_classes = int(num_classes)
        self.head = nn.Linear(sum(len(g) for g in self.groups), self.num_classes)

    @property
    def num_students(self) -> int:
        return len(self.students)

    @property
    def feature_sizes(self) -> list[int]:
        return [len(g) for g in self.groups]

    def apply_head(self, pooled: Sequence[Tensor], present: Tensor | None = None) -> Tensor:
        """Head over the K pooled vectors; absent students (present False) contribute zeros.

        `present` is (K,) for the whole batch or (N, K) per sample.
        """
        if present is not None:
            present = present.to(device=pooled[0].device, dtype=torch.bool)
            if present.dim() == 1:
                present = present.unsqueeze(0).expand(pooled[0].shape[0], -1)
            if present.shape != (pooled[0].shape[0], len(pooled)):
                raise ValueError(f"presence mask of shape {tuple(present.shape)}, expected (K,) or (N, K) with K = {len(pooled)}")
            pooled = [v * present[:, k : k + 1].to(v.dtype) for k, v in enumerate(pooled)]
        return self.head(torch.cat(list(pooled), dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.apply_head([student(x) for student in self.students])

    def forward_with_mask(self, x: Tensor, present: Tensor) -> Tensor:
        """Logits when only the students marked present answer (as after losing devices)."""
        return self.apply_head([student(x) for student in self.students], present)

    def forward_train(self, x: Tensor, present: Tensor | None = None, need_maps: bool = False) -> EnsembleOutput:
        """Logits (with the dropout mask applied) plus every student's unmasked pooled vector/map."""
        maps = [student.feature_map(x) for student in self.students]
        pooled = [m.mean(dim=(2, 3)) for m in maps]
        return EnsembleOutput(self.apply_head(pooled, present), pooled, maps if need_maps else [])

    def specs(self) -> list[StudentSpec]:
        return [student.spec for student in self.students]

    def params_per_student(self) -> list[int]:
        return [student.num_parameters() for student in self.students]

    def head_parameters(self) -> int:
        return count_parameters(self.head)


_OPTION_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.+)$")


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_arch_list(text: str | Sequence[str], num_students: int) -> list[tuple[str, dict[str, Any]]]:
    """Parse `--arch`: one spec for all students or a comma list with one per student.

    A spec is a registry name with optional `:key=value` options, e.g. `wrn-10-1:width=8`.
    """
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    if not items or any(not s for s in items):
        raise ValueError(f"--arch {text!r}: expected a model name or a comma list of them")
    if len(items) == 1:
        items = items * num_students
    if len(items) != num_students:
        raise ValueError(f"--arch lists {len(items)} architectures but the partition has {num_students} groups (give 1 or {num_students})")
    parsed = []
    for item in items:
        name, *options = item.split(":")
        kwargs: dict[str, Any] = {}
        for opt in options:
            match = _OPTION_RE.match(opt)
            if not match:
                raise ValueError(f"--arch {item!r}: option {opt!r} is not key=value")
            kwargs[match.group(1)] = _parse_value(match.group(2))
        parsed.append((name, kwargs))
    return parsed


def build_ensemble(
    archs: Sequence[tuple[str, dict[str, Any]]],
    groups: Sequence[Sequence[int]],
    num_classes: int,
    in_channels: int,
    out_hw: tuple[int, int],
) -> StudentEnsemble:
    """A fresh ensemble: student k is archs[k] bridged to len(groups[k]) channels at out_hw."""
    students = []
    for (name, kwargs), group in zip(archs, groups):
        backbone = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "kwargs": dict(kwargs)}
        students.append(Student(StudentSpec(backbone, len(group), (int(out_hw[0]), int(out_hw[1])))))
    return StudentEnsemble(students, groups, num_classes)


def ensemble_from_specs(specs: Sequence[StudentSpec], groups: Sequence[Sequence[int]], num_classes: int) -> StudentEnsemble:
    """Rebuild an ensemble's structure from saved specs (weights are loaded separately)."""
    return StudentEnsemble([Student(spec) for spec in specs], groups, num_classes)
