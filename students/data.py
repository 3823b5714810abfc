"""Image data sets as plain numpy arrays: digits, MNIST, Fashion-MNIST, CIFAR-10/100, .npz.

Everything here is numpy only (torch is not imported), so any stage can read data. Every
loader returns an :class:`ImageDataset` with float32 images in [0, 1], NCHW, int64 labels,
per-channel mean/std of the training split, and the augmentation that suits the set.

Files are checked as they are read: a missing file, a wrong magic number, a truncated file or
a batch with unexpected keys/shapes raises :class:`DataError` naming the path and what was
expected. CIFAR batches are Python pickles; they are read with an unpickler that only
rebuilds plain containers and numpy arrays, and only from the directory given.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "AugmentSpec",
    "DataError",
    "ImageDataset",
    "DATASET_NAMES",
    "DEFAULT_DATA_DIRS",
    "load_dataset",
    "read_idx",
]


class DataError(ValueError):
    """A data set file is missing, corrupt or not what was expected."""


@dataclass(frozen=True)
class AugmentSpec:
    """Training-time augmentation: random crop after zero padding by `pad` pixels, and
    horizontal flips when `flip` (only where a mirrored image is still the same class)."""

    pad: int = 0
    flip: bool = False


FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DIGIT_CLASSES = [str(i) for i in range(10)]

# Where each named set is looked for when no --data-dir is given.
DEFAULT_DATA_DIRS: dict[str, tuple[str, ...]] = {
    "mnist": ("/usr/share/datasets/mnist",),
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
    "cifar10": ("/usr/share/datasets/cifar10", "/usr/share/datasets/cifar-10-batches-py"),
    "cifar100": ("/usr/share/datasets/cifar100", "/usr/share/datasets/cifar-100-python"),
}
DATASET_NAMES = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")


@dataclass
class ImageDataset:
    """A labelled image data set split into train and test, held in memory."""

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    augment: AugmentSpec = field(default_factory=AugmentSpec)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.ndim != 4:
                raise DataError(f"{self.name}: {split} images must be (N, C, H, W), got shape {x.shape}")
            if y.shape != (x.shape[0],):
                raise DataError(f"{self.name}: {split} labels have shape {y.shape}, expected ({x.shape[0]},)")
            setattr(self, f"{split}_x", np.ascontiguousarray(x, dtype=np.float32))
            setattr(self, f"{split}_y", np.ascontiguousarray(y, dtype=np.int64))
        if len(self.train_x) == 0:
            raise DataError(f"{self.name}: the training split is empty")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataError(f"{self.name}: train images are {self.train_x.shape[1:]} but test images are {self.test_x.shape[1:]}")
        for split, y in (("train", self.train_y), ("test", self.test_y)):
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise DataError(f"{self.name}: {split} labels must lie in [0, {self.num_classes - 1}], found {y.min()}..{y.max()}")
        if len(self.class_names) != self.num_classes:
            raise DataError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")
        if not self.mean or not self.std:
            # Per-channel statistics of the training split, accumulated in float64.
            self.mean = tuple(float(v) for v in self.train_x.mean(axis=(0, 2, 3), dtype=np.float64))
            self.std = tuple(float(max(v, 1e-8)) for v in self.train_x.std(axis=(0, 2, 3), dtype=np.float64))
        if len(self.mean) != self.input_shape[0] or len(self.std) != self.input_shape[0]:
            raise DataError(f"{self.name}: mean/std need one value per channel ({self.input_shape[0]})")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """(x - mean) / std per channel, float32; x is (N, C, H, W) or (C, H, W)."""
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        return ((np.asarray(x, dtype=np.float32) - mean) / std).astype(np.float32, copy=False)

    def meta(self) -> dict[str, Any]:
        """What a checkpoint or bundle manifest records about the data (JSON-friendly)."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.train_x)}, test={len(self.test_x)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


# ----------------------------------------------------------------------------------------------
# IDX (MNIST / Fashion-MNIST)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip file ({exc})") from exc
    return raw


def read_idx(path: str | os.PathLike[str], expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or raw), checking its magic number and size."""
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (expected magic bytes 00 00 <type> <ndim>, got {data[:4].hex(' ') or 'an empty file'})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    if expected_ndim is not None and ndim != expected_ndim:
        magic = 0x0800 + expected_ndim
        raise DataError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim} (magic {magic}, got {int.from_bytes(data[:4], 'big')})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, expected at least {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{path}: IDX file of shape {shape} should be {expected} bytes, got {len(data)} (truncated or corrupt)")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find_file(directory: Path, stems: tuple[str, ...]) -> Path:
    candidates = [directory / f"{stem}{suffix}" for stem in stems for suffix in (".gz", "")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory}: missing {stems[0]}[.gz] (looked for {', '.join(c.name for c in candidates)})")


def _load_idx_set(name: str, directory: Path, class_names: list[str], augment: AugmentSpec) -> ImageDataset:
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_path = _find_file(directory, (f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"))
        lbl_path = _find_file(directory, (f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"))
        images, labels = read_idx(img_path, expected_ndim=3), read_idx(lbl_path, expected_ndim=1)
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise DataError(f"{img_path}: expected unsigned byte images and labels, got {images.dtype} / {labels.dtype}")
        if len(images) != len(labels):
            raise DataError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
        if labels.size and labels.max() >= len(class_names):
            raise DataError(f"{lbl_path}: label {labels.max()} out of range for {len(class_names)} classes")
        splits[split] = (images[:, None].astype(np.float32) / 255.0, labels.astype(np.int64))
    return ImageDataset(name, *splits["train"], *splits["test"], len(class_names), class_names, augment=augment)


# ----------------------------------------------------------------------------------------------
# CIFAR python batches

class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only builtin containers and numpy arrays, never arbitrary code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
        ("copyreg", "_reconstructor"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_pickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: missing CIFAR batch file")
    try:
        with open(path, "rb") as fh:
            obj = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}: not a readable CIFAR python batch ({exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict in the CIFAR batch, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_cifar_pickle(path)
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{path}: CIFAR batch needs keys 'data' and {label_key!r}, found {sorted(batch)}")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DataError(f"{path}: CIFAR 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but {labels.shape} labels")
    return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, labels


def _cifar_dir(directory: Path, subdir: str) -> Path:
    return directory / subdir if (directory / subdir).is_dir() else directory


def _load_cifar10(directory: Path) -> ImageDataset:
    root = _cifar_dir(directory, "cifar-10-batches-py")
    parts = [_cifar_arrays(root / f"data_batch_{i}", "labels") for i in range(1, 6)]
    test_x, test_y = _cifar_arrays(root / "test_batch", "labels")
    names = [f"class_{i}" for i in range(10)]
    if (root / "batches.meta").is_file():
        meta = _read_cifar_pickle(root / "batches.meta")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", names)]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    return ImageDataset("cifar10", train_x, train_y, test_x, test_y, 10, names, augment=AugmentSpec(pad=4, flip=True))


def _load_cifar100(directory: Path) -> ImageDataset:
    root = _cifar_dir(directory, "cifar-100-python")
    train_x, train_y = _cifar_arrays(root / "train", "fine_labels")
    test_x, test_y = _cifar_arrays(root / "test", "fine_labels")
    names = [f"class_{i}" for i in range(100)]
    if (root / "meta").is_file():
        meta = _read_cifar_pickle(root / "meta")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("fine_label_names", names)]
    return ImageDataset("cifar100", train_x, train_y, test_x, test_y, 100, names, augment=AugmentSpec(pad=4, flip=True))


# ----------------------------------------------------------------------------------------------
# digits and .npz

def _split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: the same `seed` always gives the same test set."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _load_digits() -> ImageDataset:
    from sklearn.datasets import load_digits  # lazy: only this set needs scikit-learn

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[:, None]
    labels = bunch.target.astype(np.int64)
    train, test = _split_indices(labels, test_fraction=0.2, seed=0)
    return ImageDataset(
        "digits", images[train], labels[train], images[test], labels[test], 10, list(DIGIT_CLASSES), augment=AugmentSpec(pad=1, flip=False)
    )


def _to_nchw(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    """Images as (N, C, H, W) float32 in [0, 1] from (N,H,W), (N,H,W,C) or (N,C,H,W)."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{path}: array {key!r} must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{path}: integer array {key!r} must hold pixel values in [0, 255]")
        return x.astype(np.float32) / 255.0
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{path}: array {key!r} contains NaN or infinite values")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise DataError(f"{path}: float array {key!r} must hold values in [0, 1] (or use uint8 in [0, 255]), found {x.min():.3g}..{x.max():.3g}")
        return x
    raise DataError(f"{path}: array {key!r} has unsupported dtype {x.dtype}")


def _labels(y: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key!r} must be integer labels of shape ({n},), got {y.dtype} {y.shape}")
    if n and y.min() < 0:
        raise DataError(f"{path}: {key!r} has negative labels")
    return y.astype(np.int64)


def _load_npz(path: Path) -> ImageDataset:
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected an .npz with arrays x and y)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled object arrays), OSError
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from exc
    if "x" not in arrays or "y" not in arrays:
        raise DataError(f"{path}: .npz must contain arrays 'x' and 'y' (optional 'x_test', 'y_test', 'class_names'), found {sorted(arrays)}")
    x = _to_nchw(arrays["x"], path, "x")
    y = _labels(arrays["y"], len(x), path, "y")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: give both 'x_test' and 'y_test' or neither")
    if "x_test" in arrays:
        train_x, train_y = x, y
        test_x = _to_nchw(arrays["x_test"], path, "x_test")
        test_y = _labels(arrays["y_test"], len(test_x), path, "y_test")
    else:
        train, test = _split_indices(y, test_fraction=0.2, seed=0)
        train_x, train_y, test_x, test_y = x[train], y[train], x[test], y[test]
    if "class_names" in arrays:
        class_names = [str(c) for c in arrays["class_names"].tolist()]
        num_classes = len(class_names)
    else:
        num_classes = int(max(train_y.max(initial=0), test_y.max(initial=0))) + 1
        class_names = [str(i) for i in range(num_classes)]
    _, h, w = train_x.shape[1:]
    return ImageDataset(
        path.stem, train_x, train_y, test_x, test_y, num_classes, class_names, augment=AugmentSpec(pad=max(1, min(h, w) // 8), flip=False)
    )


# ----------------------------------------------------------------------------------------------

def _resolve_dir(name: str, data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        if not directory.is_dir():
            raise DataError(f"--data-dir {directory}: not a directory (expected the {name} files there)")
        return directory
    for candidate in DEFAULT_DATA_DIRS[name]:
        if Path(candidate).is_dir():
            return Path(candidate)
    raise DataError(f"{name}: no data directory found (looked in {', '.join(DEFAULT_DATA_DIRS[name])}); pass --data-dir DIR")


_NAMED: dict[str, Callable[[Path], ImageDataset]] = {
    "mnist": lambda d: _load_idx_set("mnist", d, list(DIGIT_CLASSES), AugmentSpec(pad=2, flip=False)),
    "fashion-mnist": lambda d: _load_idx_set("fashion-mnist", d, list(FASHION_MNIST_CLASSES), AugmentSpec(pad=2, flip=True)),
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}


def load_dataset(spec: str, data_dir: str | os.PathLike[str] | None = None) -> ImageDataset:
    """Load a data set by name (digits, mnist, fashion-mnist, cifar10, cifar100) or .npz path.

    `data_dir` overrides where a named set's files are looked for.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"dataset must be one of {', '.join(DATASET_NAMES)} or a path to an .npz file, got {spec!r}")
    key = _ALIASES.get(spec.strip().lower(), spec.strip().lower())
    if key == "digits":
        return _load_digits()
    if key in _NAMED:
        return _NAMED[key](_resolve_dir(key, data_dir))
    if spec.endswith(".npz") or Path(spec).is_file():
        return _load_npz(Path(spec).expanduser())
    raise DataError(f"unknown dataset {spec!r}: expected one of {', '.join(DATASET_NAMES)} or a path to an .npz file")
