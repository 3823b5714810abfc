"""A partition that says little about the teacher is flagged, and the FAN plot explains itself."""

from __future__ import annotations

import logging

import numpy as np

from nonn.cli import main
from nonn.partition import partition_fan
from nonn.partition.api import quality_warnings
from nonn.partition.fan import build_fan
from nonn.partition.plot import partition_figure


def _blocks_fan() -> np.ndarray:
    """Each image lights up one of four blocks of 8 filters: clear communities."""
    rng = np.random.default_rng(0)
    acts = 0.1 * rng.random((800, 32))
    for b in range(4):
        acts[b::4, b * 8 : (b + 1) * 8] += rng.random((200, 8))
    return build_fan(acts, top_k=8)


def _noise_fan() -> np.ndarray:
    """Filters that fire independently: no community structure at all."""
    return build_fan(np.maximum(np.random.default_rng(1).normal(size=(400, 48)), 0), top_k=12)


def test_clear_communities_get_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="nonn"):
        part = partition_fan(_blocks_fan(), 4, percentile=80, resolution=1.0)
    assert part.modularity > 0.6 and quality_warnings(part) == [] and caplog.records == []


def test_isolated_filters_and_low_modularity_are_warned_with_what_they_mean(caplog):
    with caplog.at_level(logging.WARNING, logger="nonn"):
        part = partition_fan(_noise_fan(), 4)  # p99 keeps a handful of edges of 48 filters
    warnings = quality_warnings(part)
    isolated = part.stats["isolated_filters"]
    assert isolated / 48 > 0.25
    assert any(f"{isolated} of 48 filters" in w and "students" in w and "--percentile" in w for w in warnings)
    low = partition_fan(_noise_fan(), 4, percentile=0)  # every edge kept: a dense graph without communities
    assert low.modularity < 0.3
    assert any(f"modularity {round(low.modularity, 3) + 0.0:.3f} is below 0.3" in w and "each student learns a mix" in w
               for w in quality_warnings(low))  # fmt: skip
    # Logged once each at WARNING when the partition is made.
    assert [r.getMessage() for r in caplog.records] == warnings + quality_warnings(low)
    assert {r.levelno for r in caplog.records} == {logging.WARNING}


def test_cli_partition_warns_in_one_line(tmp_path, caplog):
    np.save(tmp_path / "fan.npy", _noise_fan())
    assert main(["partition", "--fan", str(tmp_path / "fan.npy"), "-K", "4", "--out", str(tmp_path / "p.json")]) == 0
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and all("\n" not in r.getMessage() and r.exc_info is None for r in warned)
    assert any("isolated" in r.getMessage() and "students" in r.getMessage() for r in warned)


def test_the_fan_plot_has_a_legend():
    fan = _noise_fan()
    part = partition_fan(fan, 3)
    fig = partition_figure(fan, part)
    legend = fig.axes[0].get_legend()
    assert legend is not None
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[:3] == ["student 0's filters", "student 1's filters", "student 2's filters"]
    assert any(t.startswith(f"outer ring: {part.stats['isolated_filters']} isolated filters") for t in texts)
    assert any(t.startswith("edge: FAN weight >= p99") for t in texts)
    import matplotlib.pyplot as plt

    plt.close(fig)
