"""Training under torchrun (or any launcher that sets RANK and WORLD_SIZE): the process group,
each rank's share of a batch, reductions, and per-rank state to save.

Every rank draws the same global batch from the same seeded loader and takes its interleaved
slice, as a DistributedSampler would. BatchNorm statistics are each rank's own (DDP's default:
each rank normalises over its slice of the global batch); `sync_batchnorm` converts a model to
SyncBatchNorm, which on CUDA normalises over the whole global batch instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nonn.students.teacher import resolve_device

__all__ = ["DistInfo", "join_process_group", "leave_process_group", "shard", "all_reduce_sums", "gather_objects",
           "sync_batchnorm"]


@dataclass
class DistInfo:
    """This process's place in the run; `owns_group` when it created the process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False
    _log_level: int | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_process_group(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the launcher's process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA).

    Ranks other than 0 keep only errors from nonn's loggers, so a run logs each line once.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_name)
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    info = DistInfo(rank, world, local_rank, owns)
    if rank != 0:
        logger = logging.getLogger("nonn")
        info._log_level = logger.level
        logger.setLevel(logging.ERROR)
    return info, device


def leave_process_group(info: DistInfo) -> None:
    """Destroy the process group this run created and restore the log level it changed."""
    if info._log_level is not None:
        logging.getLogger("nonn").setLevel(info._log_level)
        info._log_level = None
    if info.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        info.owns_group = False


def shard(x: Tensor, info: DistInfo) -> Tensor:
    """This rank's interleaved slice of a global batch."""
    return x[info.rank :: info.world] if info.enabled else x


def all_reduce_sums(values: Tensor, info: DistInfo) -> Tensor:
    """The element-wise sum of `values` over all ranks (every rank gets it); unchanged alone."""
    if not info.enabled:
        return values
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank ([obj] when alone)."""
    if not info.enabled:
        return [obj]
    import torch.distributed as dist

    gathered: list[Any] = [None] * info.world
    dist.all_gather_object(gathered, obj)
    return gathered


def sync_batchnorm(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """`model` with SyncBatchNorm layers: CUDA only (torch has no CPU implementation)."""
    if device.type != "cuda":
        raise ValueError(f"--sync-bn needs CUDA devices (torch's SyncBatchNorm has no {device.type} implementation)")
    if not info.enabled:
        logging.getLogger(__name__).info("--sync-bn has no effect in a single process")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
