"""The input contract: how an image as stored becomes what a model takes. One definition for
every stage (teacher checkpoint, partition.json, students checkpoint, bundle manifest, the
aggregator, `nonn simulate`), numpy only so devices and clients can use it without torch.

An image as stored is uint8 pixels (0..255) or floats in [0, 1], laid out (N, C, H, W),
(N, H, W, C) or, for one channel, (N, H, W). `pixel_scale` maps uint8 pixels to [0, 1]; then
each channel is normalised, ``(x - mean) / std``. `normalize` names where mean and std came
from: ``dataset`` (the training split's statistics), ``none`` (mean 0, std 1: images as
stored, scaled to [0, 1]), ``imagenet`` (torchvision's constants) or ``explicit``.

`datatype` says what the models take: ``FP32``, normalised floats (PyTorch models, and bundles
exported for normalised input), or ``UINT8``, raw pixels that the ONNX graph itself scales and
normalises. `out_of_range` says what happens to float pixels outside [0, 1]: ``error`` refuses
them, ``warn`` logs one warning and clips them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np

from nonn.artifacts import ArtifactError

__all__ = [
    "InputContract",
    "NormalizeSpec",
    "NORMALIZE_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "parse_normalize",
    "contract_for",
    "normalization_candidates",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE_NAMES = ("auto", "dataset", "none", "imagenet")
DATATYPES = ("FP32", "UINT8")
OUT_OF_RANGE = ("error", "warn")


@dataclass(frozen=True)
class NormalizeSpec:
    """A parsed `--normalize`: a name (auto, dataset, none, imagenet) or explicit mean/std."""

    name: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __str__(self) -> str:
        if self.name != "explicit":
            return self.name
        return f"{','.join(f'{v:g}' for v in self.mean)}:{','.join(f'{v:g}' for v in self.std)}"


def parse_normalize(text: str) -> NormalizeSpec:
    """`--normalize` text: auto | dataset | none | imagenet | MEAN,..:STD,.. (one value per channel)."""
    value = (text or "").strip()
    if value.lower() in NORMALIZE_NAMES:
        return NormalizeSpec(value.lower())
    means, sep, stds = value.partition(":")
    try:
        mean = tuple(float(v) for v in means.split(","))
        std = tuple(float(v) for v in stds.split(","))
    except ValueError:
        mean = std = ()
    if not sep or not mean or not std or not all(math.isfinite(v) for v in mean + std):
        raise ValueError(
            f"--normalize {text!r}: expected auto, dataset, none, imagenet or per-channel MEAN,..:STD,.. "
            "(e.g. 0.5,0.5,0.5:0.25,0.25,0.25 for 3 channels, values on the [0, 1] pixel scale)"
        )
    if len(mean) != len(std):
        raise ValueError(f"--normalize {text!r}: {len(mean)} mean value(s) but {len(std)} std value(s); give one of each per channel")
    if any(s <= 0 for s in std):
        raise ValueError(f"--normalize {text!r}: every std must be positive")
    return NormalizeSpec("explicit", mean, std)


@dataclass(frozen=True)
class InputContract:
    """What a model takes, and how to get there from an image as stored (see the module doc)."""

    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalize: str = "dataset"  # dataset | none | imagenet | explicit
    pixel_scale: float = 1.0 / 255.0
    layout: str = "NCHW"
    datatype: str = "FP32"  # FP32: normalised floats; UINT8: raw pixels, normalised in the graph
    out_of_range: str = "error"  # float pixels outside [0, 1]: error | warn (and clip)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        problem = self.problem()
        if problem:
            raise ValueError(f"invalid input contract: {problem}")

    def problem(self) -> str | None:
        """What is inconsistent, or None."""
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            return f"input_shape must be (C, H, W) of positive sizes, got {list(self.input_shape)}"
        c = self.input_shape[0]
        if len(self.mean) != c or len(self.std) != c:
            return f"mean/std need one value per channel ({c}), got {len(self.mean)}/{len(self.std)}"
        if not all(math.isfinite(v) for v in self.mean) or not all(math.isfinite(s) and s > 0 for s in self.std):
            return f"mean must be finite and std positive, got mean {list(self.mean)}, std {list(self.std)}"
        if self.normalize not in ("dataset", "none", "imagenet", "explicit"):
            return f"normalize must be dataset, none, imagenet or explicit, got {self.normalize!r}"
        if not (math.isfinite(self.pixel_scale) and self.pixel_scale > 0):
            return f"pixel_scale must be positive, got {self.pixel_scale!r}"
        if self.layout != "NCHW":
            return f"only the NCHW layout is supported, got {self.layout!r}"
        if self.datatype not in DATATYPES:
            return f"datatype must be one of {', '.join(DATATYPES)}, got {self.datatype!r}"
        if self.out_of_range not in OUT_OF_RANGE:
            return f"out_of_range must be one of {', '.join(OUT_OF_RANGE)}, got {self.out_of_range!r}"
        return None

    # ---- description

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    @property
    def raw_input(self) -> bool:
        """True when the models take raw uint8 pixels (and normalise them themselves)."""
        return self.datatype == "UINT8"

    def describe(self) -> str:
        """One phrase, e.g. 'none (images as stored, scaled to [0, 1])'."""
        if self.normalize == "none":
            return "none (images as stored, scaled to [0, 1])"
        values = f"mean {_fmt(self.mean)}, std {_fmt(self.std)}"
        return f"{self.normalize} ({values})"

    def same_normalization(self, other: "InputContract") -> bool:
        """Whether two contracts turn the same image into the same model input."""
        return (
            self.input_shape == other.input_shape
            and np.allclose(self.mean, other.mean, rtol=0, atol=1e-6)
            and np.allclose(self.std, other.std, rtol=0, atol=1e-6)
            and math.isclose(self.pixel_scale, other.pixel_scale, rel_tol=1e-9)
        )

    def with_datatype(self, datatype: str, out_of_range: str | None = None) -> "InputContract":
        return replace(self, datatype=datatype, out_of_range=out_of_range or self.out_of_range)

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (a, b) with normalised = raw_pixel * a + b, each shaped (C, 1, 1), float32.

        The same affine map the ONNX graphs apply to UINT8 input."""
        std = np.asarray(self.std, dtype=np.float64)
        a = self.pixel_scale / std
        b = -np.asarray(self.mean, dtype=np.float64) / std
        shape = (self.channels, 1, 1)
        return a.astype(np.float32).reshape(shape), b.astype(np.float32).reshape(shape)

    # ---- arrays

    def as_nchw(self, images: Any) -> np.ndarray:
        """Images as (N, C, H, W), from (N, C, H, W), (N, H, W, C) or (N, H, W) for one channel."""
        c, h, w = self.input_shape
        x = np.asarray(images)
        if x.ndim == 3 and c == 1 and x.shape[1:] == (h, w):
            x = x[:, None]
        elif x.ndim == 4 and x.shape[1:] != (c, h, w) and x.shape[1:] == (h, w, c):
            x = x.transpose(0, 3, 1, 2)
        if x.ndim != 4 or x.shape[1:] != (c, h, w):
            one = f" or (N, {h}, {w})" if c == 1 else ""
            raise ValueError(f"images have shape {list(x.shape)}; expected (N, {c}, {h}, {w}), (N, {h}, {w}, {c}){one}")
        return x

    def _checked_float(self, x: np.ndarray) -> np.ndarray:
        """Float pixels as float32 in [0, 1]: NaN is refused, values outside [0, 1] as `out_of_range` says."""
        x = x.astype(np.float32, copy=False)
        if x.size == 0:
            return x
        low, high = float(np.min(x)), float(np.max(x))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("images contain NaN or infinite values")
        if low >= 0.0 and high <= 1.0:
            return x
        message = (
            f"float images must hold pixels in [0, 1], found {low:.4g}..{high:.4g}"
            + (" (pixels 0..255? send them as uint8, or divide by 255)" if high > 1.0 else "")
        )
        if self.out_of_range == "error":
            raise ValueError(message)
        log.warning("%s; clipping to [0, 1]", message)
        return np.clip(x, 0.0, 1.0)

    def to_unit(self, images: Any) -> np.ndarray:
        """Images as stored -> float32 (N, C, H, W) in [0, 1]."""
        x = self.as_nchw(images)
        if x.dtype == np.uint8:
            return x.astype(np.float32) * np.float32(self.pixel_scale)
        if x.dtype.kind != "f":
            raise ValueError(f"images have dtype {x.dtype}; expected uint8 pixels or floats in [0, 1]")
        return self._checked_float(x)

    def normalize_unit(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) / std per channel for float images already in [0, 1] (N, C, H, W)."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        return np.ascontiguousarray((np.asarray(x, dtype=np.float32) - mean) / std, dtype=np.float32)

    def to_uint8(self, images: Any) -> np.ndarray:
        """Images as stored -> uint8 (N, C, H, W) pixels (floats in [0, 1] are rounded)."""
        x = self.as_nchw(images)
        if x.dtype == np.uint8:
            return np.ascontiguousarray(x)
        if x.dtype.kind != "f":
            raise ValueError(f"images have dtype {x.dtype}; expected uint8 pixels or floats in [0, 1]")
        unit = self._checked_float(x)
        return np.ascontiguousarray(np.rint(unit / np.float32(self.pixel_scale)).clip(0, 255).astype(np.uint8))

    def prepare(self, images: Any) -> np.ndarray:
        """Images as stored -> exactly what the models take (`datatype`): uint8 pixels, or
        normalised float32, both (N, C, H, W) and C-contiguous."""
        if self.raw_input:
            return self.to_uint8(images)
        return self.normalize_unit(self.to_unit(images))

    # ---- (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "input contract") -> "InputContract":
        """Build from a recorded dict; ArtifactError naming `source` when it is malformed."""
        if not isinstance(data, dict):
            raise ArtifactError(f"{source}: input_contract must be an object, got {type(data).__name__}")
        missing = [k for k in ("input_shape", "mean", "std") if k not in data]
        if missing:
            raise ArtifactError(f"{source}: input_contract is missing {', '.join(missing)}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data and data[k] is not None}
        try:
            return cls(**known)
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"{source}: {exc}") from exc

    @classmethod
    def from_dataset_meta(cls, meta: dict[str, Any], source: str = "checkpoint") -> "InputContract":
        """The contract of an artifact that recorded only its data set's mean/std (normalised by them)."""
        return cls.from_dict({"input_shape": meta.get("input_shape"), "mean": meta.get("mean"), "std": meta.get("std"),
                              "normalize": "dataset"}, source)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def contract_for(spec: NormalizeSpec, input_shape: Sequence[int], dataset_mean: Sequence[float], dataset_std: Sequence[float]) -> InputContract:
    """The contract a non-auto `--normalize` gives for images of `input_shape`; a ValueError
    naming the flag when it does not fit the images' channels."""
    c = int(input_shape[0])
    if spec.name == "auto":
        raise ValueError("--normalize auto is resolved by scoring the teacher, not here")
    if spec.name == "dataset":
        mean, std = tuple(dataset_mean), tuple(dataset_std)
    elif spec.name == "none":
        mean, std = (0.0,) * c, (1.0,) * c
    elif spec.name == "imagenet":
        if c != 3:
            raise ValueError(f"--normalize imagenet: the ImageNet constants are for 3 channels, the images have {c}")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        if len(spec.mean) != c:
            raise ValueError(
                f"--normalize {spec}: {len(spec.mean)} mean and {len(spec.std)} std value(s), but the images have {c} "
                f"channel{'s' if c > 1 else ''}: give one mean and one std per channel"
            )
        mean, std = spec.mean, spec.std
    return InputContract(tuple(int(d) for d in input_shape), mean, std, normalize=spec.name)


def normalization_candidates(input_shape: Sequence[int], dataset_mean: Sequence[float], dataset_std: Sequence[float]) -> list[InputContract]:
    """What `--normalize auto` tries: the data set's statistics, none, and (3 channels) ImageNet's."""
    names = ["dataset", "none"] + (["imagenet"] if int(input_shape[0]) == 3 else [])
    return [contract_for(NormalizeSpec(n), input_shape, dataset_mean, dataset_std) for n in names]
