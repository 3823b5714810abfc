"""Image-folder data sets (the layout torchvision's ImageFolder reads), read from disk in batches.

    root/<class>/<image>                   one folder per class; a seeded, stratified split
                                           holds out 20 % of each class as the test split
    root/train/<class>/..., root/val/...   explicit splits (``test/`` instead of ``val/`` works)

Classes are the sorted names of the training split's class folders, as ImageFolder numbers
them; images are PNG, JPEG, BMP, GIF, WebP, TIFF or PPM/PGM files anywhere below a class
folder. Only the file list and labels are held in memory: pixels are decoded (pillow) when a
batch is read, so memory is bounded by the batch, not by the data set. numpy and pillow only
(no torch), so `nonn simulate` and `nonn infer` read the same folders.

When the folder is opened every file's header is read once: a file pillow cannot open, an
empty class folder, or images of different sizes without `image_size` are a DataError naming
the file or folder. Images keep their colour: the set has 3 channels when any image is in
colour, else 1. `image_size` (H, W) resizes every image (bilinear, antialiased).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nonn.students.data import AugmentSpec, DataError, DatasetInfo, split_indices

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "decode_image", "list_images", "images_to_classify"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_TEST_DIRS = ("val", "test")
STATS_SAMPLE = 1000  # training images the data set's mean/std are computed from


def _pillow() -> Any:
    try:
        from PIL import Image
    except ModuleNotFoundError as exc:
        raise DataError("reading image folders needs pillow: pip install pillow (or pip install 'nonn[train]')") from exc
    return Image


def _visible_dirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def list_images(folder: Path) -> list[Path]:
    """Every image file below `folder` (recursively, hidden entries skipped), in sorted order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def _class_files(split_dir: Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[Path], np.ndarray]:
    """(class names, files, labels) of one split directory holding one folder per class."""
    dirs = _visible_dirs(split_dir)
    if not dirs:
        raise DataError(f"{split_dir}: no class folders (expected one subfolder of images per class, e.g. {split_dir}/cat/001.png)")
    names = [d.name for d in dirs]
    if classes is not None:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise DataError(f"{split_dir}: class folder(s) {', '.join(unknown)} do not exist in the training split ({', '.join(classes)})")
    order = list(classes) if classes is not None else names
    files: list[Path] = []
    labels: list[int] = []
    for d in dirs:
        images = list_images(d)
        if not images:
            raise DataError(
                f"{d}: class folder {d.name!r} holds no images (looked for {', '.join(e[1:] for e in IMAGE_EXTENSIONS[:4])}, ... files)"
            )
        files.extend(images)
        labels.extend([order.index(d.name)] * len(images))
    return order, files, np.asarray(labels, dtype=np.int64)


def _parse_size(image_size: Any) -> tuple[int, int] | None:
    if image_size is None:
        return None
    size = (int(image_size), int(image_size)) if isinstance(image_size, (int, np.integer)) else tuple(int(v) for v in image_size)
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) != 2 or min(size) < 1:
        raise DataError(f"image size must be H or (H, W) of positive integers, got {image_size!r}")
    return size  # type: ignore[return-value]


def decode_image(path: Path, mode: str, size: tuple[int, int] | None, expected: tuple[int, int] | None = None) -> np.ndarray:
    """One image file -> uint8 (C, H, W) in `mode` ("L" or "RGB"), resized to `size` (H, W) if given.

    Without `size`, an image that is not `expected` (H, W) is a DataError."""
    Image = _pillow()
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    if size is None and expected is not None and pixels.shape[:2] != expected:
        raise DataError(
            f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]} but the others are {expected[1]}x{expected[0]}; "
            "pass --image-size H[,W] to resize every image"
        )
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _scan(files: Sequence[Path]) -> tuple[Counter, dict[tuple[int, int], Path], bool]:
    """Header of every file: counts of (H, W), an example file per size, whether any is in colour."""
    Image = _pillow()
    sizes: Counter = Counter()
    example: dict[tuple[int, int], Path] = {}
    colour = False
    for path in files:
        try:
            with Image.open(path) as image:
                w, h = image.size
                colour = colour or image.mode not in _GRAY_MODES
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: not a readable image ({exc})") from None
        sizes[(h, w)] += 1
        example.setdefault((h, w), path)
    return sizes, example, colour


class ImageFolderDataset(DatasetInfo):
    """A labelled image folder split into train and test; pixels stay on disk until read."""

    in_memory = False

    def __init__(self, root: str | os.PathLike[str], image_size: Any = None, *, test_fraction: float = 0.2, seed: int = 0) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a directory (expected an image folder with one subfolder per class)")
        self.image_size = _parse_size(image_size)
        self.name = self.root.resolve().name
        self.files: dict[str, list[Path]] = {}
        self._labels: dict[str, np.ndarray] = {}
        train_dir = self.root / "train"
        test_dir = next((self.root / d for d in _TEST_DIRS if (self.root / d).is_dir()), None)
        if train_dir.is_dir() and _visible_dirs(train_dir):
            self.class_names, files, labels = _class_files(train_dir)
            if test_dir is not None:
                _, test_files, test_labels = _class_files(test_dir, self.class_names)
                self.files = {"train": files, "test": test_files}
                self._labels = {"train": labels, "test": test_labels}
                self.layout = f"train/ and {test_dir.name}/"
            else:
                self._split(files, labels, test_fraction, seed)
                self.layout = f"train/, {round(100 * test_fraction)} % of each class held out (seed {seed})"
        else:
            self.class_names, files, labels = _class_files(self.root)
            self._split(files, labels, test_fraction, seed)
            self.layout = f"class folders, {round(100 * test_fraction)} % of each class held out (seed {seed})"
        self.num_classes = len(self.class_names)
        sizes, example, colour = _scan(self.files["train"] + self.files["test"])
        if self.image_size is None and len(sizes) > 1:
            shown = ", ".join(f"{w}x{h} ({n} image{'s' if n != 1 else ''}, e.g. {example[(h, w)]})" for (h, w), n in sizes.most_common(3))
            raise DataError(f"{self.root}: images have {len(sizes)} different sizes: {shown}; pass --image-size H[,W] to resize them all")
        self.mode = "RGB" if colour else "L"
        h, w = self.image_size or next(iter(sizes))
        self._shape = (3 if colour else 1, h, w)
        self.augment = AugmentSpec(pad=max(1, min(h, w) // 8), flip=False)
        self._stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self.spec = None  # set by load_dataset

    def _split(self, files: list[Path], labels: np.ndarray, test_fraction: float, seed: int) -> None:
        train, test = split_indices(labels, test_fraction, seed)
        self.files = {"train": [files[i] for i in train], "test": [files[i] for i in test]}
        self._labels = {"train": labels[train], "test": labels[test]}

    # ---- the DatasetInfo interface

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self._shape

    def split_size(self, split: str) -> int:
        return len(self.files[_check_split(split)])

    def labels(self, split: str) -> np.ndarray:
        return self._labels[_check_split(split)]

    def read(self, split: str, index: Any) -> np.ndarray:
        """Images `index` of `split` as stored: uint8 (n, C, H, W), decoded now."""
        return self.reader(split)(np.asarray(index, dtype=np.int64).reshape(-1))

    def reader(self, split: str) -> "FolderReader":
        """A picklable callable reading batches of `split` (for DataLoader worker processes)."""
        return FolderReader(self.files[_check_split(split)], self.mode, self.image_size, self._shape)

    @property
    def mean(self) -> tuple[float, ...]:
        return self._statistics()[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self._statistics()[1]

    def _statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean/std of [0, 1] pixels over a seeded sample of training images."""
        if self._stats is None:
            n = self.split_size("train")
            pick = np.sort(np.random.default_rng(0).permutation(n)[:STATS_SAMPLE])
            total = np.zeros(self._shape[0])
            squares = np.zeros(self._shape[0])
            for start in range(0, len(pick), 128):
                x = self.read("train", pick[start : start + 128]).astype(np.float64) / 255.0
                total += x.sum(axis=(0, 2, 3))
                squares += (x * x).sum(axis=(0, 2, 3))
            count = len(pick) * self._shape[1] * self._shape[2]
            mean = total / count
            std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
            self._stats = tuple(float(v) for v in mean), tuple(float(max(v, 1e-8)) for v in std)
        return self._stats

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, train={self.split_size('train')}, test={self.split_size('test')}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}, layout={self.layout!r})"
        )


class FolderReader:
    """Decodes batches of one split's files into uint8 (n, C, H, W) arrays."""

    def __init__(self, files: list[Path], mode: str, size: tuple[int, int] | None, shape: tuple[int, int, int]) -> None:
        self.files, self.mode, self.size, self.shape = files, mode, size, shape

    def __call__(self, index: Sequence[int]) -> np.ndarray:
        out = np.empty((len(index), *self.shape), dtype=np.uint8)
        for row, i in enumerate(index):
            out[row] = decode_image(self.files[int(i)], self.mode, self.size, self.shape[1:])
        return out


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def images_to_classify(root: str | os.PathLike[str], class_names: Sequence[str]) -> tuple[list[Path], np.ndarray | None]:
    """The image files below `root` for inference, and their labels when `root` holds one
    folder per class (named as in `class_names`); a folder of images alone has no labels."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    dirs = _visible_dirs(root)
    if not dirs:
        files = list_images(root)
        if not files:
            raise DataError(f"{root}: no images (looked for {', '.join(e[1:] for e in IMAGE_EXTENSIONS[:4])}, ... files)")
        return files, None
    unknown = [d.name for d in dirs if d.name not in class_names]
    if unknown:
        raise DataError(f"{root}: folder(s) {', '.join(unknown)} are not classes of the bundle ({', '.join(class_names)})")
    _, files, labels = _class_files(root, [d.name for d in dirs])
    index = {name: i for i, name in enumerate(class_names)}
    return files, np.asarray([index[dirs[label].name] for label in labels], dtype=np.int64)


def read_images(files: Sequence[Path], shape: Sequence[int]) -> np.ndarray:
    """Decode `files` into uint8 (n, C, H, W) of `shape` (C, H, W), resized as needed."""
    c, h, w = (int(d) for d in shape)
    return FolderReader(list(files), "L" if c == 1 else "RGB", (h, w), (c, h, w))(range(len(files)))
