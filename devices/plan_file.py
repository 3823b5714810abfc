"""The placement plan artifact: `plan.json` ("format": "nonn.plan/2") as typed dataclasses.

`nonn plan` writes it and `nonn deploy` reads it. It says which device holds which student, in
the student order that `serve --aggregate --devices` and `infer --devices` take, what each
device is estimated to need (the memory that deployment files turn into limits), the fleet's
estimated cost, and the bundle it was made for (the sha256 of its manifest.json), so that a plan
is never applied to another bundle.

    format           "nonn.plan/2"
    bundle           manifest_sha256, path (as given to `nonn plan`), students (names, in order)
    placement[]      in student order: {student, devices: [device names]}; a list per student
                     so that a student can run on several devices
    devices[]        every device given to `nonn plan`, in that order: device (unique name),
                     profile, student (null: unused), threads, memory_mb (estimated need),
                     available_mb, compute_ms, bytes_per_inference {request, features,
                     between_devices, wire} (as nonn.runtime.traffic defines them), transfer_ms,
                     busy_ms, energy_mj
    nonn, teacher, model_parallel    estimates per inference (the last two null without a
                     teacher summary in the bundle)
    aggregator, head_ms, assumptions
    ratios, comparison               derived from the estimates (for readers; not read back)
    created, nonn_version            informational

Pure standard library: loading validates every field and raises ArtifactError naming the file
and the field; `Plan.check_bundle` raises PlanError naming both bundles.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nonn import __version__
from nonn.artifacts import ArtifactError, atomic_write_json, read_json_artifact, sha256_file
from nonn.runtime.traffic import FIELDS as BYTE_FIELDS
from nonn.runtime.traffic import LABELS as BYTE_LABELS
from nonn.runtime.traffic import UNIT as BYTE_UNIT
from nonn.runtime.traffic import BytesPerInference

__all__ = ["PLAN_FORMAT", "PlanError", "DevicePlan", "Estimate", "StudentPlacement", "BundleRef", "Plan", "load_plan"]

PLAN_FORMAT = "nonn.plan/2"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class PlanError(ValueError):
    """The students cannot be placed on the given devices, or a plan does not fit its use."""


@dataclass
class DevicePlan:
    """One device of the fleet and the student placed on it (None: unused)."""

    device: str
    profile: str
    student: str | None
    memory_mb: float
    available_mb: float
    compute_ms: float
    bytes_per_inference: BytesPerInference  # the image in, the feature vector back
    transfer_ms: float
    busy_ms: float
    energy_mj: float
    threads: int = 1  # the profile's cores, the server's --threads


@dataclass
class Estimate:
    """Whole-system figures of one way to run the model, per inference of one image."""

    name: str
    devices: int
    memory_per_device_mb: float  # the largest over devices, runtime included
    model_memory_per_device_mb: float  # the same without the runtime's own footprint
    bytes_per_inference: BytesPerInference  # request, features (logits for the teacher), between devices, wire
    latency_ms: float
    compute_ms: float
    energy_per_node_mj: float  # the largest over devices
    fits: bool
    note: str = ""


@dataclass
class StudentPlacement:
    """The devices that serve one student (one today; several when it is replicated)."""

    student: str
    devices: list[str]


@dataclass
class BundleRef:
    """The bundle a plan was made for: its manifest's sha256, where it was, its students."""

    manifest_sha256: str
    path: str
    students: list[str]

    @classmethod
    def of(cls, bundle: Any) -> "BundleRef | None":
        """The reference of a loaded Bundle; None when its manifest is not on disk (an in-memory bundle)."""
        manifest = Path(bundle.manifest_path)
        if not manifest.is_file():
            return None
        return cls(sha256_file(manifest), str(bundle.root), [s.name for s in bundle.students])


@dataclass
class Plan:
    """A placement and its estimated cost, with the teacher and model-parallel baselines."""

    devices: list[DevicePlan]
    nonn: Estimate
    teacher: Estimate | None
    model_parallel: Estimate | None
    aggregator: str
    head_ms: float
    assumptions: dict[str, Any] = field(default_factory=dict)
    placement: list[StudentPlacement] = field(default_factory=list)
    bundle: BundleRef | None = None
    created: str | None = None
    nonn_version: str | None = __version__

    def devices_of(self, student: str) -> list[str]:
        """The device names that serve `student` (KeyError naming the students when absent)."""
        for p in self.placement:
            if p.student == student:
                return list(p.devices)
        raise KeyError(f"the plan places no student {student!r}; it places {', '.join(p.student for p in self.placement)}")

    def device(self, name: str) -> DevicePlan:
        """A device row by its name."""
        for d in self.devices:
            if d.device == name:
                return d
        raise KeyError(f"the plan has no device {name!r}; it has {', '.join(d.device for d in self.devices)}")

    def check_bundle(self, bundle: Any, source: str = "the plan") -> None:
        """Raise PlanError unless this plan was made for `bundle` (a loaded Bundle), naming both."""
        if self.bundle is None:
            raise PlanError(f"{source} records no bundle; make it again with `nonn plan --bundle {bundle.root}`")
        mine = self.bundle
        theirs = BundleRef.of(bundle)
        if theirs is None or theirs.manifest_sha256 != mine.manifest_sha256:
            digest = theirs.manifest_sha256 if theirs else "none (no manifest.json on disk)"
            raise PlanError(
                f"{source} was made for bundle {mine.path} (manifest sha256 {mine.manifest_sha256}), not for bundle "
                f"{bundle.root} (manifest sha256 {digest}); run `nonn plan --bundle {bundle.root} --fleet ...` again"
            )

    def ratios(self) -> dict[str, dict[str, float | None]]:
        """baseline / NoNN for memory per device, bytes, latency and energy per node."""

        def ratio(a: float | None, b: float | None) -> float | None:
            return None if a is None or not b else a / b

        out: dict[str, dict[str, float | None]] = {}
        for base in (self.teacher, self.model_parallel):
            if base is None:
                continue
            out[base.name] = {
                "memory_per_device": ratio(base.memory_per_device_mb, self.nonn.memory_per_device_mb),
                "model_memory_per_device": ratio(base.model_memory_per_device_mb, self.nonn.model_memory_per_device_mb),
                "wire_bytes_per_inference": ratio(base.bytes_per_inference.wire, self.nonn.bytes_per_inference.wire),
                "latency": ratio(base.latency_ms, self.nonn.latency_ms),
                "energy_per_node": ratio(base.energy_per_node_mj, self.nonn.energy_per_node_mj),
            }
        return out

    def comparison(self) -> list[dict[str, Any]]:
        """Rows of NoNN vs the teacher (and model-parallel), as reports print them."""
        rows = []
        for metric, unit, attr in (
            ("memory per device", "MB", "memory_per_device_mb"),
            ("model memory per device", "MB", "model_memory_per_device_mb"),
            ("latency", "ms", "latency_ms"),
            ("energy per node", "mJ", "energy_per_node_mj"),
        ):
            rows.append(
                {
                    "metric": metric,
                    "unit": unit,
                    "nonn": getattr(self.nonn, attr),
                    "teacher": getattr(self.teacher, attr) if self.teacher else None,
                    "model_parallel": getattr(self.model_parallel, attr) if self.model_parallel else None,
                }
            )
        for key in BYTE_FIELDS:
            rows.append(
                {
                    "metric": BYTE_LABELS[key],
                    "unit": BYTE_UNIT,
                    **{
                        name: None if est is None else getattr(est.bytes_per_inference, key)
                        for name, est in (("nonn", self.nonn), ("teacher", self.teacher), ("model_parallel", self.model_parallel))
                    },
                }
            )
        return rows

    # ---- (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "bundle": asdict(self.bundle) if self.bundle else None,
            "placement": [asdict(p) for p in self.placement],
            "devices": [asdict(d) for d in self.devices],
            "nonn": asdict(self.nonn),
            "teacher": asdict(self.teacher) if self.teacher else None,
            "model_parallel": asdict(self.model_parallel) if self.model_parallel else None,
            "ratios": self.ratios(),
            "comparison": self.comparison(),
            "aggregator": self.aggregator,
            "head_ms": self.head_ms,
            "assumptions": self.assumptions,
            "created": self.created,
            "nonn_version": self.nonn_version,
        }

    def save(self, path: str | Path) -> Path:
        """Validate, then write plan.json atomically (a plan needs the bundle it was made for)."""
        if self.bundle is None:
            raise PlanError(f"{path}: cannot save a plan of a bundle that is not on disk (no manifest.json to record)")
        if self.created is None:
            self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        data = self.to_dict()
        Plan.from_dict(data, source=str(path))
        return atomic_write_json(path, data)

    @classmethod
    def from_dict(cls, obj: Any, source: str = "plan.json") -> "Plan":
        """Build from a plan dict, validating every field (ArtifactError naming `source` and the field)."""

        def fail(where: str, message: str) -> typing.NoReturn:
            raise ArtifactError(f"{source}: {where}: {message}")

        if not isinstance(obj, dict):
            raise ArtifactError(f"{source}: expected a JSON object, got {type(obj).__name__}")
        if obj.get("format") != PLAN_FORMAT:
            fail("format", f"{obj.get('format')!r}, expected {PLAN_FORMAT!r}")
        bundle = _read(BundleRef, obj.get("bundle"), "bundle", source)
        if not _SHA256_RE.match(bundle.manifest_sha256):
            fail("bundle.manifest_sha256", f"expected 64 lowercase hex digits, got {bundle.manifest_sha256!r}")
        students = _str_list(bundle.students, "bundle.students", source)
        rows = _list(obj.get("devices"), "devices", source)
        devices = [_read(DevicePlan, row, f"devices[{i}]", source) for i, row in enumerate(rows)]
        by_name: dict[str, DevicePlan] = {}
        for i, d in enumerate(devices):
            if d.device in by_name:
                fail(f"devices[{i}].device", f"{d.device!r} appears twice")
            by_name[d.device] = d
        placement = [_read(StudentPlacement, p, f"placement[{i}]", source) for i, p in enumerate(_list(obj.get("placement"), "placement", source))]
        if [p.student for p in placement] != students:
            fail("placement", f"places {[p.student for p in placement]}, expected the bundle's students in order {students}")
        used: dict[str, str] = {}
        for i, p in enumerate(placement):
            where = f"placement[{i}] ({p.student})"
            for name in _str_list(p.devices, f"{where}.devices", source):
                if name not in by_name:
                    fail(where, f"device {name!r} is not among the plan's devices ({', '.join(by_name)})")
                if name in used:
                    fail(where, f"device {name!r} already serves {used[name]}")
                if by_name[name].student != p.student:
                    fail(where, f"device {name!r} lists student {by_name[name].student!r}")
                used[name] = p.student
        for name, d in by_name.items():
            if d.student is not None and name not in used:
                fail("devices", f"{name!r} lists student {d.student!r} but the placement does not use it")
        teacher, model_parallel = (obj.get(k) for k in ("teacher", "model_parallel"))
        assumptions = obj.get("assumptions", {})
        if not isinstance(assumptions, dict):
            fail("assumptions", f"expected an object, got {type(assumptions).__name__}")
        created, version = obj.get("created"), obj.get("nonn_version")
        for key, value in (("created", created), ("nonn_version", version)):
            if value is not None and not isinstance(value, str):
                fail(key, f"expected a string or null, got {value!r}")
        return cls(
            devices=devices,
            nonn=_read(Estimate, obj.get("nonn"), "nonn", source),
            teacher=None if teacher is None else _read(Estimate, teacher, "teacher", source),
            model_parallel=None if model_parallel is None else _read(Estimate, model_parallel, "model_parallel", source),
            aggregator=_read_value(obj, "aggregator", str, "", source),
            head_ms=_read_value(obj, "head_ms", float, "", source),
            assumptions=assumptions,
            placement=placement,
            bundle=bundle,
            created=created,
            nonn_version=version,
        )


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan.json (ArtifactError naming the file and the field when it is not one)."""
    obj = read_json_artifact(path, PLAN_FORMAT, remake=f"nonn plan --bundle BUNDLE --fleet ... --out {path}")
    return Plan.from_dict(obj, source=str(path))


# --------------------------------------------------------------------------- typed reading


def _list(value: Any, where: str, source: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ArtifactError(f"{source}: {where}: expected a non-empty list, got {value!r}")
    return value


def _str_list(value: Any, where: str, source: str) -> list[str]:
    items = _list(value, where, source)
    for i, v in enumerate(items):
        if not isinstance(v, str) or not v:
            raise ArtifactError(f"{source}: {where}[{i}]: expected a non-empty string, got {v!r}")
    if len(set(items)) != len(items):
        raise ArtifactError(f"{source}: {where}: names must be unique, got {items}")
    return items


def _read_value(obj: dict[str, Any], key: str, kind: Any, where: str, source: str, empty_ok: bool = False) -> Any:
    """obj[key] checked against `kind` (str, int, float, bool, list, optionally | None)."""
    path = f"{where}.{key}" if where else key
    optional = type(None) in typing.get_args(kind)
    base = next((a for a in typing.get_args(kind) if a is not type(None)), kind) if optional else kind
    base = typing.get_origin(base) or base
    if key not in obj:
        raise ArtifactError(f"{source}: {path}: missing required field")
    value = obj[key]
    if value is None and optional:
        return None
    if dataclasses.is_dataclass(base):
        return _read(base, value, path, source)
    ok = {
        str: isinstance(value, str) and (empty_ok or bool(value)),
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        list: isinstance(value, list),
    }[base]
    if not ok:
        expected = {str: "a non-empty string", bool: "true or false", int: "an integer", float: "a number", list: "a list"}[base]
        raise ArtifactError(f"{source}: {path}: expected {expected}{' or null' if optional else ''}, got {value!r}")
    return float(value) if base is float else value


def _read(cls: Any, obj: Any, where: str, source: str) -> Any:
    """A dataclass of plain fields from a JSON object, each field checked against its annotation."""
    if not isinstance(obj, dict):
        raise ArtifactError(f"{source}: {where}: expected an object, got {obj!r}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if f.name not in obj and has_default:
            continue
        values[f.name] = _read_value(obj, f.name, hints[f.name], where, source, empty_ok=f.default == "")
    return cls(**values)
