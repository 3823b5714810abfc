"""Communities, grouping strategies, partition.json, the plot and `nonn partition --fan`."""

import json

import numpy as np
import pytest

from nonn.artifacts import ArtifactError
from nonn.cli import main
from nonn.partition import (
    Partition,
    balanced_bounds,
    build_fan,
    find_communities,
    make_groups,
    partition_fan,
    plot_partition,
    threshold_fan,
)
from nonn.partition.grouping import group_paper


def planted_fan(blocks: int = 4, size: int = 16, images: int = 1200, seed: int = 0, sizes=None) -> np.ndarray:
    """A FAN from activations where each image lights up one block of filters strongly."""
    rng = np.random.default_rng(seed)
    sizes = list(sizes or [size] * blocks)
    edges = np.cumsum([0] + sizes)
    acts = 0.1 * rng.random((images, edges[-1]))
    for b in range(len(sizes)):
        rows = range(b, images, len(sizes))
        acts[b :: len(sizes), edges[b] : edges[b + 1]] += rng.random((len(rows), sizes[b]))
    return build_fan(acts, top_k=max(sizes))


def random_fan(filters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return build_fan(np.maximum(rng.normal(size=(400, filters)), 0), top_k=min(12, filters))


def check_groups(groups, num_filters, k, full_cover):
    flat = [f for g in groups for f in g]
    assert len(groups) == k and all(groups)
    assert len(flat) == len(set(flat)), "groups overlap"
    assert all(0 <= f < num_filters for f in flat)
    if full_cover:
        assert sorted(flat) == list(range(num_filters))


def test_threshold_keeps_top_percentile():
    fan = random_fan(32, 1)
    thr, cut = threshold_fan(fan, 90)
    nonzero = (fan / fan.max())[fan > 0]
    assert cut == pytest.approx(np.percentile(nonzero, 90))
    assert thr.max() == 1.0 and (thr[thr > 0] >= cut).all()
    assert (thr > 0).sum() == (nonzero >= cut).sum()


def test_planted_blocks_are_found_and_kept_whole():
    fan = planted_fan()
    found = find_communities(fan, resolution=1.0, percentile=80, seed=0)
    blocks = [list(range(b * 16, (b + 1) * 16)) for b in range(4)]
    assert sorted(found.communities) == blocks
    assert found.modularity > 0.6
    part = partition_fan(fan, 4, percentile=80, resolution=1.0)
    assert sorted(part.groups) == blocks and part.coverage == 1.0
    part2 = partition_fan(fan, 2, percentile=80, resolution=1.0)
    assert part2.group_sizes == [32, 32]
    assert all(any(set(b) <= set(g) for g in part2.groups) for b in blocks)


@pytest.mark.parametrize("filters,k", [(64, 2), (64, 3), (64, 5), (40, 7), (30, 30), (33, 16), (256, 4)])
def test_balanced_invariants(filters, k):
    fan = random_fan(filters, filters + k)
    part = partition_fan(fan, k, strategy="balanced")
    check_groups(part.groups, filters, k, full_cover=True)
    lower, upper = balanced_bounds(filters, k)
    assert all(lower <= s <= upper for s in part.group_sizes), (part.group_sizes, lower, upper)
    ideal = filters / k
    for s in part.group_sizes:
        assert abs(s - ideal) <= 0.25 * ideal or s in (filters // k, -(-filters // k))
    assert part.coverage == 1.0


def test_balanced_splits_only_what_does_not_fit():
    # One community of 30 and ten singletons, K = 2, C = 40: cap is 25, so the big community
    # is split once and the singletons fill the rest.
    communities = [list(range(30))] + [[i] for i in range(30, 40)]
    groups = make_groups("balanced", communities, 2)
    check_groups(groups, 40, 2, full_cover=True)
    assert sorted(len(g) for g in groups) == [15, 25]
    # Communities that fit are never split.
    communities = [list(range(0, 12)), list(range(12, 20)), list(range(20, 24))]
    groups = make_groups("balanced", communities, 2)
    assert sorted(map(sorted, groups)) == [list(range(0, 12)), list(range(12, 24))]


def test_balanced_bounds():
    assert balanced_bounds(256, 2) == (96, 160)
    assert balanced_bounds(10, 10) == (1, 1)
    assert balanced_bounds(3, 2) == (1, 2)  # 25% of 1.5 is under one filter


def test_paper_strategy_follows_prototype_rule():
    communities = [
        list(range(0, 10)),   # size 10
        list(range(10, 16)),  # size 6 \ merged: one cluster of 12 (the largest: dropped)
        list(range(16, 22)),  # size 6 /
        list(range(22, 26)),  # size 4
        [26], [27], [28],     # singletons pooled: a cluster of 3
    ]
    groups = group_paper(communities, 2)
    # clusters by size: 12 (dropped), 10, 4, 3; students get 10 and 4; the 3 joins the smaller.
    assert groups == [list(range(0, 10)), list(range(22, 29))]
    groups3 = group_paper(communities, 3)
    assert groups3 == [list(range(0, 10)), list(range(22, 26)), [26, 27, 28]]
    with pytest.raises(ValueError, match="at most 3 students"):
        group_paper(communities, 4)


def test_paper_on_a_fan_drops_filters():
    fan = planted_fan(sizes=[20, 14, 10, 8])
    part = partition_fan(fan, 2, strategy="paper", percentile=80, resolution=1.0)
    check_groups(part.groups, 52, 2, full_cover=False)
    # The largest community (filters 0..19) is dropped; 14 and 10 seed the students, 8 joins 10.
    assert part.groups == [list(range(20, 34)), list(range(34, 52))]
    assert part.coverage == 32 / 52 and part.strategy == "paper" and "tolerance" not in part.params


def test_bad_inputs():
    fan = random_fan(16, 0)
    with pytest.raises(ValueError, match="larger than the 16 filters"):
        partition_fan(fan, 17)
    with pytest.raises(ValueError, match="at least 2"):
        partition_fan(fan, 1)
    with pytest.raises(ValueError, match="unknown grouping strategy"):
        partition_fan(fan, 2, strategy="greedy")
    with pytest.raises(ValueError, match="symmetric"):
        partition_fan(fan + np.triu(np.ones_like(fan), 1), 2)
    with pytest.raises(ValueError, match="percentile"):
        partition_fan(fan, 2, percentile=101)


def test_deterministic_given_seed(tmp_path):
    fan = random_fan(96, 5)
    a = partition_fan(fan, 3, seed=7)
    b = partition_fan(fan, 3, seed=7)
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert a.seed == 7 and json.loads((tmp_path / "a.json").read_text())["seed"] == 7


def test_all_zero_fan_still_partitions():
    part = partition_fan(np.zeros((8, 8)), 2)
    check_groups(part.groups, 8, 2, full_cover=True)
    assert part.modularity is None and part.stats["edges_kept"] == 0


def test_partition_json_round_trip(tmp_path):
    part = partition_fan(random_fan(24, 2), 3, layer="act", teacher={"fingerprint": "ab" * 32, "arch": None})
    path = part.save(tmp_path / "partition.json")
    data = json.loads(path.read_text())
    assert data["format"] == "nonn.partition/1"
    for key in ("layer", "num_filters", "num_students", "groups", "group_sizes", "strategy", "params",
                "modularity", "coverage", "seed", "teacher"):
        assert key in data
    assert data["params"] == {"percentile": 99.0, "resolution": 0.7, "tolerance": 0.25}
    loaded = Partition.load(path)
    assert loaded == part


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.update(format="nonn.partition/0"), "format"),
        (lambda d: d["groups"][1].append(d["groups"][0][0]), "disjoint"),
        (lambda d: d["groups"][0].append(99), "outside"),
        (lambda d: d.update(group_sizes=[1, 1, 1]), "group_sizes"),
        (lambda d: d.update(groups=[[0, 1], "x"]), "lists of integer"),
        (lambda d: d.update(groups=[[0], []]), "empty"),
        (lambda d: d.pop("num_filters"), "num_filters"),
        (lambda d: d.update(coverage=0.5), "coverage"),
    ],
)
def test_partition_load_rejects_bad_files(tmp_path, edit, match):
    path = partition_fan(random_fan(24, 2), 3).save(tmp_path / "p.json")
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=match) as info:
        Partition.load(path)
    assert str(path) in str(info.value)


def test_partition_load_missing_and_corrupt(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        Partition.load(tmp_path / "nope.json")
    (tmp_path / "half.json").write_text('{"format": "nonn.partition/1", "groups": [[0')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        Partition.load(tmp_path / "half.json")


def test_plot_writes_png(tmp_path):
    fan = planted_fan(sizes=[12, 8, 6, 4])
    for strategy in ("balanced", "paper"):
        part = partition_fan(fan, 2, strategy=strategy, percentile=80)
        out = plot_partition(fan, part, tmp_path / f"{strategy}.png")
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_cli_partition_from_fan(tmp_path, capsys):
    fan_path = tmp_path / "fan.npy"
    np.save(fan_path, planted_fan(blocks=4, size=8))
    out = tmp_path / "partition.json"
    png = tmp_path / "fan.png"
    argv = ["partition", "--fan", str(fan_path), "-K", "4", "--percentile", "80",
            "--resolution", "1.0", "--seed", "3", "--out", str(out), "--plot", str(png)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sizes [8, 8, 8, 8]" in printed and "coverage 1.000" in printed
    part = Partition.load(out)
    assert part.seed == 3 and part.params["resolution"] == 1.0 and png.exists()

    np.save(tmp_path / "rect.npy", np.ones((4, 5)))
    assert main(["partition", "--fan", str(tmp_path / "rect.npy"), "-K", "2", "--out", str(tmp_path / "x.json")]) == 2
    assert "square" in capsys.readouterr().err
    assert main(["partition", "--fan", str(fan_path), "-K", "40", "--out", str(tmp_path / "x.json")]) == 2
    assert "larger than the 32 filters" in capsys.readouterr().err
    np.savez(tmp_path / "fan.npz", fan=np.zeros((4, 4)))
    assert main(["partition", "--fan", str(tmp_path / "fan.npz"), "-K", "2", "--out", str(tmp_path / "x.json")]) == 2
    assert ".npz archive" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_fan_and_grouping_work_without_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from nonn.partition import build_fan, partition_fan, Partition\n"
        "fan = build_fan(np.random.default_rng(0).random((30, 6)), top_k=3)\n"
        "print(partition_fan(fan, 2).group_sizes)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[3, 3]"
