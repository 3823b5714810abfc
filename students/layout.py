"""Memory layout for training convolutions: channels_last wherever torch runs it safely.

channels_last is the layout oneDNN (CPU) and tensor cores (CUDA) run convolutions fastest in:
1.2-1.5x for a WRN on one CPU thread. One exception: on CPU, oneDNN's backward pass of a
strided 1x1 convolution over fewer than 8 channels in channels_last corrupts the heap (seen
with torch 2.13 on AVX2: a WRN of width < 8, such as wrn-16-1:width=4, aborts within a few
steps), so a model holding such a convolution trains in the default layout there.

Batches are laid out explicitly either way: a one-channel batch can carry strides that fit
both layouts, and oneDNN then picks channels_last by itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["training_memory_format", "to_layout"]

_MIN_SAFE_CHANNELS = 8


def _unsafe_in_channels_last(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and tuple(module.kernel_size) == (1, 1)
        and max(module.stride) > 1
        and module.in_channels < _MIN_SAFE_CHANNELS
    )


def training_memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last, unless `model` holds a convolution that oneDNN cannot train in it on CPU."""
    if device.type == "cpu" and any(_unsafe_in_channels_last(m) for m in model.modules()):
        return torch.contiguous_format
    return torch.channels_last


def _canonical_strides(shape: torch.Size, memory_format: torch.memory_format) -> tuple[int, ...]:
    n, c, h, w = (max(int(s), 1) for s in shape)
    if memory_format == torch.channels_last:
        return (h * w * c, 1, w * c, c)
    return (c * h * w, h * w, w, 1)


def to_layout(x: Tensor, device: torch.device, memory_format: torch.memory_format) -> Tensor:
    """A 4-d batch on `device` with exactly the strides of `memory_format` (copied if needed)."""
    x = x.to(device, non_blocking=True)
    if x.dim() == 4 and x.stride() != _canonical_strides(x.shape, memory_format):
        x = x.clone(memory_format=memory_format)
    return x
