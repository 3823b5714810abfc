"""partition.json: the partitioner's artifact ("format": "nonn.partition/1").

Fields: layer (module name in the teacher, or null), num_filters (C), num_students (K),
groups (K lists of teacher filter indices, ascending; group k feeds student k), group_sizes,
strategy, params (every parameter used: top_k, percentile, resolution, tolerance, ...),
modularity (of the Louvain communities on the thresholded FAN; null when no edge survives),
coverage (fraction of the C filters that are in some group), seed, teacher (fingerprint,
arch, ... or null), stats (threshold, edges kept, isolated filters, community sizes, ...),
data (the data set the activations came from: dataset, data_dir, image_size; or null) and
input_contract (how images were normalised for the teacher, nonn.runtime.input_contract; or
null), which `nonn train-students` reuses.
Validated on load: a bad file raises ArtifactError naming the path and the problem.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nonn.artifacts import ArtifactError, atomic_write_json, read_json_artifact
from nonn.runtime.input_contract import InputContract

__all__ = ["PARTITION_FORMAT", "Partition"]

PARTITION_FORMAT = "nonn.partition/1"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Partition:
    """K disjoint groups of a teacher layer's filters, and how they were found."""

    num_filters: int
    groups: list[list[int]]
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)
    modularity: float | None = None
    seed: int = 0
    layer: str | None = None
    teacher: dict[str, Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] | None = None
    input_contract: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.groups = [sorted(int(f) for f in g) for g in self.groups]
        problems = self.problems()
        if problems:
            raise ValueError("invalid partition: " + "; ".join(problems))

    @property
    def num_students(self) -> int:
        return len(self.groups)

    @property
    def group_sizes(self) -> list[int]:
        return [len(g) for g in self.groups]

    @property
    def coverage(self) -> float:
        """Fraction of the layer's filters that some student imitates."""
        return sum(self.group_sizes) / self.num_filters

    @property
    def unused_filters(self) -> list[int]:
        used = {f for g in self.groups for f in g}
        return [f for f in range(self.num_filters) if f not in used]

    def problems(self) -> list[str]:
        """What is wrong with the groups (empty when they are K >= 1 disjoint, non-empty
        lists of indices in [0, num_filters))."""
        out: list[str] = []
        if not _is_int(self.num_filters) or self.num_filters < 1:
            return [f"num_filters must be a positive integer, got {self.num_filters!r}"]
        if not self.groups:
            return ["groups is empty; expected one list of filter indices per student"]
        seen: dict[int, int] = {}
        for k, group in enumerate(self.groups):
            if not group:
                out.append(f"group {k} is empty")
            for f in group:
                if not 0 <= f < self.num_filters:
                    out.append(f"group {k} has filter {f}, outside [0, {self.num_filters})")
                elif f in seen:
                    out.append(f"filter {f} is in groups {seen[f]} and {k}; groups must be disjoint")
                else:
                    seen[f] = k
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {
            "format": PARTITION_FORMAT,
            "layer": self.layer,
            "num_filters": self.num_filters,
            "num_students": self.num_students,
            "groups": data["groups"],
            "group_sizes": self.group_sizes,
            "strategy": self.strategy,
            "params": data["params"],
            "modularity": self.modularity,
            "coverage": self.coverage,
            "seed": self.seed,
            "teacher": data["teacher"],
            "stats": data["stats"],
            "data": data["data"],
            "input_contract": data["input_contract"],
        }

    @property
    def contract(self) -> InputContract | None:
        """The input contract the teacher ran under, when recorded."""
        return None if self.input_contract is None else InputContract.from_dict(self.input_contract, "partition")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write partition.json atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "partition") -> "Partition":
        """Build from a parsed partition.json, raising ArtifactError on any inconsistency."""
        if data.get("format") != PARTITION_FORMAT:
            raise ArtifactError(f"{source}: format is {data.get('format')!r}, expected {PARTITION_FORMAT!r}")
        for key in ("num_filters", "groups", "strategy"):
            if key not in data:
                raise ArtifactError(f"{source}: missing field {key!r}")
        groups = data["groups"]
        if not isinstance(groups, list) or not all(
            isinstance(g, list) and all(_is_int(f) for f in g) for g in groups
        ):
            raise ArtifactError(f"{source}: groups must be a list of lists of integer filter indices")
        try:
            part = cls(
                num_filters=data["num_filters"],
                groups=groups,
                strategy=data["strategy"],
                params=dict(data.get("params") or {}),
                modularity=data.get("modularity"),
                seed=data.get("seed", 0),
                layer=data.get("layer"),
                teacher=data.get("teacher"),
                stats=dict(data.get("stats") or {}),
                data=data.get("data"),
                input_contract=data.get("input_contract"),
            )
        except ValueError as exc:
            raise ArtifactError(f"{source}: {exc}") from exc
        checks = {
            "num_students": part.num_students,
            "group_sizes": part.group_sizes,
        }
        if part.input_contract is not None:
            InputContract.from_dict(part.input_contract, source)  # ArtifactError when malformed
        for key, expected in checks.items():
            if key in data and data[key] != expected:
                raise ArtifactError(f"{source}: {key} is {data[key]!r} but the groups give {expected!r}")
        if "coverage" in data and (
            not isinstance(data["coverage"], (int, float)) or abs(data["coverage"] - part.coverage) > 1e-9
        ):
            raise ArtifactError(f"{source}: coverage is {data['coverage']!r} but the groups give {part.coverage!r}")
        return part

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Partition":
        """Read and validate partition.json."""
        data = read_json_artifact(path, PARTITION_FORMAT)
        return cls.from_dict(data, source=str(path))
