"""What the aggregator calls: each student's model name and tensors, the head, the endpoints."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from nonn.runtime.datatypes import TensorSpec

__all__ = ["StudentRoute", "EnsembleSpec", "parse_endpoints"]


@dataclass(frozen=True)
class StudentRoute:
    """What the aggregator needs to call one student: its model name and tensor specs."""

    name: str
    input: TensorSpec
    output: TensorSpec

    @property
    def feature_size(self) -> int:
        return self.output.shape[-1]


@dataclass(frozen=True)
class EnsembleSpec:
    """The students (in group order) and the head model: everything taken from a bundle."""

    students: tuple[StudentRoute, ...]
    head_path: Path
    head_sha256: str | None = None
    class_names: tuple[str, ...] = ()

    @classmethod
    def from_bundle(cls, bundle: Any) -> "EnsembleSpec":
        """From a nonn.runtime.bundle.Bundle (or a path to one)."""
        if isinstance(bundle, (str, os.PathLike)):
            from nonn.runtime.bundle import Bundle

            bundle = Bundle.load(bundle)
        routes = tuple(StudentRoute(s.name, s.input, s.output) for s in bundle.students)
        return cls(routes, Path(bundle.path_of(bundle.head)), bundle.head.sha256, tuple(bundle.class_names))


def parse_endpoints(endpoints: str | Sequence[str] | Mapping[str, str], names: Sequence[str]) -> list[str]:
    """One "host:port" per student, in student order, from a comma list, a list or {name: endpoint}."""
    if isinstance(endpoints, str):
        endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
    if isinstance(endpoints, Mapping):
        missing = [n for n in names if n not in endpoints]
        if missing:
            raise ValueError(f"no endpoint for student(s) {missing}; got endpoints for {sorted(endpoints)}")
        endpoints = [endpoints[n] for n in names]
    endpoints = list(endpoints)
    if len(endpoints) != len(names):
        raise ValueError(
            f"{len(endpoints)} device endpoint(s) for {len(names)} students ({', '.join(names)}); "
            "give one host:port per student, in student order"
        )
    for endpoint in endpoints:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"device endpoint {endpoint!r} is not host:port (e.g. 192.168.1.20:8001)")
    return endpoints
