"""Size and cost of a model for one image: parameters, FLOPs, working memory, per-layer shapes.

Measured with forward hooks on one zero image; the bundle manifest records these figures for
every student, the head and the teacher (the planner's cost model reads them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from nonn.runtime.bundle import LayerSummary, TeacherSummary

__all__ = ["ModelProfile", "profile_model", "teacher_summary"]

FLOAT_BYTES = 4


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
