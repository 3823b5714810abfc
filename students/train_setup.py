"""What train_students resolves before training: the teacher, the partition, the data set.

`prepare` loads each, checks them against each other (the teacher the partition was made for,
its classes, its layer's channels against the partition's filters, the data set's shape) and
probes the teacher once; a mismatch is a ValueError naming both sides.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from nonn.students.ensemble import parse_arch_list
from nonn.students.teacher_features import TeacherFeatures

if TYPE_CHECKING:
    from nonn.students.train import StudentsConfig

__all__ = ["TrainSetup", "prepare", "check_dataset_matches", "validate_groups", "random_partition_groups"]

log = logging.getLogger(__name__)


def check_dataset_matches(recorded: dict[str, Any], data: Any, what: str) -> None:
    """The data set must have the input shape and classes an artifact was trained for."""
    if not recorded:
        return
    shape = recorded.get("input_shape")
    if shape is not None and tuple(shape) != tuple(data.input_shape):
        raise ValueError(f"{what} expects images of shape {tuple(shape)}, but data set {data.name!r} has {tuple(data.input_shape)}")
    classes = recorded.get("num_classes")
    if classes is not None and int(classes) != int(data.num_classes):
        raise ValueError(f"{what} expects {classes} classes, but data set {data.name!r} has {data.num_classes}")


def _partition_dict(partition: Any) -> dict[str, Any]:
    if hasattr(partition, "to_dict"):
        return dict(partition.to_dict())
    if dataclasses.is_dataclass(partition):
        return dataclasses.asdict(partition)
    return dict(partition)


def validate_groups(groups: Sequence[Sequence[int]], num_channels: int, source: str) -> list[list[int]]:
    """Groups must be non-empty, disjoint lists of channel indices below num_channels."""
    seen: set[int] = set()
    out = []
    for k, group in enumerate(groups):
        group = [int(i) for i in group]
        if not group:
            raise ValueError(f"{source}: group {k} is empty")
        bad = [i for i in group if not 0 <= i < num_channels]
        if bad:
            raise ValueError(
                f"{source}: group {k} names filters {bad[:5]} but the teacher layer has {num_channels} channels "
                "(was the partition made for another teacher or layer?)"
            )
        dup = seen.intersection(group)
        if dup or len(set(group)) != len(group):
            raise ValueError(f"{source}: filter groups overlap (filters {sorted(dup)[:5] or group[:5]} appear twice)")
        seen.update(group)
        out.append(group)
    return out


def random_partition_groups(sizes: Sequence[int], num_filters: int, seed: int) -> list[list[int]]:
    """The random-partition ablation: disjoint random groups of the given sizes from all filters."""
    if sum(sizes) > num_filters:
        raise ValueError(f"groups of sizes {list(sizes)} need {sum(sizes)} filters, only {num_filters} exist")
    order = np.random.default_rng(seed).permutation(num_filters)
    groups, start = [], 0
    for size in sizes:
        groups.append(sorted(int(i) for i in order[start : start + size]))
        start += size
    return groups


@dataclass
class TrainSetup:
    """Everything train_students resolved from the config before training."""

    data: Any
    teacher: Any  # LoadedTeacher
    features: TeacherFeatures
    layer: str
    num_channels: int
    out_hw: tuple[int, int]
    groups: list[list[int]]
    archs: list[tuple[str, dict[str, Any]]]
    partition: dict[str, Any]
    contract: Any  # InputContract
    teacher_meta: dict[str, Any] = field(default_factory=dict)


def prepare(config: StudentsConfig, device: torch.device) -> TrainSetup:
    """Load and cross-check the teacher, partition and data set the config names; probe the teacher."""
    from nonn.partition import Partition
    from nonn.students.data import resolve_data
    from nonn.students.normalization import Recorded, teacher_contract
    from nonn.students.teacher_loading import load_teacher

    partition = Partition.load(config.partition)
    part = _partition_dict(partition)
    groups = [list(g) for g in partition.groups]
    if config.num_students is not None and config.num_students != len(groups):
        raise ValueError(
            f"--num-students {config.num_students} disagrees with {config.partition}, which has {len(groups)} groups"
        )
    teacher = load_teacher(config.teacher, factory=config.teacher_factory, weights=config.weights, map_location="cpu")
    teacher_name = config.teacher or config.teacher_factory
    recorded = part.get("teacher") or {}
    recorded_arch = recorded.get("arch")
    if recorded_arch and teacher.arch and _arch_key(recorded_arch) != _arch_key(teacher.arch):
        raise ValueError(
            f"teacher {teacher_name} is a {_arch_key(teacher.arch)} but {config.partition} was made for a "
            f"{_arch_key(recorded_arch)}"
        )
    if recorded.get("fingerprint") and recorded["fingerprint"] != teacher.fingerprint:
        if not config.force:
            raise ValueError(
                f"{config.partition} was made for the teacher with fingerprint {recorded['fingerprint']}, but teacher "
                f"{teacher.source} has fingerprint {teacher.fingerprint}; partition this teacher, or pass --force to use it anyway"
            )
        log.warning("--force: %s was made for teacher %s, training against teacher %s (%s)",
                    config.partition, recorded["fingerprint"], teacher.fingerprint, teacher.source)
    data = resolve_data(config.dataset, config.data_dir, config.image_size,
                        [(partition.data, config.partition), (teacher.dataset, teacher.source)])
    if teacher.dataset:
        check_dataset_matches(teacher.dataset, data, what=f"teacher {teacher_name}")
    partition_contract = [Recorded(partition.contract, str(config.partition))] if partition.input_contract else []
    contract = teacher_contract(config.normalize, data, teacher, partition_contract)
    layer = config.layer or part.get("layer") or teacher.feature_layer
    if not layer:
        raise ValueError("the teacher's feature layer is unknown: give --layer NAME")
    model = teacher.model.to(device, memory_format=torch.channels_last)  # forward only: always safe
    features = TeacherFeatures(model, layer)
    probe_split = "test" if data.split_size("test") >= 2 else "train"
    probe = torch.from_numpy(contract.normalize_unit(contract.to_unit(data.read(probe_split, np.arange(2))))).to(device)
    logits, fmap = features(probe)
    if logits.shape[-1] != data.num_classes:
        raise ValueError(f"teacher {teacher_name} predicts {logits.shape[-1]} classes, data set {data.name!r} has {data.num_classes}")
    num_channels, out_hw = int(fmap.shape[1]), (int(fmap.shape[2]), int(fmap.shape[3]))
    recorded_filters = part.get("num_filters")
    if recorded_filters is not None and int(recorded_filters) != num_channels:
        raise ValueError(
            f"{config.partition} partitions {recorded_filters} filters but teacher layer {layer!r} has {num_channels} channels"
        )
    groups = validate_groups(groups, num_channels, str(config.partition))
    sizes = [len(g) for g in groups]
    if config.baseline == "random-partition":
        groups = random_partition_groups(sizes, num_channels, config.seed)
    archs = parse_arch_list(config.arch, len(groups))
    if config.baseline == "single-kd":
        # One student as large as the largest NoNN student, trained with KD alone.
        groups = [sorted(max(groups, key=len))]
        archs = archs[:1]
    teacher_meta = {
        "arch": teacher.arch,
        "factory": teacher.factory,
        "fingerprint": teacher.fingerprint,
        "params": int(sum(p.numel() for p in teacher.model.parameters())),
        "feature_layer": layer,
        "num_filters": num_channels,
        "feature_hw": list(out_hw),
    }
    return TrainSetup(data, teacher, features, layer, num_channels, out_hw, groups, archs, part, contract, teacher_meta)


def _arch_key(arch: Any) -> str:
    if isinstance(arch, dict):
        kwargs = arch.get("kwargs") or {}
        opts = "".join(f":{k}={v}" for k, v in sorted(kwargs.items()) if k != "dropout")
        return f"{arch.get('name')}{opts} ({arch.get('num_classes')} classes, {arch.get('in_channels')} channels)"
    return str(arch)
