"""Model zoo: a small registry of image classifiers with a uniform interface.

Every model returned by :func:`create_model` follows the same contract (as in timm), so that
the partitioner, the student ensemble and the exporter never need to know which network they
hold:

- ``forward(x) -> logits``;
- ``forward_features(x) -> (N, C, h, w)``, the final convolutional feature map, taken after
  the final BN + ReLU;
- ``forward_head(features) -> logits`` (global average pool + linear classifier);
- ``feature_layer``: the name of the sub-module whose output *is* that feature map, so forward
  hooks can capture it without rewriting the model;
- ``num_features``: channels of the feature map;
- ``arch``: a dict (name, num_classes, in_channels, kwargs) such that
  ``create_model(**model.arch)`` rebuilds the same architecture.

Names:

- ``wrn-D-K``: pre-activation Wide ResNet (Zagoruyko & Komodakis) of depth D = 6n + 4 and
  widening factor K, bias-free convolutions, for any number of input channels and any input
  size (the head pools globally). ``width`` sets the base width (16 in the paper), so thin
  students such as ``wrn-10-1`` with ``width=8`` are available; ``dropout`` adds dropout
  between the two convolutions of each block.
- ``cnn-small``: a plain four-convolution CNN with BN, ``width`` base channels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "register_model_family",
    "count_parameters",
    "WideResNet",
    "SmallCNN",
]

ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class _Family:
    pattern: re.Pattern[str]
    factory: Callable[..., nn.Module]
    examples: tuple[str, ...]
    description: str


_MODELS: dict[str, ModelFactory] = {}
_FAMILIES: dict[str, _Family] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering a factory ``fn(num_classes, in_channels, **kwargs) -> nn.Module``."""

    def decorator(fn: ModelFactory) -> ModelFactory:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return decorator


def register_model_family(
    pattern: str, examples: tuple[str, ...], description: str = ""
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a parametrised family such as ``wrn-(\\d+)-(\\d+)``.

    The factory is called as ``fn(match, num_classes, in_channels, **kwargs)``.
    """

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if pattern in _FAMILIES:
            raise ValueError(f"model family {pattern!r} is already registered")
        _FAMILIES[pattern] = _Family(re.compile(pattern), fn, tuple(examples), description)
        return fn

    return decorator


def list_models() -> list[str]:
    """Registered model names, with a few examples of each parametrised family."""
    names = set(_MODELS)
    for family in _FAMILIES.values():
        names.update(family.examples)
    return sorted(names)


def _describe_names() -> str:
    families = ", ".join(f"{f.description or f.pattern.pattern}" for f in _FAMILIES.values())
    return f"{', '.join(sorted(_MODELS))}, or {families}"


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    kwargs: dict[str, Any] | None = None,
    **kw: Any,
) -> nn.Module:
    """Build a registered model by name; ``create_model(**model.arch)`` rebuilds ``model``.

    ``kwargs`` (as stored in ``arch``) and extra keyword arguments are merged and passed to the
    factory, e.g. ``create_model("wrn-16-1", width=8, dropout=0.1)``.
    """
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    options = {**(kwargs or {}), **kw}
    key = name.strip().lower()
    try:
        if key in _MODELS:
            model = _MODELS[key](num_classes=num_classes, in_channels=in_channels, **options)
        else:
            for family in _FAMILIES.values():
                match = family.pattern.fullmatch(key)
                if match:
                    model = family.factory(match, num_classes=num_classes, in_channels=in_channels, **options)
                    break
            else:
                raise ValueError(f"unknown model {name!r}; expected {_describe_names()}")
    except TypeError as exc:  # an option the architecture does not take
        raise ValueError(f"model {name!r} does not accept options {sorted(options)}: {exc}") from exc
    model.arch = {"name": key, "num_classes": num_classes, "in_channels": in_channels, "kwargs": dict(options)}
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _init_weights(module: nn.Module) -> None:
    """He initialisation for convolutions, unit BN, zero biases (as in the WRN reference code)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class _ClassifierBase(nn.Module):
    """Shared head: global average pool over the final feature map, then a linear layer."""

    feature_layer: str = "act"
    num_features: int
    arch: dict[str, Any]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(features, 1).flatten(1)
        return self.fc(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus shortcut.

    When the shape changes, the shortcut is a 1x1 convolution applied to the activated input,
    as in the reference Wide ResNet.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if in_planes != out_planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + residual


class WideResNet(_ClassifierBase):
    """Pre-activation Wide ResNet WRN-depth-widen, bias-free convolutions.

    Three stages of (depth - 4) / 6 blocks with ``width * widen``, ``2 * width * widen`` and
    ``4 * width * widen`` channels, strides 1, 2, 2; final BN + ReLU (module ``act``), global
    average pooling and a linear classifier.
    """

    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen < 1:
            raise ValueError(f"Wide ResNet widening factor must be >= 1, got {widen}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"Wide ResNet base width must be a positive integer, got {width!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        blocks_per_stage = (depth - 4) // 6
        channels = [width, width * widen, 2 * width * widen, 4 * width * widen]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        stages = []
        for stage, stride in enumerate((1, 2, 2)):
            blocks = [
                PreActBlock(channels[stage] if i == 0 else channels[stage + 1], channels[stage + 1], stride if i == 0 else 1, dropout)
                for i in range(blocks_per_stage)
            ]
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(channels[3])
        self.act = nn.ReLU()
        self.fc = nn.Linear(channels[3], num_classes)
        self.num_features = channels[3]
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        return self.act(self.bn(out))


class SmallCNN(_ClassifierBase):
    """A plain CNN: two 3x3 conv-BN-ReLU pairs at ``width`` and ``2 * width`` channels, max-pool
    in between; the final ReLU (module ``act``) gives the feature map."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"cnn-small width must be a positive integer, got {width!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, width),
            *conv_bn_relu(width, width),
            nn.MaxPool2d(2, ceil_mode=True),
            *conv_bn_relu(width, 2 * width),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
        )
        self.bn = nn.BatchNorm2d(2 * width)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(2 * width, num_classes)
        self.num_features = 2 * width
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.features(x)))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(F.adaptive_avg_pool2d(features, 1).flatten(1)))


@register_model_family(
    r"wrn-(\d+)-(\d+)",
    examples=("wrn-10-1", "wrn-16-1", "wrn-16-2", "wrn-16-4", "wrn-28-10", "wrn-40-1", "wrn-40-2", "wrn-40-4"),
    description="wrn-D-K (pre-activation Wide ResNet, D = 6n + 4, K >= 1)",
)
def _wide_resnet(match: re.Match[str], num_classes: int, in_channels: int, **kwargs: Any) -> WideResNet:
    return WideResNet(int(match.group(1)), int(match.group(2)), num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model("cnn-small")
def _cnn_small(num_classes: int, in_channels: int, **kwargs: Any) -> SmallCNN:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, **kwargs)
