"""The training commands (train-teacher, partition, train-students) end with one summary line of
the same form: what was written, the key figure, how long it took."""

from __future__ import annotations

import re
from pathlib import Path

from nonn.cli import main

from students_testing import make_npz

SUMMARY = re.compile(r"^(?P<command>[a-z-]+): wrote (?P<written>.+?) \((?P<detail>.+)\); (?P<metric>.+); took \d+\.\d s$")


def last_line(capsys) -> re.Match:
    line = capsys.readouterr().out.strip().splitlines()[-1]
    match = SUMMARY.match(line)
    assert match, f"not a summary line: {line!r}"
    return match


def test_training_commands_end_with_the_same_summary_line(tmp_path, capsys):
    data = str(make_npz(tmp_path / "bars.npz"))
    teacher, partition, students = tmp_path / "t.pt", tmp_path / "p.json", tmp_path / "s.pt"
    common = ["--dataset", data, "--device", "cpu", "--no-progress"]
    assert main(["train-teacher", *common, "--arch", "cnn-small", "--width", "4", "--epochs", "1", "--batch-size", "16",
                 "--out", str(teacher)]) == 0
    teacher_line = last_line(capsys)
    assert main(["partition", "--teacher", str(teacher), *common, "-K", "2", "--top-k", "4", "--percentile", "50",
                 "--out", str(partition), "--plot", str(tmp_path / "fan.png")]) == 0
    partition_line = last_line(capsys)
    assert main(["train-students", "--teacher", str(teacher), "--partition", str(partition), *common,
                 "--arch", "cnn-small:width=4", "--epochs", "1", "--batch-size", "16", "--beta", "10", "--out", str(students)]) == 0
    students_line = last_line(capsys)

    lines = {"train-teacher": teacher_line, "partition": partition_line, "train-students": students_line}
    assert {name: line["command"] for name, line in lines.items()} == {name: name for name in lines}
    assert teacher_line["written"] == str(teacher) and teacher_line["metric"].startswith("test accuracy ")
    assert partition_line["written"].split(", ") == [str(partition), str(tmp_path / "fan.npy"), str(tmp_path / "fan.png")]
    assert partition_line["metric"].startswith("modularity ") and "sizes [" in partition_line["detail"]
    assert students_line["written"] == str(students) and students_line["metric"].startswith("ensemble test accuracy ")
    for line in lines.values():
        assert all(Path(p).is_file() for p in line["written"].split(", "))
