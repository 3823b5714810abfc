"""Communities of the FAN: normalise, keep the strongest edges, run Louvain (NONN.md section 2).

The graph has one node per filter (isolated filters included, each then its own community).
Louvain is networkx's `louvain_communities`, deterministic for a given graph and seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from .fan import validate_fan

__all__ = ["Communities", "threshold_fan", "fan_graph", "find_communities", "modularity_of"]


def threshold_fan(fan: np.ndarray, percentile: float = 99.0) -> tuple[np.ndarray, float]:
    """Normalise the FAN by its maximum and zero every weight below `percentile` of the
    non-zero weights (taken over the whole matrix, as the prototype does).

    Returns (thresholded matrix in [0, 1], threshold). An all-zero FAN stays all zero
    (threshold 0).
    """
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {percentile}")
    w = validate_fan(fan)
    peak = w.max()
    if peak <= 0:
        return np.zeros_like(w), 0.0
    w = w / peak
    threshold = float(np.percentile(w[w != 0], percentile))
    w[w < threshold] = 0.0
    return w, threshold


def fan_graph(thresholded: np.ndarray) -> nx.Graph:
    """Undirected weighted graph with one node per filter and an edge per non-zero weight."""
    c = thresholded.shape[0]
    graph = nx.Graph()
    graph.add_nodes_from(range(c))
    rows, cols = np.nonzero(np.triu(thresholded, 1))
    graph.add_weighted_edges_from(
        (int(i), int(j), float(thresholded[i, j])) for i, j in zip(rows, cols)
    )
    return graph


def modularity_of(graph: nx.Graph, sets: list[list[int]], resolution: float = 1.0) -> float | None:
    """Weighted modularity of a partition of the graph's nodes; None for a graph without edges.

    Nodes not in any set are gathered into one extra set, so partial groupings can be scored.
    """
    if graph.number_of_edges() == 0:
        return None
    covered = {node for s in sets for node in s}
    rest = [node for node in graph.nodes if node not in covered]
    full = [set(s) for s in sets if s] + ([set(rest)] if rest else [])
    return float(nx.community.modularity(graph, full, weight="weight", resolution=resolution))


@dataclass
class Communities:
    """Louvain communities of a thresholded FAN.

    communities: filter index lists, largest first (ties: smallest filter index first), each
    sorted ascending; every filter is in exactly one. modularity is that of the communities on
    the thresholded graph (None when no edge survives).
    """

    communities: list[list[int]]
    thresholded: np.ndarray
    threshold: float
    num_edges: int
    num_isolated: int
    modularity: float | None
    resolution: float
    percentile: float
    seed: int

    @property
    def num_filters(self) -> int:
        return int(self.thresholded.shape[0])

    def stats(self) -> dict:
        """Summary numbers for the partition artifact."""
        return {
            "threshold": self.threshold,
            "edges_kept": self.num_edges,
            "isolated_filters": self.num_isolated,
            "num_communities": len(self.communities),
            "community_sizes": [len(c) for c in self.communities if len(c) > 1],
            "singleton_communities": sum(1 for c in self.communities if len(c) == 1),
        }


def find_communities(
    fan: np.ndarray, resolution: float = 0.7, percentile: float = 99.0, seed: int = 0
) -> Communities:
    """Threshold the FAN and split its filters into Louvain communities."""
    if not float(resolution) > 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    thresholded, threshold = threshold_fan(fan, percentile)
    graph = fan_graph(thresholded)
    if graph.number_of_edges() == 0:  # every filter on its own (networkx 3.0's Louvain divides by zero here)
        found = [{node} for node in graph.nodes]
    else:
        found = nx.community.louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)
    communities = sorted((sorted(int(n) for n in c) for c in found), key=lambda c: (-len(c), c[0]))
    return Communities(
        communities=communities,
        thresholded=thresholded,
        threshold=threshold,
        num_edges=graph.number_of_edges(),
        num_isolated=sum(1 for _, degree in graph.degree() if degree == 0),
        modularity=modularity_of(graph, communities, resolution=1.0),
        resolution=float(resolution),
        percentile=float(percentile),
        seed=int(seed),
    )
