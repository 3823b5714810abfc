"""A picture of a partition: the thresholded FAN graph coloured by group, and group sizes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from nonn.artifacts import atomic_path

from .artifact import Partition
from .communities import fan_graph, threshold_fan

__all__ = ["plot_partition", "partition_figure"]

UNUSED_COLOUR = "#c8c8c8"


def plot_partition(
    fan: np.ndarray, partition: Partition, path: str | os.PathLike[str], seed: int | None = None
) -> Path:
    """Write the PNG of `partition_figure` atomically."""
    import matplotlib.pyplot as plt

    fig = partition_figure(fan, partition, seed)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def partition_figure(fan: np.ndarray, partition: Partition, seed: int | None = None) -> Any:
    """The figure: left, the FAN graph after thresholding (edges as the partition's params
    say; filters coloured by group, unused filters grey, isolated filters on an outer ring) with
    a legend saying so; right, a bar chart of the group sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    if fan.shape[0] != partition.num_filters:
        raise ValueError(
            f"FAN has {fan.shape[0]} filters but the partition is for {partition.num_filters}"
        )
    thresholded, _ = threshold_fan(fan, partition.params.get("percentile", 99.0))
    graph = fan_graph(thresholded)
    seed = partition.seed if seed is None else seed

    k = partition.num_students
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20" if k <= 20 else "hsv")
    colours = [cmap(i % cmap.N) if k <= 20 else cmap(i / k) for i in range(k)]
    group_of = {f: g for g, members in enumerate(partition.groups) for f in members}
    node_colours = [colours[group_of[n]] if n in group_of else UNUSED_COLOUR for n in graph.nodes]

    connected = [n for n in graph.nodes if graph.degree(n) > 0]
    isolated = [n for n in graph.nodes if graph.degree(n) == 0]
    pos: dict[int, np.ndarray] = {}
    if connected:
        pos.update(nx.spring_layout(graph.subgraph(connected), weight="weight", seed=seed))
    if isolated:  # a ring around the connected part, in group order
        isolated.sort(key=lambda n: (group_of.get(n, k), n))
        angles = np.linspace(0, 2 * np.pi, len(isolated), endpoint=False)
        radius = 1.35 if connected else 1.0
        pos.update({n: radius * np.array([np.cos(a), np.sin(a)]) for n, a in zip(isolated, angles)})

    fig, (ax_graph, ax_bars) = plt.subplots(
        1, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [1.6, 1]}, constrained_layout=True
    )
    node_size = max(8, min(80, 6000 // max(1, graph.number_of_nodes())))
    widths = [0.4 + 2.0 * d["weight"] for _, _, d in graph.edges(data=True)]
    nx.draw_networkx_edges(graph, pos, ax=ax_graph, width=widths, alpha=0.35, edge_color="#555555")
    nx.draw_networkx_nodes(
        graph, pos, ax=ax_graph, node_color=node_colours, node_size=node_size, linewidths=0.3, edgecolors="black"
    )
    modularity = "n/a" if partition.modularity is None else f"{partition.modularity:.3f}"
    ax_graph.set_title(
        f"FAN{' of ' + partition.layer if partition.layer else ''}: {partition.num_filters} filters, "
        f"{graph.number_of_edges()} edges >= p{partition.params.get('percentile', 99.0):g}, "
        f"{len(isolated)} isolated\nmodularity {modularity}, strategy {partition.strategy}",
        fontsize=10,
    )
    ax_graph.set_axis_off()
    ax_graph.legend(handles=_legend_handles(colours, partition, graph, len(isolated), bool(unused_filters(partition))),
                    loc="upper left", bbox_to_anchor=(0.0, 0.0), ncol=3, fontsize=8, frameon=False)  # fmt: skip

    sizes = partition.group_sizes
    labels = [f"student {i}" for i in range(k)]
    bar_colours = list(colours)
    unused = partition.num_filters - sum(sizes)
    if unused:
        sizes = sizes + [unused]
        labels = labels + ["unused"]
        bar_colours = bar_colours + [UNUSED_COLOUR]
    bars = ax_bars.bar(range(len(sizes)), sizes, color=bar_colours, edgecolor="black", linewidth=0.5)
    ax_bars.bar_label(bars, fontsize=8)
    ax_bars.set_xticks(range(len(sizes)), labels, rotation=45 if len(sizes) > 6 else 0, ha="right" if len(sizes) > 6 else "center")
    ax_bars.axhline(partition.num_filters / k, color="black", linestyle="--", linewidth=0.8, label="C / K")
    ax_bars.set_ylabel("filters")
    ax_bars.set_title(f"group sizes (K={k}, coverage {partition.coverage:.0%})", fontsize=10)
    ax_bars.legend(fontsize=8)
    return fig


def unused_filters(partition: Partition) -> int:
    return partition.num_filters - sum(partition.group_sizes)


def _legend_handles(colours: list[Any], partition: Partition, graph: Any, isolated: int, unused: bool) -> list[Any]:
    """Legend entries: a colour per student (up to 12, else one entry), unused filters, the outer
    ring of isolated filters, and what an edge is."""
    from matplotlib.lines import Line2D

    def dot(colour: Any, label: str) -> Any:
        return Line2D([], [], marker="o", linestyle="", markerfacecolor=colour, markeredgecolor="black", markersize=7, label=label)

    k = len(colours)
    handles = [dot(colours[i], f"student {i}'s filters") for i in range(k)] if k <= 12 else [
        dot(colours[0], f"filters, coloured by student (K={k})")
    ]
    if unused:
        handles.append(dot(UNUSED_COLOUR, "filters no student uses"))
    if isolated:
        handles.append(dot("white", f"outer ring: {isolated} isolated filters (no edge)"))
    handles.append(Line2D([], [], color="#555555", alpha=0.6, linewidth=1.5,
                          label=f"edge: FAN weight >= p{partition.params.get('percentile', 99.0):g} (width ~ weight)"))  # fmt: skip
    return handles
