"""ONNX export, ONNX Runtime parity checks and int8 quantization, one model at a time.

`export_onnx` exports a one-tensor-in, one-tensor-out module with a dynamic batch dimension and
checks it (onnx.checker, strict shape inference); `compare_with_torch`/`max_abs_diff` compare ONNX Runtime
with PyTorch on the same inputs; `quantize_int8` runs ONNX Runtime's static quantization;
`onnx_accuracy` scores the exported pipeline. nonn.students.export builds the bundle from them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader
from torch import nn

__all__ = [
    "ExportError",
    "export_onnx",
    "onnx_session",
    "run_session",
    "run_torch",
    "compare_with_torch",
    "check_parity",
    "max_abs_diff",
    "quantize_int8",
    "onnx_accuracy",
]


class ExportError(ValueError):
    """The export cannot produce a faithful bundle (parity failure, bad model, bad inputs)."""


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


def identity(x: np.ndarray) -> np.ndarray:
    return x


def run_session(session, inputs: np.ndarray, batch_size: int = 256, prepare: Callable[[np.ndarray], np.ndarray] = identity) -> np.ndarray:
    """The session's output over `inputs`, `prepare`d batch by batch (memory bounded by the batch)."""
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: prepare(inputs[i : i + batch_size])})[0] for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outs, axis=0)


@torch.no_grad()
def run_torch(module: nn.Module, inputs: np.ndarray, batch_size: int = 256, prepare: Callable[[np.ndarray], np.ndarray] = identity) -> np.ndarray:
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    outs = [module(torch.from_numpy(prepare(inputs[i : i + batch_size])).to(device)).float().cpu().numpy()
            for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outs, axis=0)


def max_abs_diff(module: nn.Module, onnx_path: str | Path, inputs: np.ndarray, onnx_inputs: np.ndarray | None = None) -> float:
    """max |ONNX Runtime(onnx_inputs) - PyTorch(inputs)| over all outputs (`onnx_inputs`
    defaults to `inputs`; a raw-pixel graph gets the pixels PyTorch saw normalised)."""
    return compare_with_torch(module, onnx_path, inputs, onnx_inputs)[0]


def compare_with_torch(module: nn.Module, onnx_path: str | Path, inputs: np.ndarray, onnx_inputs: np.ndarray | None = None) -> tuple[float, float, np.ndarray]:
    """(max abs difference, largest PyTorch output magnitude, PyTorch's outputs)."""
    expected = run_torch(module.eval(), inputs)
    actual = run_session(onnx_session(onnx_path), inputs if onnx_inputs is None else onnx_inputs)
    if actual.shape != expected.shape:
        raise ExportError(f"{onnx_path}: ONNX Runtime returns shape {actual.shape}, PyTorch {expected.shape}")
    if not expected.size:
        return 0.0, 0.0, expected
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    return diff, float(np.max(np.abs(expected))), expected


def check_parity(name: str, diff: float, scale: float, tolerance: float, images: int) -> None:
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
                  prepare: Callable[[np.ndarray], np.ndarray] = identity) -> float:
    """Top-1 accuracy of the exported pipeline (all students -> concat -> head) in ONNX Runtime;
    `prepare` turns a batch of `images` into what the students take."""
    if len(images) == 0:
        raise ExportError("accuracy needs at least one image")
    features = np.concatenate([run_session(onnx_session(p), images, prepare=prepare) for p in student_paths], axis=1)
    logits = run_session(onnx_session(head_path), features.astype(np.float32))
    return float(np.mean(logits.argmax(axis=1) == labels))
