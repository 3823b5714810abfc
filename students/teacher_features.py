"""The frozen teacher as training sees it: logits and the feature map of one named layer.

The feature map is captured with a forward hook (the teacher is never rewritten), so any
nn.Module works as a teacher once its layer is named.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TeacherFeatures", "find_layer"]


class TeacherFeatures:
    """Runs the frozen teacher and captures its final feature map with a forward hook.

    `__call__(x)` returns (logits, feature_map) without building a graph; the teacher stays in
    eval mode with requires_grad off, and is never modified.
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.module = find_layer(model, layer)
        self.layer = layer
        self._captured: Tensor | None = None
        self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._captured = output

    @torch.inference_mode()
    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._captured = None
        logits = self.model(x)
        features = self._captured
        if not isinstance(features, Tensor) or features.dim() != 4:
            shape = None if not isinstance(features, Tensor) else tuple(features.shape)
            raise ValueError(f"teacher layer {self.layer!r} produced {shape}, expected an (N, C, H, W) feature map")
        return logits, features

    def close(self) -> None:
        self._handle.remove()


def find_layer(model: nn.Module, layer: str) -> nn.Module:
    """The named sub-module, or a ValueError listing the valid names."""
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        shown = ", ".join(names[-12:])
        raise ValueError(f"teacher has no layer {layer!r}; valid names include: {shown} ({len(names)} in all)") from None
