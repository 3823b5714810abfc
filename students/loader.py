"""Mini-batches of an in-memory ImageDataset as torch tensors, augmented on whole batches.

The data sets nonn trains on fit in memory, so a DataLoader with worker processes would only
add start-up time and nondeterminism. :class:`BatchLoader` indexes the arrays directly, crops
and flips a whole batch at once with tensor indexing, then normalises. All randomness (order,
crop offsets, flips) comes from one ``torch.Generator`` whose state is saved in checkpoints, so
a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from nonn.students.data import AugmentSpec, ImageDataset

__all__ = ["BatchLoader", "make_loader", "augment_batch"]


def augment_batch(x: torch.Tensor, spec: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding and (if ``spec.flip``) random horizontal flip, per image.

    ``x`` is an (N, C, H, W) batch of raw [0, 1] images; padding is black, as in torchvision's
    RandomCrop before Normalize. One vectorised gather, no Python loop over images.
    """
    n, _, h, w = x.shape
    if spec.pad > 0:
        p = spec.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
        batch = torch.arange(n)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (N, C, H, W)
    if spec.flip:
        flip = torch.rand(n, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


class BatchLoader:
    """Iterable of normalised ``(x, y)`` batches over one split of an ImageDataset.

    With ``train=True`` the order is reshuffled every pass and batches are augmented as the
    data set's AugmentSpec says. ``state_dict()`` / ``load_state_dict()`` save and restore the
    random generator between passes, for exact resume.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        split: str = "train",
        batch_size: int = 128,
        train: bool | None = None,
        seed: int = 0,
        limit: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive number of images, got {limit!r}")
        images: np.ndarray = getattr(dataset, f"{split}_x")
        labels: np.ndarray = getattr(dataset, f"{split}_y")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        if len(images) == 0:
            raise ValueError(f"{dataset.name}: the {split} split is empty")
        self.dataset = dataset
        self.split = split
        self.batch_size = batch_size
        self.train = split == "train" if train is None else bool(train)
        self.drop_last = drop_last
        self.images = torch.from_numpy(images)  # shares memory with the numpy array
        self.labels = torch.from_numpy(labels)
        self.augment = dataset.augment if self.train else AugmentSpec()
        self.mean = torch.tensor(dataset.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(dataset.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.generator = torch.Generator().manual_seed(int(seed))

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.num_samples
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            if self.drop_last and len(index) < self.batch_size:
                break
            x = self.images[index]
            if self.train:
                x = augment_batch(x, self.augment, self.generator)
            yield (x - self.mean) / self.std, self.labels[index]

    def state_dict(self) -> dict[str, Any]:
        """The generator state (a uint8 tensor), to be saved at the end of a pass."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def make_loader(
    dataset: ImageDataset,
    split: str = "train",
    batch_size: int = 128,
    train: bool | None = None,
    seed: int = 0,
    limit: int | None = None,
    drop_last: bool = False,
) -> BatchLoader:
    """A :class:`BatchLoader`; ``train`` defaults to ``split == "train"`` (shuffle + augment)."""
    return BatchLoader(dataset, split=split, batch_size=batch_size, train=train, seed=seed, limit=limit, drop_last=drop_last)
