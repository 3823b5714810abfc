"""What the aggregator calls: each student's model name and tensors, the head, the endpoints."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from nonn.runtime.checks import at_least
from nonn.runtime.datatypes import TensorSpec

__all__ = ["StudentRoute", "EnsembleSpec", "parse_endpoints"]


@dataclass(frozen=True)
class StudentRoute:
    """What the aggregator needs to call one student: its model name, tensor specs and, when
    known, the sha256 of its model file (to confirm a device serves this very model)."""

    name: str
    input: TensorSpec
    output: TensorSpec
    sha256: str | None = None

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
        routes = tuple(StudentRoute(s.name, s.input, s.output, s.sha256) for s in bundle.students)
        return cls(routes, Path(bundle.path_of(bundle.head)), bundle.head.sha256, tuple(bundle.class_names))


def parse_endpoints(
    endpoints: str | Sequence[str] | Mapping[str, str | Sequence[str]], names: Sequence[str], replicas: int = 1
) -> list[str]:
    """`replicas` "host:port" per student, student by student (student 0's replicas first).

    From a comma list, a list, or {student name: endpoint or list of endpoints}.
    """
    at_least(1, replicas=replicas)
    if isinstance(endpoints, str):
        endpoints = [e.strip() for e in endpoints.split(",") if e.strip()]
    if isinstance(endpoints, Mapping):
        missing = [n for n in names if n not in endpoints]
        if missing:
            raise ValueError(f"no endpoint for student(s) {missing}; got endpoints for {sorted(endpoints)}")
        flat: list[str] = []
        for n in names:
            given = endpoints[n]
            given = [given] if isinstance(given, str) else list(given)
            if len(given) != replicas:
                raise ValueError(f"student {n}: {len(given)} endpoint(s), expected {replicas} (one per replica)")
            flat += given
        endpoints = flat
    endpoints = list(endpoints)
    if len(endpoints) != len(names) * replicas:
        each = "one host:port per student" if replicas == 1 else f"{replicas} host:port per student (its replicas)"
        raise ValueError(
            f"{len(endpoints)} device endpoint(s) for {len(names)} students ({', '.join(names)}); "
            f"give {each}, in student order"
        )
    for endpoint in endpoints:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"device endpoint {endpoint!r} is not host:port (e.g. 192.168.1.20:8001)")
    return endpoints
