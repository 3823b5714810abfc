"""The deployment bundle: `manifest.json` ("format": "nonn.bundle/1") as typed dataclasses.

A bundle is a directory written by `nonn export`:

    manifest.json          this schema
    student_0.onnx ...     one model per student: image (N, C, H, W) -> pooled features (N, F_k)
    head.onnx              concatenated features (N, sum F_k) -> logits (N, classes)
    triton/                a Triton model repository serving the whole ensemble on one server
                           (nonn.deploy.triton)

manifest.json fields (unknown extra fields are ignored, so later versions can add some):

    format            "nonn.bundle/1"
    students[]        name ("student_k", the name it is served under), file, sha256, size_bytes,
                      input/output {name, shape (-1 = batch), datatype (KServe: "FP32")},
                      feature_size, group (teacher filter indices), index, params, flops,
                      activation_bytes, precision ("fp32" | "int8"), parity_max_abs_diff, arch
    head              the same model fields: features (N, sum F_k) -> logits (N, classes)
    input_contract    what the students take and how to get it from an image as stored
                      (nonn.runtime.input_contract): input_shape (C, H, W), layout "NCHW",
                      pixel_scale (uint8 -> [0, 1]), mean, std (per channel), normalize (where
                      mean/std came from), datatype ("UINT8": raw pixels, normalised inside
                      each student's graph; "FP32": normalised floats), out_of_range ("error" or
                      "warn" for float pixels outside [0, 1]). Manifests written before it was
                      added carry "preprocessing" (mean, std, input_shape, layout, pixel_scale),
                      read as an FP32 contract.
    class_names       one per logit
    teacher           arch, params, flops, input_shape, fingerprint, feature_layer,
                      activation_bytes, layers[] {name, input_shape, output_shape, flops, params}
                      for every convolution and linear layer (the model-parallel comparison)
    dataset, partition, quantization, metrics, created, nonn_version   (informational)
    triton_repository "triton" (relative directory) or null

FLOPs count 2 per multiply-accumulate of convolutions and linear layers (plus bias adds).

Everything here is numpy/standard library, because devices load bundles without torch.
Loading validates the schema and raises ArtifactError naming the file and the offending field;
`nonn.runtime.bundle_check.verify_bundle` additionally re-hashes every file and checks each
ONNX model's inputs/outputs against the manifest.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nonn.artifacts import ArtifactError, atomic_write_json, read_json_artifact
from nonn.runtime.datatypes import DATATYPES, TensorSpec
from nonn.runtime.input_contract import InputContract

__all__ = [
    "BUNDLE_FORMAT",
    "MANIFEST_NAME",
    "TRITON_DIR",
    "TensorSpec",
    "ModelEntry",
    "StudentEntry",
    "LayerSummary",
    "TeacherSummary",
    "Bundle",
]

BUNDLE_FORMAT = "nonn.bundle/1"
MANIFEST_NAME = "manifest.json"
TRITON_DIR = "triton"

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- schema helpers


class _Reader:
    """Reads typed fields from a JSON object, raising ArtifactError '<file>: <field path>: ...'."""

    def __init__(self, obj: Any, where: str, source: str) -> None:
        self.source = source
        self.where = where
        if not isinstance(obj, dict):
            self.fail(f"expected an object, got {type(obj).__name__}")
        self.obj: dict[str, Any] = obj

    def fail(self, message: str, key: str | None = None) -> None:
        path = self.where + (f".{key}" if key else "") if self.where else (key or "")
        raise ArtifactError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.obj or (optional and self.obj[key] is None):
            if optional:
                return None
            self.fail("missing required field", key)
        return self.obj[key]

    def str(self, key: str, optional: bool = False, pattern: re.Pattern[str] | None = None) -> Any:
        value = self._get(key, optional)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.fail(f"expected a non-empty string, got {value!r}", key)
        if pattern is not None and not pattern.match(value):
            self.fail(f"{value!r} does not match {pattern.pattern}", key)
        return value

    def int(self, key: str, optional: bool = False, minimum: int = 0) -> Any:
        value = self._get(key, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(f"expected an integer >= {minimum}, got {value!r}", key)
        return value

    def float(self, key: str, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f"expected a number, got {value!r}", key)
        return float(value)

    def list(self, key: str, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None:
            return None
        if not isinstance(value, list):
            self.fail(f"expected a list, got {type(value).__name__}", key)
        return value

    def int_list(self, key: str, optional: bool = False, minimum: int = 0) -> Any:
        values = self.list(key, optional)
        if values is None:
            return None
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                self.fail(f"item {i}: expected an integer >= {minimum}, got {v!r}", key)
        return [int(v) for v in values]

    def float_list(self, key: str) -> list[float]:
        values = self.list(key)
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                self.fail(f"item {i}: expected a number, got {v!r}", key)
        return [float(v) for v in values]

    def dict(self, key: str, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.fail(f"expected an object, got {type(value).__name__}", key)
        return value

    def sub(self, key: str, optional: bool = False) -> "_Reader | None":
        value = self._get(key, optional)
        if value is None:
            return None
        return _Reader(value, f"{self.where}.{key}" if self.where else key, self.source)

    def item(self, key: str, index: int) -> "_Reader":
        value = self.obj[key][index]
        return _Reader(value, f"{self.where}.{key}[{index}]" if self.where else f"{key}[{index}]", self.source)


# --------------------------------------------------------------------------- dataclasses


def _read_tensor_spec(r: _Reader) -> TensorSpec:
    """A TensorSpec from its manifest object {name, shape, datatype}."""
    shape = r.list("shape")
    for i, d in enumerate(shape):
        if isinstance(d, bool) or not isinstance(d, int) or (d < 1 and d != -1):
            r.fail(f"item {i}: expected a positive size or -1, got {d!r}", "shape")
    datatype = r.str("datatype")
    if datatype not in DATATYPES:
        r.fail(f"{datatype!r} is not a KServe datatype ({', '.join(DATATYPES)})", "datatype")
    return TensorSpec(r.str("name"), tuple(shape), datatype)


@dataclass
class ModelEntry:
    """One ONNX model of the bundle (the head, and the common part of every student)."""

    name: str
    file: str
    sha256: str
    input: TensorSpec
    output: TensorSpec
    params: int
    flops: int
    size_bytes: int = 0
    precision: str = "fp32"  # "fp32" or "int8" (static QDQ quantization; I/O stay FP32)
    parity_max_abs_diff: float | None = None  # ONNX Runtime vs PyTorch, measured at export
    activation_bytes: int = 0  # working memory for one image: the largest layer input + output (fp32)

    @staticmethod
    def _read_common(r: _Reader) -> dict[str, Any]:
        file = r.str("file")
        if Path(file).is_absolute() or ".." in Path(file).parts:
            r.fail(f"{file!r} must be a path relative to the bundle directory", "file")
        precision = r.str("precision", optional=True) or "fp32"
        if precision not in ("fp32", "int8"):
            r.fail(f"expected 'fp32' or 'int8', got {precision!r}", "precision")
        return dict(
            name=r.str("name", pattern=_NAME_RE),
            file=file,
            sha256=r.str("sha256", pattern=_SHA256_RE),
            input=_read_tensor_spec(r.sub("input")),  # type: ignore[arg-type]
            output=_read_tensor_spec(r.sub("output")),  # type: ignore[arg-type]
            params=r.int("params"),
            flops=r.int("flops"),
            size_bytes=r.int("size_bytes", optional=True) or 0,
            precision=precision,
            parity_max_abs_diff=r.float("parity_max_abs_diff", optional=True),
            activation_bytes=r.int("activation_bytes", optional=True) or 0,
        )

    @classmethod
    def _read(cls, r: _Reader) -> "ModelEntry":
        return cls(**ModelEntry._read_common(r))


@dataclass
class StudentEntry(ModelEntry):
    """A student: image -> pooled feature vector of `feature_size` floats for filter `group`."""

    feature_size: int = 0
    group: list[int] = field(default_factory=list)
    index: int = 0
    arch: dict[str, Any] | None = None

    @classmethod
    def _read(cls, r: _Reader) -> "StudentEntry":
        common = ModelEntry._read_common(r)
        return cls(
            **common,
            feature_size=r.int("feature_size", minimum=1),
            group=r.int_list("group"),
            index=r.int("index", optional=True) or 0,
            arch=r.dict("arch", optional=True),
        )


@dataclass
class LayerSummary:
    """One teacher layer for the model-parallel comparison: its output activation and cost."""

    name: str
    output_shape: list[int]  # per image, without the batch dimension
    flops: int
    params: int
    input_shape: list[int] | None = None  # per image; None when not recorded

    @property
    def output_elements(self) -> int:
        return _elements(self.output_shape)

    @property
    def input_elements(self) -> int | None:
        return None if self.input_shape is None else _elements(self.input_shape)

    @classmethod
    def _read(cls, r: _Reader) -> "LayerSummary":
        return cls(
            name=r.str("name"),
            output_shape=r.int_list("output_shape", minimum=1),
            flops=r.int("flops"),
            params=r.int("params"),
            input_shape=r.int_list("input_shape", optional=True, minimum=1),
        )


def _elements(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class TeacherSummary:
    """The teacher the students replace: size, cost, and its layer-by-layer activations."""

    arch: Any  # arch dict (create_model kwargs), a factory string, or None
    params: int
    flops: int
    input_shape: list[int]
    layers: list[LayerSummary] = field(default_factory=list)
    fingerprint: str | None = None
    feature_layer: str | None = None
    activation_bytes: int = 0  # working memory for one image: the largest layer input + output (fp32)

    @classmethod
    def _read(cls, r: _Reader) -> "TeacherSummary":
        arch = r.obj.get("arch")
        if arch is not None and not isinstance(arch, (dict, str)):
            r.fail(f"expected an object, a string or null, got {type(arch).__name__}", "arch")
        layers = r.list("layers", optional=True) or []
        return cls(
            arch=arch,
            params=r.int("params"),
            flops=r.int("flops"),
            input_shape=r.int_list("input_shape", minimum=1),
            layers=[LayerSummary._read(r.item("layers", i)) for i in range(len(layers))],
            fingerprint=r.str("fingerprint", optional=True),
            feature_layer=r.str("feature_layer", optional=True),
            activation_bytes=r.int("activation_bytes", optional=True) or 0,
        )


@dataclass
class Bundle:
    """A loaded, schema-validated bundle manifest plus the directory it lives in."""

    students: list[StudentEntry]
    head: ModelEntry
    input_contract: InputContract
    class_names: list[str]
    teacher: TeacherSummary | None = None
    dataset: dict[str, Any] = field(default_factory=dict)
    partition: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    triton_repository_dir: str | None = TRITON_DIR
    created: str | None = None
    nonn_version: str | None = None
    root: Path = field(default=Path("."), compare=False)

    # ---- access

    @property
    def num_students(self) -> int:
        return len(self.students)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def feature_sizes(self) -> list[int]:
        return [s.feature_size for s in self.students]

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def triton_repository(self) -> Path | None:
        """The Triton model repository of the bundle (nonn.deploy.triton), if it has one."""
        return None if self.triton_repository_dir is None else self.root / self.triton_repository_dir

    def student(self, name_or_index: str | int) -> StudentEntry:
        """A student by name ("student_1") or position; KeyError listing the choices if absent."""
        if isinstance(name_or_index, int) and not isinstance(name_or_index, bool):
            if not 0 <= name_or_index < len(self.students):
                raise KeyError(f"student index {name_or_index} out of range: the bundle has {len(self.students)} students")
            return self.students[name_or_index]
        for s in self.students:
            if s.name == name_or_index:
                return s
        if isinstance(name_or_index, str) and name_or_index.isdigit():
            return self.student(int(name_or_index))
        raise KeyError(f"no student named {name_or_index!r}; the bundle has {', '.join(s.name for s in self.students)}")

    def model(self, name: str) -> ModelEntry:
        """A student or the head by name."""
        if name == self.head.name:
            return self.head
        return self.student(name)

    def path_of(self, entry: ModelEntry | str) -> Path:
        """Absolute-ish path of a model's ONNX file (entry or its name)."""
        if isinstance(entry, str):
            entry = self.model(entry)
        return self.root / entry.file

    # ---- (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        d["input_contract"] = self.input_contract.to_dict()
        d["triton_repository"] = d.pop("triton_repository_dir")
        return {"format": BUNDLE_FORMAT, **d}

    def save(self, directory: str | Path | None = None) -> Path:
        """Validate and write manifest.json atomically into `directory` (default: self.root)."""
        root = Path(directory) if directory is not None else self.root
        self.validate(source=str(root / MANIFEST_NAME))
        return atomic_write_json(root / MANIFEST_NAME, self.to_dict())

    @classmethod
    def from_dict(cls, obj: dict[str, Any], root: str | Path = ".", source: str = MANIFEST_NAME) -> "Bundle":
        """Build from a manifest dict, validating every field (ArtifactError on the first bad one)."""
        r = _Reader(obj, "", source)
        if obj.get("format") != BUNDLE_FORMAT:
            r.fail(f"format is {obj.get('format')!r}, expected {BUNDLE_FORMAT!r}", "format")
        students_raw = r.list("students")
        if not students_raw:
            r.fail("the bundle has no students", "students")
        students = [StudentEntry._read(r.item("students", i)) for i in range(len(students_raw))]
        teacher_r = r.sub("teacher", optional=True)
        class_names = r.list("class_names")
        if not all(isinstance(c, str) for c in class_names):
            r.fail("expected a list of strings", "class_names")
        triton = obj.get("triton_repository", TRITON_DIR)
        if triton is not None and (not isinstance(triton, str) or Path(triton).is_absolute() or ".." in Path(triton).parts):
            r.fail(f"expected a relative directory or null, got {triton!r}", "triton_repository")
        bundle = cls(
            students=students,
            head=ModelEntry._read(r.sub("head")),  # type: ignore[arg-type]
            input_contract=_read_contract(r),
            class_names=list(class_names),
            teacher=TeacherSummary._read(teacher_r) if teacher_r is not None else None,
            dataset=r.dict("dataset", optional=True) or {},
            partition=r.dict("partition", optional=True),
            quantization=r.dict("quantization", optional=True),
            metrics=r.dict("metrics", optional=True) or {},
            triton_repository_dir=triton,
            created=r.str("created", optional=True),
            nonn_version=r.str("nonn_version", optional=True),
            root=Path(root),
        )
        bundle.validate(source=source)
        return bundle

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        """Load a bundle directory (or its manifest.json) and validate the schema."""
        path = Path(path)
        manifest = path / MANIFEST_NAME if path.is_dir() or not path.suffix else path
        if not manifest.parent.is_dir():
            raise ArtifactError(f"{manifest.parent}: bundle directory not found")
        obj = read_json_artifact(manifest, BUNDLE_FORMAT)
        return cls.from_dict(obj, root=manifest.parent, source=str(manifest))

    def validate(self, source: str = MANIFEST_NAME) -> None:
        """Cross-field checks: names unique, groups disjoint, shapes consistent with each other."""

        def fail(msg: str) -> None:
            raise ArtifactError(f"{source}: {msg}")

        names = [s.name for s in self.students] + [self.head.name]
        if len(set(names)) != len(names):
            fail(f"model names must be unique, got {names}")
        files = [s.file for s in self.students] + [self.head.file]
        if len(set(files)) != len(files):
            fail(f"model files must be distinct, got {files}")
        seen: dict[int, str] = {}
        contract = self.input_contract
        image_shape = (-1, *contract.input_shape)
        for i, s in enumerate(self.students):
            where = f"students[{i}] ({s.name})"
            if len(s.group) != s.feature_size:
                fail(f"{where}: group has {len(s.group)} filters but feature_size is {s.feature_size}")
            for f in s.group:
                if f in seen:
                    fail(f"{where}: filter {f} is also in {seen[f]}'s group (groups must be disjoint)")
                seen[f] = s.name
            if s.input.shape != image_shape:
                fail(f"{where}: input shape {list(s.input.shape)} does not match the input contract's {list(image_shape)}")
            if s.input.datatype != contract.datatype:
                fail(f"{where}: input datatype {s.input.datatype}, but the input contract says the students take {contract.datatype}")
            if s.output.shape != (-1, s.feature_size):
                fail(f"{where}: output shape {list(s.output.shape)}, expected [-1, {s.feature_size}]")
        total = sum(self.feature_sizes)
        if self.head.input.shape != (-1, total):
            fail(f"head: input shape {list(self.head.input.shape)}, expected [-1, {total}] (sum of feature sizes)")
        if self.head.output.shape != (-1, self.num_classes):
            fail(f"head: output shape {list(self.head.output.shape)}, expected [-1, {self.num_classes}] (one per class name)")
        if self.teacher is not None and list(self.teacher.input_shape) != list(contract.input_shape):
            fail(f"teacher: input shape {self.teacher.input_shape} differs from the input contract's {list(contract.input_shape)}")


def _read_contract(r: _Reader) -> InputContract:
    """The manifest's input contract, or the preprocessing section of a manifest written before it."""
    if r.obj.get("input_contract") is not None:
        return InputContract.from_dict(r.obj["input_contract"], f"{r.source}: input_contract")
    legacy = r.dict("preprocessing")
    return InputContract.from_dict({**legacy, "normalize": "dataset", "datatype": "FP32"}, f"{r.source}: preprocessing")
