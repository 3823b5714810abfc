"""Per-image, per-filter activations of one named layer, captured with a forward hook.

The model is never rewritten: a hook on the named module records the spatial mean of each
channel of its output, batch by batch, so memory is bounded by the batch plus the
(images x filters) result.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

__all__ = ["collect_activations", "resolve_layer", "layer_names"]


def layer_names(model: nn.Module) -> list[str]:
    """Names of every sub-module, as `--layer` accepts them."""
    return [name for name, _ in model.named_modules() if name]


def resolve_layer(model: nn.Module, layer: str) -> nn.Module:
    """The sub-module called `layer`; a ValueError listing the valid names otherwise."""
    modules = dict(model.named_modules())
    if not layer or layer not in modules:
        names = layer_names(model)
        shown = ", ".join(names[:60]) + (f", ... ({len(names)} in all)" if len(names) > 60 else "")
        raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__}; valid names: {shown}")
    return modules[layer]


def _images_of(batch: Any) -> torch.Tensor:
    """The input tensor of a loader item: a tensor, or the first element of (x, y, ...)."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor):
        raise ValueError(f"loader items must be tensors or (x, y) pairs, got {type(batch).__name__}")
    return batch


def _spatial_mean(output: Any, layer: str) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C) by averaging over the spatial axes; (N, C) passes through."""
    if not isinstance(output, torch.Tensor):
        raise ValueError(
            f"layer {layer!r} returns {type(output).__name__}, not a tensor; name a module whose "
            "output is the feature map (N, C, H, W)"
        )
    if output.dim() < 2:
        raise ValueError(f"layer {layer!r} output has shape {tuple(output.shape)}; expected (N, C, H, W)")
    if output.dim() == 2:
        return output
    return output.flatten(2).mean(dim=2)


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    layer: str,
    loader: Iterable[Any],
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Run `model` over `loader` and return (images, filters) float32 spatial means of `layer`.

    loader yields tensors or (x, y) pairs. The model runs in eval mode on `device` (its train
    flag is restored afterwards). The layer must be called exactly once per forward pass (a
    module reused several times, like a shared ReLU, is ambiguous and rejected).
    """
    module = resolve_layer(model, layer)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured.append(_spatial_mean(output, layer).detach().float().cpu())

    was_training = model.training
    model.to(device).eval()
    handle = module.register_forward_hook(hook)
    chunks: list[np.ndarray] = []
    try:
        from tqdm.auto import tqdm

        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        for batch in tqdm(loader, total=total, desc=f"activations of {layer}", unit="batch", disable=not progress):
            x = _images_of(batch).to(device)
            captured.clear()
            model(x)
            if len(captured) != 1:
                raise ValueError(
                    f"layer {layer!r} ran {len(captured)} times in one forward pass; name a module "
                    "that runs exactly once and outputs the final feature map"
                )
            feats = captured[0]
            if feats.shape[0] != x.shape[0]:
                raise ValueError(
                    f"layer {layer!r} output has batch size {feats.shape[0]} for {x.shape[0]} images"
                )
            chunks.append(feats.numpy())
    finally:
        handle.remove()
        model.train(was_training)
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise ValueError("the data set is empty: the loader yielded no images")
    widths = {c.shape[1] for c in chunks}
    if len(widths) != 1:
        raise ValueError(f"layer {layer!r} changed its number of channels between batches: {sorted(widths)}")
    return np.concatenate(chunks, axis=0)
