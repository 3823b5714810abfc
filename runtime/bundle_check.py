"""Checking a bundle against its manifest, and describing it in a few lines.

`verify_bundle` re-hashes every file and checks each ONNX model's inputs/outputs (and a probe
run) against the manifest (`nonn bundle verify`); `summarize` is the few lines `nonn export`
and `nonn bundle verify` print. onnxruntime is imported only inside the model check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from nonn.artifacts import ArtifactError, sha256_file
from nonn.runtime.bundle import Bundle, ModelEntry
from nonn.runtime.datatypes import TensorError, datatype_from_onnx
from nonn.runtime.input_contract import InputContract

__all__ = ["verify_bundle", "summarize"]


def _check_onnx_io(path: Path, entry: ModelEntry) -> list[str]:
    """Open the model in ONNX Runtime; compare its single input/output with the manifest."""
    import numpy as np
    import onnxruntime as ort

    problems: list[str] = []
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        return [f"{entry.name}: {path} cannot be loaded by ONNX Runtime ({exc})"]
    for kind, actual, spec in (("input", session.get_inputs(), entry.input), ("output", session.get_outputs(), entry.output)):
        if len(actual) != 1:
            problems.append(f"{entry.name}: model has {len(actual)} {kind}s, expected 1 ({spec.name})")
            continue
        arg = actual[0]
        shape = [d if isinstance(d, int) and d > 0 else -1 for d in arg.shape]
        if arg.name != spec.name:
            problems.append(f"{entry.name}: {kind} is named {arg.name!r} in the model, {spec.name!r} in the manifest")
        if shape != list(spec.shape):
            problems.append(f"{entry.name}: {kind} shape is {shape} in the model, {list(spec.shape)} in the manifest")
        try:
            datatype = datatype_from_onnx(arg.type)
        except TensorError:
            datatype = None
        if datatype != spec.datatype:
            problems.append(f"{entry.name}: {kind} type is {arg.type} in the model, {spec.datatype} in the manifest")
    if problems:
        return problems
    # Run two zero images/vectors: the output must really have the declared shape.
    probe_shape = [2 if d == -1 else d for d in entry.input.shape]
    try:
        (out,) = session.run([entry.output.name], {entry.input.name: np.zeros(probe_shape, dtype=entry.input.numpy_dtype)})
    except Exception as exc:
        return [f"{entry.name}: running the model on a {probe_shape} input failed ({exc})"]
    expected = [2 if d == -1 else d for d in entry.output.shape]
    if list(out.shape) != expected:
        problems.append(f"{entry.name}: model returns shape {list(out.shape)} for a batch of 2, manifest says {list(entry.output.shape)}")
    return problems


def verify_bundle(path: str | Path, check_models: bool = True) -> list[str]:
    """Every problem with a bundle (empty list when it is good).

    Checks the manifest schema, each file's presence and sha256, and each ONNX model's input/output
    names, shapes and types against the manifest (and a probe run, when `check_models`). The
    Triton repository is checked by `nonn.deploy.triton.verify_model_repository`.
    """
    try:
        bundle = Bundle.load(path)
    except ArtifactError as exc:
        return [str(exc)]
    problems: list[str] = []
    entries: list[ModelEntry] = [*bundle.students, bundle.head]
    for entry in entries:
        file = bundle.path_of(entry)
        if not file.is_file():
            problems.append(f"{entry.name}: file {file} is missing")
            continue
        digest = sha256_file(file)
        if digest != entry.sha256:
            problems.append(f"{entry.name}: {file} has sha256 {digest}, manifest says {entry.sha256} (file changed or corrupt)")
            continue
        if entry.size_bytes and file.stat().st_size != entry.size_bytes:
            problems.append(f"{entry.name}: {file} is {file.stat().st_size} bytes, manifest says {entry.size_bytes}")
        if check_models:
            problems.extend(_check_onnx_io(file, entry))
    return problems


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _input_words(contract: InputContract) -> str:
    what = "raw uint8 pixels" if contract.raw_input else "normalised float32"
    return f"({what}; normalisation {contract.describe()})"


def summarize(bundle: Bundle) -> list[str]:
    """Human-readable lines describing a bundle (for `nonn bundle verify` and logs)."""
    lines = [
        f"bundle {bundle.root}: {bundle.num_students} students, {bundle.num_classes} classes, "
        f"input {list(bundle.input_contract.input_shape)} {_input_words(bundle.input_contract)}, "
        f"precision {', '.join(_unique(s.precision for s in bundle.students))}"
    ]
    for s in bundle.students:
        lines.append(
            f"  {s.name}: {s.file} {s.size_bytes / 1024:.1f} KiB, {s.params:,} params, {s.flops:,} FLOPs, "
            f"{s.feature_size} features"
        )
    h = bundle.head
    lines.append(f"  {h.name}: {h.file} {h.size_bytes / 1024:.1f} KiB, {h.params:,} params, {sum(bundle.feature_sizes)} -> {bundle.num_classes}")
    return lines
