"""Image data sets: digits, MNIST, Fashion-MNIST, CIFAR-10/100, .npz, and image folders.

Everything here is numpy only (torch is not imported), so any stage can read data. The named
sets and .npz files load into an :class:`ImageDataset` with float32 images in [0, 1], NCHW,
int64 labels, per-channel mean/std of the training split, and the augmentation that suits the
set; an image folder is an ``ImageFolderDataset`` (nonn.students.image_folder) that decodes
pixels only when a batch is read. Both offer the :class:`DatasetInfo` interface
(``split_size``, ``labels``, ``read``, ``meta``), which is all the other stages use, and
record the :class:`DataSpec` that loads them again.

Files are checked as they are read (nonn.students.dataset_files reads the public sets' own
formats): a missing file, a wrong magic number, a truncated file or a batch with unexpected
keys/shapes raises :class:`DataError` naming the path and what was expected.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nonn.runtime.input_contract import InputContract, NormalizeSpec, contract_for
from nonn.students.dataset_files import DataError, read_cifar10, read_cifar100, read_idx_splits

__all__ = [
    "AugmentSpec",
    "DataError",
    "DataSpec",
    "DatasetInfo",
    "ImageDataset",
    "split_indices",
    "DATASET_NAMES",
    "DEFAULT_DATA_DIRS",
    "load_dataset",
    "resolve_data",
]

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class DataSpec:
    """What loads a data set again: a name or path (.npz, image folder), where a named set's
    files are, and the size images are resized to. Artifacts record it, so later stages find
    the data without being told."""

    dataset: str
    data_dir: str | None = None
    image_size: tuple[int, int] | None = None

    @classmethod
    def of(cls, dataset: str, data_dir: str | os.PathLike[str] | None = None, image_size: Any = None) -> "DataSpec":
        """A spec with file paths made absolute, so it still works from another directory."""
        path = Path(dataset).expanduser()
        if dataset.strip().lower() not in DATASET_NAMES + tuple(_ALIASES) and path.exists():
            dataset = str(path.resolve())
        size = None if image_size is None else tuple(int(v) for v in (image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)))
        return cls(dataset, None if data_dir is None else str(Path(data_dir).expanduser().resolve()), size)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "data_dir": self.data_dir, "image_size": None if self.image_size is None else list(self.image_size)}

    @classmethod
    def from_dict(cls, data: Any) -> "DataSpec | None":
        """The spec an artifact recorded, or None when it recorded none (or nothing usable)."""
        if not isinstance(data, dict) or not isinstance(data.get("dataset"), str) or not data["dataset"]:
            return None
        size = data.get("image_size")
        return cls(data["dataset"], data.get("data_dir"), None if not size else (int(size[0]), int(size[-1])))

    def describe(self) -> str:
        extra = (f", data dir {self.data_dir}" if self.data_dir else "") + (
            f", images resized to {self.image_size[0]}x{self.image_size[1]}" if self.image_size else ""
        )
        return f"{self.dataset}{extra}"

    def load(self) -> "DatasetInfo":
        return load_dataset(self.dataset, self.data_dir, self.image_size)


class DatasetInfo:
    """What every data set offers the stages: shape, classes, statistics, and images by index.

    Subclasses set name, num_classes, class_names, augment, spec and provide input_shape, mean,
    std, split_size, labels and read. `read` returns images as stored (uint8 pixels, or float32
    in [0, 1]), (n, C, H, W)."""

    name: str
    num_classes: int
    class_names: list[str]
    augment: "AugmentSpec"
    spec: DataSpec | None
    in_memory: bool = True

    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def split_size(self, split: str) -> int:
        raise NotImplementedError

    def labels(self, split: str) -> np.ndarray:
        raise NotImplementedError

    def read(self, split: str, index: Any) -> np.ndarray:
        raise NotImplementedError

    def contract(self, normalize: NormalizeSpec | str = "dataset") -> InputContract:
        """The input contract `normalize` gives for these images (not auto)."""
        spec = normalize if isinstance(normalize, NormalizeSpec) else NormalizeSpec(normalize)
        if spec.name != "dataset":  # an image folder's statistics cost a pass over a sample of it
            return contract_for(spec, self.input_shape, (), ())
        return contract_for(spec, self.input_shape, self.mean, self.std)

    def meta(self) -> dict[str, Any]:
        """What a checkpoint or bundle manifest records about the data (JSON-friendly)."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
            "spec": None if self.spec is None else self.spec.to_dict(),
        }


@dataclass
class ImageDataset(DatasetInfo):
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
    spec: DataSpec | None = None

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
        """(x - mean) / std per channel with this set's statistics, float32; x is (N, C, H, W) or (C, H, W)."""
        return self.contract().normalize_unit(x)

    def split_size(self, split: str) -> int:
        return len(self.labels(split))

    def labels(self, split: str) -> np.ndarray:
        return getattr(self, f"{_check_split(split)}_y")

    def read(self, split: str, index: Any) -> np.ndarray:
        return getattr(self, f"{_check_split(split)}_x")[index]

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.train_x)}, test={len(self.test_x)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def _load_idx_set(name: str, directory: Path, class_names: list[str], augment: AugmentSpec) -> ImageDataset:
    splits = read_idx_splits(directory, len(class_names))
    return ImageDataset(name, *splits["train"], *splits["test"], len(class_names), class_names, augment=augment)


def _load_cifar(name: str, read: Callable[[Path], Any], num_classes: int) -> Callable[[Path], ImageDataset]:
    def load(directory: Path) -> ImageDataset:
        train_x, train_y, test_x, test_y, names = read(directory)
        return ImageDataset(name, train_x, train_y, test_x, test_y, num_classes, names, augment=AugmentSpec(pad=4, flip=True))

    return load


# ----------------------------------------------------------------------------------------------
# digits and .npz

def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
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
    train, test = split_indices(labels, test_fraction=0.2, seed=0)
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
        train, test = split_indices(y, test_fraction=0.2, seed=0)
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
    "cifar10": _load_cifar("cifar10", read_cifar10, 10),
    "cifar100": _load_cifar("cifar100", read_cifar100, 100),
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}


def resize_images(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 (N, C, H, W) images in [0, 1] resized to `size` (H, W), bilinear (pillow)."""
    from nonn.students.image_folder import _pillow

    Image = _pillow()
    h, w = size
    if x.shape[2:] == (h, w):
        return x
    out = np.empty((*x.shape[:2], h, w), dtype=np.float32)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[i, c] = np.asarray(Image.fromarray(x[i, c], mode="F").resize((w, h), Image.BILINEAR))
    return np.clip(out, 0.0, 1.0)


def load_dataset(spec: str, data_dir: str | os.PathLike[str] | None = None, image_size: Any = None) -> DatasetInfo:
    """Load a data set by name (digits, mnist, fashion-mnist, cifar10, cifar100), .npz path or
    image folder (one subfolder per class, optional train/ and val/ or test/).

    `data_dir` overrides where a named set's files are looked for; `image_size` (H or (H, W))
    resizes every image.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"dataset must be one of {', '.join(DATASET_NAMES)}, a path to an .npz file or an image folder, got {spec!r}")
    data_spec = DataSpec.of(spec, data_dir, image_size)
    key = _ALIASES.get(spec.strip().lower(), spec.strip().lower())
    path = Path(spec).expanduser()
    if key not in DATASET_NAMES and path.is_dir():
        from nonn.students.image_folder import ImageFolderDataset

        folder = ImageFolderDataset(path, image_size)
        folder.spec = data_spec
        return folder
    if key == "digits":
        data = _load_digits()
    elif key in _NAMED:
        data = _NAMED[key](_resolve_dir(key, data_dir))
    elif spec.endswith(".npz") or path.is_file():
        data = _load_npz(path)
    else:
        raise DataError(f"unknown dataset {spec!r}: expected one of {', '.join(DATASET_NAMES)}, a path to an .npz file or an image folder")
    if data_spec.image_size is not None and data_spec.image_size != data.input_shape[1:]:
        h, w = data_spec.image_size
        data = ImageDataset(
            data.name, resize_images(data.train_x, (h, w)), data.train_y, resize_images(data.test_x, (h, w)), data.test_y,
            data.num_classes, data.class_names,
            augment=AugmentSpec(pad=max(1, round(data.augment.pad * h / data.input_shape[1])) if data.augment.pad else 0, flip=data.augment.flip),
        )
    data.spec = data_spec
    return data


def recorded_spec(record: Any) -> DataSpec | None:
    """The DataSpec an artifact recorded: a spec dict, or a data set meta() holding one (older
    artifacts recorded only a named set's name)."""
    if not isinstance(record, dict):
        return None
    if "dataset" in record:
        return DataSpec.from_dict(record)
    spec = DataSpec.from_dict(record.get("spec"))
    if spec is None and str(record.get("name", "")).lower() in DATASET_NAMES:
        spec = DataSpec(str(record["name"]).lower())
    return spec


def resolve_data(
    dataset: str | None,
    data_dir: str | os.PathLike[str] | None = None,
    image_size: Any = None,
    recorded: Any = (),
    fallback: str | None = None,
) -> DatasetInfo:
    """The data set a command runs on: `dataset` when given; else the first one an artifact
    recorded (`recorded`: (record, artifact) pairs, most authoritative first), said in one INFO
    line; else `fallback`. `data_dir` and `image_size`, when given, replace the recorded ones."""
    if dataset:
        return load_dataset(dataset, data_dir, image_size)
    for record, source in recorded:
        spec = recorded_spec(record)
        if spec is not None:
            spec = DataSpec(spec.dataset, str(data_dir) if data_dir is not None else spec.data_dir,
                            tuple(image_size) if image_size is not None else spec.image_size)  # type: ignore[arg-type]
            log.info("data set: %s, as recorded in %s (pass --dataset to use another)", spec.describe(), source)
            return spec.load()
    if fallback is None:
        sources = ", ".join(str(source) for _, source in recorded) or "the inputs"
        raise DataError(f"--dataset is required: {sources} record(s) no data set")
    return load_dataset(fallback, data_dir, image_size)
