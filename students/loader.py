"""Mini-batches of a data set as torch tensors, augmented on whole batches, normalised by the
input contract.

In-memory sets are indexed directly; an image folder's batches are decoded from disk as they
are needed (memory bounded by the batch), by `workers` DataLoader worker processes when asked,
so decoding overlaps training. Either way :class:`BatchLoader` crops and flips a whole batch at
once with tensor indexing in the main process, then normalises with the input contract's
mean/std. All randomness (order, crop offsets, flips) comes from one ``torch.Generator`` whose
state is saved in checkpoints, so a resumed run sees exactly the batches an uninterrupted run
would have seen, with or without workers.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from nonn.runtime.input_contract import InputContract
from nonn.students.data import AugmentSpec, DataError, DatasetInfo

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


class _Decode:
    """DataLoader dataset: one item is one batch of file indices, decoded in a worker process.

    A bad file comes back as its message instead of a worker traceback."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def __getitem__(self, index: Sequence[int]) -> Any:
        try:
            return torch.from_numpy(self.reader(index))
        except DataError as exc:
            return str(exc)


class BatchLoader:
    """Iterable of normalised ``(x, y)`` batches over one split of a data set.

    With ``train=True`` the order is reshuffled every pass and batches are augmented as the
    data set's AugmentSpec says. ``contract`` (default: the data set's own mean/std) says how
    images are normalised. ``state_dict()`` / ``load_state_dict()`` save and restore the random
    generator between passes, for exact resume.
    """

    def __init__(
        self,
        dataset: DatasetInfo,
        split: str = "train",
        batch_size: int = 128,
        train: bool | None = None,
        seed: int = 0,
        limit: int | None = None,
        drop_last: bool = False,
        contract: InputContract | None = None,
        workers: int = 0,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive number of images, got {limit!r}")
        if not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
        n = dataset.split_size(split) if limit is None else min(limit, dataset.split_size(split))
        if n == 0:
            raise ValueError(f"{dataset.name}: the {split} split is empty")
        contract = contract if contract is not None else dataset.contract("dataset")
        if tuple(contract.input_shape) != tuple(dataset.input_shape):
            raise ValueError(f"input contract is for images of shape {contract.input_shape}, data set {dataset.name!r} has {dataset.input_shape}")
        self.dataset = dataset
        self.split = split
        self.batch_size = batch_size
        self.train = split == "train" if train is None else bool(train)
        self.drop_last = drop_last
        self.workers = 0 if dataset.in_memory else workers
        self.labels = torch.from_numpy(np.ascontiguousarray(dataset.labels(split)[:n]))
        # In memory: shares memory with the data set's array. On disk: decoded per batch.
        self.images = torch.from_numpy(dataset.read(split, slice(0, n))) if dataset.in_memory else None
        self.augment = dataset.augment if self.train else AugmentSpec()
        self.contract = contract
        self.pixel_scale = float(contract.pixel_scale)
        self.mean = torch.tensor(contract.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(contract.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.generator = torch.Generator().manual_seed(int(seed))

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def _read(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Each batch's images as float32 in [0, 1], in order."""
        if self.images is not None:
            for index in batches:
                yield self._unit(self.images[index])
            return
        reader = self.dataset.reader(self.split)  # type: ignore[attr-defined]
        if self.workers == 0:
            for index in batches:
                yield self._unit(torch.from_numpy(reader(index.numpy())))
            return
        from torch.utils.data import DataLoader

        decoded = DataLoader(_Decode(reader), batch_size=None, sampler=[b.tolist() for b in batches], num_workers=self.workers)
        for x in decoded:
            if isinstance(x, str):
                raise DataError(x)
            yield self._unit(x)

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) * self.pixel_scale if x.dtype == torch.uint8 else x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.num_samples
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        batches = [order[start : start + self.batch_size] for start in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        for index, x in zip(batches, self._read(batches)):
            if self.train:
                x = augment_batch(x, self.augment, self.generator)
            yield (x - self.mean) / self.std, self.labels[index]

    def state_dict(self) -> dict[str, Any]:
        """The generator state (a uint8 tensor), to be saved at the end of a pass."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def make_loader(
    dataset: DatasetInfo,
    split: str = "train",
    batch_size: int = 128,
    train: bool | None = None,
    seed: int = 0,
    limit: int | None = None,
    drop_last: bool = False,
    contract: InputContract | None = None,
    workers: int = 0,
) -> BatchLoader:
    """A :class:`BatchLoader`; ``train`` defaults to ``split == "train"`` (shuffle + augment)."""
    return BatchLoader(dataset, split=split, batch_size=batch_size, train=train, seed=seed, limit=limit, drop_last=drop_last,
                       contract=contract, workers=workers)
