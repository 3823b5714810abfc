"""Export a trained student ensemble to an ONNX deployment bundle (see nonn.runtime.bundle).

Per student one ONNX model, image (N, C, H, W) -> pooled features (N, |P_k|), and one for the
head, concatenated features (N, sum |P_k|) -> logits; the batch dimension is dynamic. By default
a student takes raw uint8 pixels and normalises them itself (a Cast, Mul and Add in front of the
graph, from the input contract), so clients send images as stored and a device receives a
quarter of the bytes of float input; `input_type="fp32"` exports graphs that take normalised
float32 instead. The manifest's input contract says which. Each model is checked with
onnx.checker and strict shape inference, then run in ONNX Runtime against PyTorch on real
images (the same pixels on both sides): a maximum absolute difference at or above the
tolerance (1e-4, times the largest output magnitude where that exceeds 1, since float32 carries
about seven significant digits) fails the export. `quantize="int8"` adds ONNX Runtime static quantization (QDQ, per-channel weights)
calibrated on training images, and reports size and accuracy before and after.

One model's export, parity check and quantization are nonn.students.onnx_tools'; sizes and
FLOPs come from nonn.students.model_profile.

Everything is written inside `nonn.artifacts.atomic_directory`: a failed export leaves no half
bundle and keeps any previous one.

Exporter choice: torch.onnx.export(dynamo=True), the torch.export-based exporter (onnxscript),
which is the maintained path in torch >= 2.9 and handles the dynamic batch dimension through
`dynamic_shapes`; it emits opset 18 or newer. Only when an older opset is asked for (for older
ONNX Runtime builds on devices) does the deprecated TorchScript exporter run. Either output is
re-checked with onnx.checker / shape inference and against PyTorch in ONNX Runtime.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nonn import __version__
from nonn.artifacts import ArtifactError, atomic_directory, sha256_file
from nonn.deploy.triton import model_repository_files
from nonn.deploy.writer import write_files
from nonn.runtime.bundle import (
    TRITON_DIR,
    Bundle,
    ModelEntry,
    StudentEntry,
    TeacherSummary,
    TensorSpec,
)
from nonn.runtime.input_contract import InputContract
from nonn.students.model_profile import profile_model, teacher_summary
from nonn.students.onnx_tools import (
    ExportError,
    check_parity,
    compare_with_torch,
    export_onnx,
    onnx_accuracy,
    onnx_session,
    quantize_int8,
    run_session,
    run_torch,
)

__all__ = [
    "ExportError",
    "INPUT_TYPES",
    "RawPixelInput",
    "PARITY_TOLERANCE",
    "export_bundle",
    "export_from_checkpoint",
]

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max |ONNX Runtime - PyTorch| allowed for an fp32 model (outputs up to 1 in magnitude)
STUDENT_INPUT, STUDENT_OUTPUT = "image", "features"
HEAD_INPUT, HEAD_OUTPUT = "features", "logits"
INPUT_TYPES = {"uint8": "UINT8", "fp32": "FP32"}  # --input-type -> the students' input datatype


# --------------------------------------------------------------------------- the bundle


class RawPixelInput(nn.Module):
    """A student that takes raw uint8 pixels: x * a + b per channel (the input contract's pixel
    scale and normalisation), then the student. Exported, this is a Cast, a Mul and an Add in
    front of the student's graph."""

    def __init__(self, student: nn.Module, contract: InputContract) -> None:
        super().__init__()
        a, b = contract.scale_shift()
        self.student = student
        self.register_buffer("scale", torch.from_numpy(a)[None])
        self.register_buffer("shift", torch.from_numpy(b)[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x.to(torch.float32) * self.scale + self.shift)


def _contract(dataset_meta: dict[str, Any], contract: InputContract | None, input_type: str) -> InputContract:
    """The bundle's input contract: the one given (else the data set's mean/std), taking `input_type`."""
    if input_type not in INPUT_TYPES:
        raise ExportError(f"input type must be one of {', '.join(INPUT_TYPES)}, got {input_type!r}")
    if contract is None:
        try:
            contract = InputContract.from_dataset_meta(dataset_meta, "dataset_meta")
        except ArtifactError as exc:
            raise ExportError(f"dataset_meta needs input_shape, mean and std (as the data set's meta() gives): {exc}") from exc
    return contract.with_datatype(INPUT_TYPES[input_type])


def _images(images: np.ndarray | None, contract: InputContract, what: str) -> np.ndarray | None:
    """Images as stored, checked against the contract's shape; floats are rounded to uint8
    pixels first for a raw-pixel bundle, so PyTorch and ONNX Runtime see the same pixels."""
    if images is None:
        return None
    try:
        return contract.to_uint8(images) if contract.raw_input else contract.to_unit(images)
    except ValueError as exc:
        raise ExportError(f"{what}: {exc}") from exc


def _class_names(dataset_meta: dict[str, Any], num_classes: int) -> list[str]:
    names = dataset_meta.get("class_names") or [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ExportError(f"dataset_meta has {len(names)} class names but the head has {num_classes} outputs")
    return [str(n) for n in names]


def _check_ensemble(ensemble: nn.Module) -> tuple[list[nn.Module], nn.Linear, list[list[int]]]:
    students = getattr(ensemble, "students", None)
    head = getattr(ensemble, "head", None)
    groups = getattr(ensemble, "groups", None)
    if not isinstance(students, nn.ModuleList) or not isinstance(head, nn.Linear) or groups is None:
        raise ExportError("expected a StudentEnsemble: `students` (nn.ModuleList), `head` (nn.Linear) and `groups`")
    groups = [[int(f) for f in g] for g in groups]
    if len(groups) != len(students):
        raise ExportError(f"{len(students)} students but {len(groups)} groups")
    if head.in_features != sum(len(g) for g in groups):
        raise ExportError(f"head takes {head.in_features} features but the groups hold {sum(len(g) for g in groups)}")
    return list(students), head, groups


def export_bundle(
    ensemble: nn.Module,
    out_dir: str | Path,
    *,
    dataset_meta: dict[str, Any],
    calibration_images: np.ndarray | None = None,
    quantize: str | None = None,
    opset: int | None = None,
    teacher: nn.Module | TeacherSummary | None = None,
    parity_images: np.ndarray | None = None,
    eval_data: tuple[np.ndarray, np.ndarray] | None = None,
    partition: dict[str, Any] | None = None,
    tolerance: float = PARITY_TOLERANCE,
    overwrite: bool = True,
    progress: bool = False,
    contract: InputContract | None = None,
    input_type: str = "uint8",
) -> Bundle:
    """Write the deployment bundle for `ensemble` into `out_dir` (atomically) and return it.

    Images are as stored: uint8 pixels or floats in [0, 1], (N, C, H, W). `contract` is how the
    students were trained to see them (default: normalised by `dataset_meta`'s mean/std); the
    students take `input_type` "uint8" (raw pixels, normalised inside each graph) or "fp32"
    (normalised floats), and the manifest's input contract says which.
    `parity_images` (default: `calibration_images`) are run through PyTorch and ONNX Runtime;
    `calibration_images` (training images) calibrate int8; `eval_data` = (images, labels)
    gives the accuracy report. Raises ExportError (and writes nothing) when a model's parity
    difference reaches `tolerance`.
    """
    from tqdm import tqdm

    if quantize not in (None, "int8"):
        raise ExportError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize == "int8" and (calibration_images is None or len(calibration_images) == 0):
        raise ExportError("--quantize int8 needs calibration images (training images)")
    _check_ensemble(ensemble)
    # Export and compare on the CPU, in float32: ONNX Runtime's CPU provider is the reference
    # deployment, and a GPU's TF32 convolutions would differ from it by more than the tolerance.
    ensemble = copy.deepcopy(ensemble).cpu().float().eval()
    students, head, groups = _check_ensemble(ensemble)
    contract = _contract(dataset_meta, contract, input_type)
    shape = list(contract.input_shape)
    class_names = _class_names(dataset_meta, head.out_features)
    parity_raw = _images(parity_images if parity_images is not None else calibration_images, contract, "parity images")
    if parity_raw is None or len(parity_raw) == 0:
        raise ExportError("the parity check needs real images: pass parity_images or calibration_images")

    def torch_input(batch: np.ndarray) -> np.ndarray:  # what PyTorch was trained on
        return contract.normalize_unit(contract.to_unit(batch))

    parity_x, parity_onnx = torch_input(parity_raw), contract.prepare(parity_raw)
    calib_onnx = contract.prepare(_images(calibration_images, contract, "calibration images")) if calibration_images is not None else None
    eval_raw, eval_y = (_images(eval_data[0], contract, "evaluation images"), np.asarray(eval_data[1])) if eval_data is not None else (None, None)

    if isinstance(teacher, nn.Module):
        teacher = teacher_summary(teacher, shape)
    example = torch.from_numpy(parity_onnx[: min(2, len(parity_onnx))])
    steps = len(students) + 1 + (len(students) if quantize else 0) + (1 if eval_data is not None else 0)

    with atomic_directory(out_dir, overwrite=overwrite) as tmp, tqdm(total=steps, desc="export", disable=not progress, unit="model") as bar:
        entries: list[StudentEntry] = []
        model_files: list[Path] = []  # the served files: fp32, replaced by int8 when quantizing
        features_parity: list[np.ndarray] = []
        for k, (student, group) in enumerate(zip(students, groups)):
            name = f"student_{k}"
            path = tmp / f"{name}.onnx"
            bar.set_postfix_str(name)
            export_onnx(RawPixelInput(student, contract) if contract.raw_input else student, example, path, STUDENT_INPUT, STUDENT_OUTPUT, opset)
            diff, scale, features = compare_with_torch(student, path, parity_x, parity_onnx)
            check_parity(name, diff, scale, tolerance, len(parity_x))
            prof = profile_model(student, shape)
            spec = getattr(student, "spec", None)
            entries.append(
                StudentEntry(
                    name=name,
                    file=path.name,
                    sha256="0" * 64,  # filled in once the final file is known
                    input=TensorSpec(name=STUDENT_INPUT, shape=[-1, *shape], datatype=contract.datatype),
                    output=TensorSpec(name=STUDENT_OUTPUT, shape=[-1, len(group)], datatype="FP32"),
                    params=prof.params,
                    flops=prof.flops,
                    parity_max_abs_diff=diff,
                    activation_bytes=prof.activation_bytes,
                    feature_size=len(group),
                    group=list(group),
                    index=k,
                    arch=spec.to_dict() if hasattr(spec, "to_dict") else getattr(student, "arch", None),
                )
            )
            model_files.append(path)
            features_parity.append(features)
            bar.update()

        head_path = tmp / "head.onnx"
        bar.set_postfix_str("head")
        head_in = np.concatenate(features_parity, axis=1).astype(np.float32)
        export_onnx(head, torch.from_numpy(head_in[:2]), head_path, HEAD_INPUT, HEAD_OUTPUT, opset)
        head_diff, head_scale, _ = compare_with_torch(head, head_path, head_in)
        check_parity("head", head_diff, head_scale, tolerance, len(head_in))
        head_prof = profile_model(head, [head.in_features])
        head_entry = ModelEntry(
            name="head",
            file=head_path.name,
            sha256="0" * 64,
            input=TensorSpec(name=HEAD_INPUT, shape=[-1, head.in_features], datatype="FP32"),
            output=TensorSpec(name=HEAD_OUTPUT, shape=[-1, head.out_features], datatype="FP32"),
            params=head_prof.params,
            flops=head_prof.flops,
            parity_max_abs_diff=head_diff,
            activation_bytes=head_prof.activation_bytes,
        )
        bar.update()

        metrics: dict[str, Any] = {"parity_images": int(len(parity_x)), "parity_tolerance": tolerance}
        if eval_raw is not None:
            bar.set_postfix_str("accuracy")
            logits = run_torch(ensemble, eval_raw, prepare=torch_input)
            metrics["torch_accuracy"] = float(np.mean(logits.argmax(axis=1) == eval_y))
            metrics["onnx_accuracy"] = onnx_accuracy(model_files, head_path, eval_raw, eval_y, prepare=contract.prepare)
            metrics["eval_images"] = int(len(eval_raw))
            bar.update()

        quantization = None
        if quantize == "int8":
            assert calib_onnx is not None
            fp32_dir = tmp / "fp32"
            fp32_dir.mkdir()
            int8_feature_diffs = []
            fp32_parity = [e.parity_max_abs_diff for e in entries]
            fp32_bytes = sum(p.stat().st_size for p in model_files)
            for entry, fp32 in zip(entries, model_files):
                bar.set_postfix_str(f"int8 {entry.name}")
                kept = fp32_dir / fp32.name
                shutil.move(str(fp32), kept)
                quantize_int8(kept, fp32, calib_onnx)
                int8_feature_diffs.append(
                    float(np.max(np.abs(run_session(onnx_session(fp32), parity_onnx) - run_session(onnx_session(kept), parity_onnx))))
                )
                entry.precision = "int8"
                entry.parity_max_abs_diff = None  # int8 is approximate; its feature error is reported below
                bar.update()
            quantization = {
                "mode": "int8",
                "method": "onnxruntime static quantization, QDQ, per-channel symmetric int8 weights, int8 activations, MinMax calibration",
                "calibration_images": int(len(calib_onnx)),
                "fp32_bytes": int(fp32_bytes),
                "int8_bytes": int(sum(p.stat().st_size for p in model_files)),
                "max_abs_feature_diff": int8_feature_diffs,
                "fp32_parity_max_abs_diff": fp32_parity,
                "fp32_models": "fp32/",
            }
            if eval_raw is not None:
                quantization["fp32_accuracy"] = metrics["onnx_accuracy"]
                quantization["int8_accuracy"] = onnx_accuracy(model_files, head_path, eval_raw, eval_y, prepare=contract.prepare)
                quantization["eval_images"] = int(len(eval_raw))

        for entry in [*entries, head_entry]:
            path = tmp / entry.file
            entry.sha256 = sha256_file(path)
            entry.size_bytes = path.stat().st_size

        bundle = Bundle(
            students=entries,
            head=head_entry,
            input_contract=contract,
            class_names=class_names,
            teacher=teacher,
            dataset=dict(dataset_meta),
            partition=partition,
            quantization=quantization,
            metrics=metrics,
            triton_repository_dir=TRITON_DIR,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            nonn_version=__version__,
            root=tmp,
        )
        write_files(tmp / TRITON_DIR, model_repository_files(bundle))
        bundle.save(tmp)
    bundle.root = Path(out_dir)
    return bundle


# --------------------------------------------------------------------------- from a checkpoint


def _teacher_module(info: dict[str, Any]) -> nn.Module | None:
    """Rebuild the teacher's architecture (weights are not needed for shapes and FLOPs)."""
    arch = info.get("arch")
    if isinstance(arch, dict):
        from nonn.students.models import create_model

        return create_model(**arch)
    factory = info.get("factory") or (arch if isinstance(arch, str) else None)
    if isinstance(factory, str):
        from nonn.students.teacher_loading import load_teacher

        return load_teacher(factory=factory).model
    return None


def export_from_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    *,
    quantize: str | None = None,
    opset: int | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    calibration_count: int = 256,
    parity_count: int = 64,
    eval_count: int = 2000,
    seed: int = 0,
    overwrite: bool = True,
    progress: bool = False,
    image_size: Any = None,
    input_type: str = "uint8",
    out_of_range: str = "error",
) -> Bundle:
    """Export a students checkpoint ("nonn.students/1"): real test images for parity and the
    accuracy report, a seeded random sample of training images for int8 calibration.

    The data set is the one the students were trained on (as the checkpoint recorded it), or
    `dataset` when given; it must have the recorded input shape and number of classes. Images
    are normalised as the checkpoint's input contract says; `input_type` and `out_of_range`
    complete the bundle's contract.
    """
    from nonn.students.data import resolve_data
    from nonn.students.train import load_students
    from nonn.students.train_setup import check_dataset_matches

    if calibration_count < 1 or parity_count < 1 or eval_count < 0:
        raise ExportError(
            f"need calibration_count >= 1, parity_count >= 1, eval_count >= 0; got {calibration_count}, {parity_count}, {eval_count}"
        )
    loaded = load_students(path)
    meta = loaded.meta
    dataset_meta = meta.get("dataset") or {}
    data = resolve_data(dataset, data_dir, image_size, [(dataset_meta, str(path)), (meta.get("config"), str(path))])
    check_dataset_matches(dataset_meta, data, what=f"students checkpoint {path}")
    dataset_meta = {**data.meta(), **dataset_meta}
    contract = dataclasses.replace(loaded.contract, out_of_range=out_of_range)
    rng = np.random.default_rng(seed)
    n_train = data.split_size("train")
    calib = data.read("train", np.sort(rng.permutation(n_train)[:calibration_count]))
    test_split = "test" if data.split_size("test") else "train"
    n_test = data.split_size(test_split)
    parity = data.read(test_split, np.arange(min(parity_count, n_test)))
    evaluation = None
    if eval_count > 0:
        count = min(eval_count, n_test)
        evaluation = (data.read(test_split, np.arange(count)), data.labels(test_split)[:count])
    teacher_info = meta.get("teacher") or {}
    teacher: TeacherSummary | None = None
    module = _teacher_module(teacher_info)
    if module is not None:
        teacher = teacher_summary(
            module,
            data.input_shape,
            arch=teacher_info.get("arch") or teacher_info.get("factory"),
            fingerprint=teacher_info.get("fingerprint"),
            feature_layer=teacher_info.get("feature_layer"),
        )
    else:
        log.warning("%s: no teacher architecture recorded; the bundle has no teacher summary (nonn plan cannot compare)", path)
    return export_bundle(
        loaded.ensemble,
        out_dir,
        dataset_meta=dataset_meta,
        calibration_images=calib,
        quantize=quantize,
        opset=opset,
        teacher=teacher,
        parity_images=parity,
        eval_data=evaluation,
        partition=meta.get("partition"),
        overwrite=overwrite,
        progress=progress,
        contract=contract,
        input_type=input_type,
    )
