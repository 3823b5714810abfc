"""The partitioner end to end: FAN -> communities -> groups -> Partition."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .artifact import Partition
from .communities import fan_graph, find_communities, modularity_of
from .fan import build_fan, validate_fan
from .grouping import STRATEGIES, make_groups

if TYPE_CHECKING:  # torch only when activations are collected
    from torch import nn

__all__ = ["partition_fan", "partition_model", "ModelPartition", "quality_warnings", "MAX_ISOLATED_SHARE", "MIN_MODULARITY"]

log = logging.getLogger(__name__)

# Above this share of isolated filters, or below this modularity (about where community
# structure stops being distinguishable from a random graph's), the groups say little.
MAX_ISOLATED_SHARE = 0.25
MIN_MODULARITY = 0.3


def quality_warnings(partition: Partition) -> list[str]:
    """What a partition with many isolated filters or low modularity means for its students."""
    out = []
    isolated = int((partition.stats or {}).get("isolated_filters", 0))
    percentile = partition.params.get("percentile", 99.0)
    if partition.num_filters and isolated / partition.num_filters > MAX_ISOLATED_SHARE:
        out.append(
            f"{isolated} of {partition.num_filters} filters ({isolated / partition.num_filters:.0%}) are isolated: none of "
            f"their FAN edges reach the p{percentile:g} threshold, so no community holds them and they are dealt out to "
            "the students only to balance the group sizes. Those students learn filters that do not fire together, "
            "which weakens the split of knowledge NoNN relies on; collect activations over more images or lower "
            "--percentile"
        )
    if partition.modularity is not None and partition.modularity < MIN_MODULARITY:
        out.append(
            f"modularity {round(partition.modularity, 3) + 0.0:.3f} is below {MIN_MODULARITY}: the FAN has little community structure, so "
            "the groups are close to an arbitrary split of the filters and each student learns a mix of unrelated "
            "filters; expect lower accuracy from the students. Try another --resolution or --percentile, or more images"
        )
    elif partition.modularity is None:
        out.append(
            "no FAN edge reaches the threshold (modularity undefined): the groups are an arbitrary split of the filters "
            "and each student learns a mix of unrelated filters; lower --percentile or collect more images"
        )
    return out


def partition_fan(
    fan: np.ndarray,
    num_students: int,
    *,
    strategy: str = "balanced",
    resolution: float = 0.7,
    percentile: float = 99.0,
    seed: int = 0,
    tolerance: float = 0.25,
    layer: str | None = None,
    teacher: dict[str, Any] | None = None,
    extra_params: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    input_contract: dict[str, Any] | None = None,
) -> Partition:
    """Group the FAN's filters into `num_students` groups (NONN.md section 2).

    strategy: "balanced" (every filter used, sizes within `tolerance` of C/K) or "paper" (the
    prototype's rule, drops the largest cluster). resolution / percentile / seed: Louvain
    resolution, edge-threshold percentile of the non-zero weights, Louvain seed.
    extra_params (e.g. top_k used to build the FAN) are recorded in partition.params; data (the
    data set's spec) and input_contract (how the teacher's images were normalised) are recorded
    for the stages after.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown grouping strategy {strategy!r}; expected one of {sorted(STRATEGIES)}")
    w = validate_fan(fan)
    found = find_communities(w, resolution=resolution, percentile=percentile, seed=seed)
    peak = w.max()
    normalised = w / peak if peak > 0 else w
    groups = make_groups(strategy, found.communities, num_students, weights=normalised, tolerance=tolerance)
    params: dict[str, Any] = dict(extra_params or {})
    params.update({"percentile": float(percentile), "resolution": float(resolution)})
    if strategy == "balanced":
        params["tolerance"] = float(tolerance)
    stats = found.stats()
    stats["group_modularity"] = modularity_of(fan_graph(found.thresholded), groups)
    partition = Partition(
        num_filters=int(w.shape[0]),
        groups=groups,
        strategy=strategy,
        params=params,
        modularity=found.modularity,
        seed=int(seed),
        layer=layer,
        teacher=teacher,
        stats=stats,
        data=data,
        input_contract=input_contract,
    )
    for warning in quality_warnings(partition):
        log.warning("%s", warning)
    return partition


@dataclass
class ModelPartition:
    """Everything `partition_model` computed: the artifact and the arrays behind it."""

    partition: Partition
    fan: np.ndarray
    activations: np.ndarray


def partition_model(
    model: "nn.Module",
    layer: str,
    loader: Iterable[Any],
    num_students: int,
    *,
    top_k: int = 50,
    device: str = "cpu",
    progress: bool = True,
    teacher: dict[str, Any] | None = None,
    **options: Any,
) -> ModelPartition:
    """Collect `layer`'s activations over `loader`, build the FAN, and partition it.

    options go to `partition_fan` (strategy, resolution, percentile, seed, tolerance,
    extra_params).
    """
    from .activations import collect_activations

    activations = collect_activations(model, layer, loader, device=device, progress=progress)
    fan = build_fan(activations, top_k=top_k)
    extra = dict(options.pop("extra_params", None) or {})
    extra.setdefault("top_k", int(top_k))
    extra.setdefault("images", int(activations.shape[0]))
    partition = partition_fan(
        fan, num_students, layer=layer, teacher=teacher, extra_params=extra, **options
    )
    return ModelPartition(partition=partition, fan=fan, activations=activations)
