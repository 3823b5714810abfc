"""Teacher activations -> Filter Activation Network (FAN) -> communities -> K filter groups.

Public API (imported lazily, so `import nonn.partition` pulls in neither torch nor networkx):

- `collect_activations(model, layer, loader, device="cpu", progress=True)` -> (images, filters)
- `build_fan(activations, top_k=50)` -> (C, C) float64; `build_fan_reference` is the loop it
  is tested against
- `find_communities(fan, resolution, percentile, seed)` -> `Communities`
- `make_groups(strategy, communities, K, ...)`; strategies "balanced" and "paper"
- `partition_fan(fan, K, ...)` / `partition_model(model, layer, loader, K, ...)` -> `Partition`
- `Partition` (partition.json, "nonn.partition/1") with `save(path)` / `Partition.load(path)`
- `plot_partition(fan, partition, path)` -> PNG
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "collect_activations": "activations",
    "layer_names": "activations",
    "resolve_layer": "activations",
    "build_fan": "fan",
    "build_fan_reference": "fan",
    "normalize_activations": "fan",
    "validate_fan": "fan",
    "Communities": "communities",
    "find_communities": "communities",
    "threshold_fan": "communities",
    "STRATEGIES": "grouping",
    "balanced_bounds": "grouping",
    "make_groups": "grouping",
    "PARTITION_FORMAT": "artifact",
    "Partition": "artifact",
    "ModelPartition": "api",
    "partition_fan": "api",
    "partition_model": "api",
    "plot_partition": "plot",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .activations import collect_activations, layer_names, resolve_layer
    from .api import ModelPartition, partition_fan, partition_model
    from .artifact import PARTITION_FORMAT, Partition
    from .communities import Communities, find_communities, threshold_fan
    from .fan import build_fan, build_fan_reference, normalize_activations, validate_fan
    from .grouping import STRATEGIES, balanced_bounds, make_groups
    from .plot import plot_partition


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
