"""The public data sets' own file formats, read into checked numpy arrays.

IDX files (MNIST, Fashion-MNIST; gzip-compressed or raw) and CIFAR-10/100 python batches. A
missing file, a wrong magic number, a truncated file or a batch with unexpected keys/shapes
raises DataError naming the path and what was expected. CIFAR batches are Python pickles; they
are read with an unpickler that only rebuilds plain containers and numpy arrays. The data sets
themselves (ImageDataset, augmentation, statistics) are nonn.students.data's.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DataError", "read_idx", "read_idx_splits", "read_cifar10", "read_cifar100"]


class DataError(ValueError):
    """A data set file is missing, corrupt or not what was expected."""


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


def read_idx_splits(directory: Path, num_classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST-layout IDX files in `directory`: {"train", "test"} -> (float32 images in [0, 1], N x 1 x H x W;
    int64 labels), each checked (unsigned bytes, as many labels as images, labels below `num_classes`)."""
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_path = _find_file(directory, (f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"))
        lbl_path = _find_file(directory, (f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"))
        images, labels = read_idx(img_path, expected_ndim=3), read_idx(lbl_path, expected_ndim=1)
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise DataError(f"{img_path}: expected unsigned byte images and labels, got {images.dtype} / {labels.dtype}")
        if len(images) != len(labels):
            raise DataError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
        if labels.size and labels.max() >= num_classes:
            raise DataError(f"{lbl_path}: label {labels.max()} out of range for {num_classes} classes")
        splits[split] = (images[:, None].astype(np.float32) / 255.0, labels.astype(np.int64))
    return splits


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


CifarArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]


def read_cifar10(directory: Path) -> CifarArrays:
    """CIFAR-10's python batches (in `directory` or its cifar-10-batches-py/): train images and labels,
    test images and labels, class names."""
    root = _cifar_dir(directory, "cifar-10-batches-py")
    parts = [_cifar_arrays(root / f"data_batch_{i}", "labels") for i in range(1, 6)]
    test_x, test_y = _cifar_arrays(root / "test_batch", "labels")
    names = [f"class_{i}" for i in range(10)]
    if (root / "batches.meta").is_file():
        meta = _read_cifar_pickle(root / "batches.meta")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("label_names", names)]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    return train_x, train_y, test_x, test_y, names


def read_cifar100(directory: Path) -> CifarArrays:
    """CIFAR-100's python batches (in `directory` or its cifar-100-python/), fine labels: as read_cifar10."""
    root = _cifar_dir(directory, "cifar-100-python")
    train_x, train_y = _cifar_arrays(root / "train", "fine_labels")
    test_x, test_y = _cifar_arrays(root / "test", "fine_labels")
    names = [f"class_{i}" for i in range(100)]
    if (root / "meta").is_file():
        meta = _read_cifar_pickle(root / "meta")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get("fine_label_names", names)]
    return train_x, train_y, test_x, test_y, names
