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

Everything is written inside `nonn.artifacts.atomic_directory`: a failed export leaves no half
bundle and keeps any previous one.

Exporter choice: torch.onnx.export(dynamo=True), the torch.export-based exporter (onnxscript),
which is the maintained path in torch >= 2.9 and handles the dynamic batch dimension through
`dynamic_shapes`; it emits opset 18 or newer. Only when an older opset is asked for (for older
ONNX Runtime builds on devices) does the deprecated TorchScript exporter run. Either output is
re-checked with onnx.checker / shape inference and against PyTorch in ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import shutil
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader
from torch import nn

from nonn import __version__
from nonn.artifacts import ArtifactError, atomic_directory, sha256_file
from nonn.deploy.triton import model_repository_files
from nonn.deploy.writer import write_files
from nonn.runtime.bundle import (
    TRITON_DIR,
    Bundle,
    LayerSummary,
    ModelEntry,
    StudentEntry,
    TeacherSummary,
    TensorSpec,
)
from nonn.runtime.input_contract import InputContract

__all__ = [
    "ExportError",
    "INPUT_TYPES",
    "RawPixelInput",
    "ModelProfile",
    "PARITY_TOLERANCE",
    "profile_model",
    "teacher_summary",
    "export_onnx",
    "onnx_session",
    "max_abs_diff",
    "quantize_int8",
    "onnx_accuracy",
    "export_bundle",
    "export_from_checkpoint",
]

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # max |ONNX Runtime - PyTorch| allowed for an fp32 model (outputs up to 1 in magnitude)
STUDENT_INPUT, STUDENT_OUTPUT = "image", "features"
HEAD_INPUT, HEAD_OUTPUT = "features", "logits"
FLOAT_BYTES = 4
INPUT_TYPES = {"uint8": "UINT8", "fp32": "FP32"}  # --input-type -> the students' input datatype


class ExportError(ValueError):
    """The export cannot produce a faithful bundle (parity failure, bad model, bad inputs)."""


# --------------------------------------------------------------------------- size and cost


@dataclass
class ModelProfile:
    """Parameters, FLOPs, working memory and per-layer activations of a model for one image.

    FLOPs count 2 per multiply-accumulate of convolutions and linear layers plus their biases;
    BatchNorm (folded into the convolution at inference), activations, pooling and additions
    are not counted. `layers` lists every convolution and linear layer in execution order.
    """

    params: int
    flops: int
    activation_bytes: int
    layers: list[LayerSummary] = field(default_factory=list)


def _layer_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        macs = out.numel() * (module.in_channels // module.groups) * kh * kw
        return 2 * macs + (out.numel() if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        rows = out.numel() // module.out_features
        return 2 * rows * module.in_features * module.out_features + (out.numel() if module.bias is not None else 0)
    return 0


@torch.no_grad()
def profile_model(model: nn.Module, input_shape: Sequence[int]) -> ModelProfile:
    """Run one zero image (C, H, W) through `model` with forward hooks and measure it."""
    layers: list[LayerSummary] = []
    peak = [0]
    handles = []

    def hook(name: str):
        def record(module: nn.Module, args: tuple, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                return
            inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
            working = out.numel() + (inp.numel() if inp is not None else 0)
            peak[0] = max(peak[0], working * FLOAT_BYTES)
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                layers.append(
                    LayerSummary(
                        name=name,
                        output_shape=[int(d) for d in out.shape[1:]],
                        flops=int(_layer_flops(module, inp, out)),
                        params=int(sum(p.numel() for p in module.parameters(recurse=False))),
                        input_shape=[int(d) for d in inp.shape[1:]] if inp is not None else None,
                    )
                )

        return record

    for name, module in model.named_modules():
        if not list(module.children()):  # leaf modules only
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        model(torch.zeros(1, *[int(d) for d in input_shape], device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    params = int(sum(p.numel() for p in model.parameters()))
    return ModelProfile(params=params, flops=int(sum(l.flops for l in layers)), activation_bytes=int(peak[0]), layers=layers)


def teacher_summary(
    teacher: nn.Module,
    input_shape: Sequence[int],
    *,
    arch: Any = None,
    fingerprint: str | None = None,
    feature_layer: str | None = None,
) -> TeacherSummary:
    """The manifest's teacher record: size, FLOPs and every conv/linear layer's output shape."""
    prof = profile_model(teacher, input_shape)
    return TeacherSummary(
        arch=arch if arch is not None else getattr(teacher, "arch", None),
        params=prof.params,
        flops=prof.flops,
        input_shape=[int(d) for d in input_shape],
        layers=prof.layers,
        fingerprint=fingerprint,
        feature_layer=feature_layer if feature_layer is not None else getattr(teacher, "feature_layer", None),
        activation_bytes=prof.activation_bytes,
    )


# --------------------------------------------------------------------------- ONNX helpers


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints and deprecation chatter (errors still raise)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
        levels = [lg.level for lg in loggers]
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


DYNAMO_MIN_OPSET = 18  # the torch.export-based exporter's lowest opset


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    input_name: str,
    output_name: str,
    opset: int | None = None,
) -> None:
    """Export `module` (one tensor in, one out) with a dynamic batch dimension, then check it.

    The default and any opset >= 18 go through the torch.export-based exporter; an older opset
    (for older ONNX Runtime builds on devices) through the TorchScript exporter, which still
    supports it. Either way the result must pass onnx.checker and strict shape inference.
    """
    import onnx

    module = module.eval()
    if opset is not None and int(opset) < 7:
        raise ExportError(f"--opset {opset}: ONNX Runtime needs opset 7 or newer")
    try:
        with _quiet_exporter(), torch.no_grad():
            if opset is None or int(opset) >= DYNAMO_MIN_OPSET:
                kwargs: dict[str, Any] = {} if opset is None else {"opset_version": int(opset)}
                program = torch.onnx.export(
                    module,
                    (example,),
                    None,
                    input_names=[input_name],
                    output_names=[output_name],
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                    dynamo=True,
                    verbose=False,
                    **kwargs,
                )
                model = program.model_proto
            else:
                buffer = io.BytesIO()
                torch.onnx.export(
                    module,
                    (example,),
                    buffer,
                    input_names=[input_name],
                    output_names=[output_name],
                    dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                    opset_version=int(opset),
                    dynamo=False,
                )
                model = onnx.load_from_string(buffer.getvalue())
    except Exception as exc:  # the exporters raise many types; report them uniformly
        raise ExportError(f"ONNX export of {type(module).__name__} (opset {opset or 'default'}) failed: {exc}") from exc
    if opset is not None and _default_opset(model) != int(opset):
        raise ExportError(f"--opset {opset}: the exporter produced opset {_default_opset(model)} instead")
    try:
        onnx.checker.check_model(model, full_check=True)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise ExportError(f"exported {type(module).__name__} fails onnx.checker / shape inference: {exc}") from exc
    onnx.save(model, str(path))


def _default_opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def onnx_session(path: str | Path, threads: int = 1):
    """An ONNX Runtime CPU session with a fixed, small thread count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _run_session(session, inputs: np.ndarray, batch_size: int = 256, prepare: Callable[[np.ndarray], np.ndarray] = _identity) -> np.ndarray:
    """The session's output over `inputs`, `prepare`d batch by batch (memory bounded by the batch)."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: prepare(inputs[i : i + batch_size])})[0] for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outs, axis=0)


@torch.no_grad()
def _run_torch(module: nn.Module, inputs: np.ndarray, batch_size: int = 256, prepare: Callable[[np.ndarray], np.ndarray] = _identity) -> np.ndarray:
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    outs = [module(torch.from_numpy(prepare(inputs[i : i + batch_size])).to(device)).float().cpu().numpy()
            for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outs, axis=0)


def max_abs_diff(module: nn.Module, onnx_path: str | Path, inputs: np.ndarray, onnx_inputs: np.ndarray | None = None) -> float:
    """max |ONNX Runtime(onnx_inputs) - PyTorch(inputs)| over all outputs (`onnx_inputs`
    defaults to `inputs`; a raw-pixel graph gets the pixels PyTorch saw normalised)."""
    return _parity(module, onnx_path, inputs, onnx_inputs)[0]


def _parity(module: nn.Module, onnx_path: str | Path, inputs: np.ndarray, onnx_inputs: np.ndarray | None = None) -> tuple[float, float, np.ndarray]:
    """(max abs difference, largest PyTorch output magnitude, PyTorch's outputs)."""
    expected = _run_torch(module.eval(), inputs)
    actual = _run_session(onnx_session(onnx_path), inputs if onnx_inputs is None else onnx_inputs)
    if actual.shape != expected.shape:
        raise ExportError(f"{onnx_path}: ONNX Runtime returns shape {actual.shape}, PyTorch {expected.shape}")
    if not expected.size:
        return 0.0, 0.0, expected
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    return diff, float(np.max(np.abs(expected))), expected


def _check_parity(name: str, diff: float, scale: float, tolerance: float, images: int) -> None:
    """Fail when the difference reaches `tolerance` (relative to the outputs' magnitude above 1)."""
    if not diff < tolerance * max(1.0, scale):
        raise ExportError(
            f"{name}: ONNX Runtime differs from PyTorch by {diff:.3g} (max abs, outputs up to {scale:.3g}) on {images} inputs; "
            f"tolerance {tolerance:g}" + (f" x {scale:.3g}" if scale > 1 else "")
        )


class ImageCalibrationReader(CalibrationDataReader):
    """onnxruntime.quantization CalibrationDataReader over training images, as the model takes them."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 32) -> None:
        self.input_name = input_name
        self.batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calibration: np.ndarray) -> None:
    """Static int8 quantization (QDQ format, per-channel int8 weights, int8 activations)
    calibrated with MinMax on `calibration` (images as the model takes them, N x C x H x W)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ExportError("int8 quantization needs at least one calibration image")
    reader = ImageCalibrationReader(onnx_session(fp32_path).get_inputs()[0].name, calibration)
    int8_path = Path(int8_path)
    prepared = int8_path.with_name(int8_path.stem + ".prep.onnx")
    root_logger = logging.getLogger()
    root_level = root_logger.level
    # The quantizer logs a warning (on the root logger) for every per-channel weight of rank 1,
    # such as a pre-activation BatchNorm scale, which it then quantizes per tensor instead.
    root_logger.setLevel(logging.ERROR)
    try:
        # Symbolic shape inference + graph optimisation first, as ONNX Runtime recommends.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        quantize_static(
            str(prepared),
            str(int8_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    finally:
        root_logger.setLevel(root_level)
        prepared.unlink(missing_ok=True)
        for extra in int8_path.parent.glob("augmented_model*.onnx"):
            extra.unlink(missing_ok=True)


def onnx_accuracy(student_paths: Sequence[str | Path], head_path: str | Path, images: np.ndarray, labels: np.ndarray,
                  prepare: Callable[[np.ndarray], np.ndarray] = _identity) -> float:
    """Top-1 accuracy of the exported pipeline (all students -> concat -> head) in ONNX Runtime;
    `prepare` turns a batch of `images` into what the students take."""
    if len(images) == 0:
        raise ExportError("accuracy needs at least one image")
    features = np.concatenate([_run_session(onnx_session(p), images, prepare=prepare) for p in student_paths], axis=1)
    logits = _run_session(onnx_session(head_path), features.astype(np.float32))
    return float(np.mean(logits.argmax(axis=1) == labels))


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
            diff, scale, features = _parity(student, path, parity_x, parity_onnx)
            _check_parity(name, diff, scale, tolerance, len(parity_x))
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
        head_diff, head_scale, _ = _parity(head, head_path, head_in)
        _check_parity("head", head_diff, head_scale, tolerance, len(head_in))
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
            logits = _run_torch(ensemble, eval_raw, prepare=torch_input)
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
                    float(np.max(np.abs(_run_session(onnx_session(fp32), parity_onnx) - _run_session(onnx_session(kept), parity_onnx))))
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
        from nonn.students.teacher import load_teacher

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
    from nonn.students.train import check_dataset_matches, load_students

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
