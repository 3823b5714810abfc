"""Artifacts check each other and supply defaults: a partition for another teacher is refused,
and the data set and input contract an artifact recorded are used when none is given."""

from __future__ import annotations

import json

import pytest

from nonn.cli import main
from nonn.partition import Partition

from students_testing import make_npz, make_partition, make_teacher


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("defaults")
    data = make_npz(root / "bars.npz")
    teacher = make_teacher(root / "teacher.pt", data)
    other = make_teacher(root / "other.pt", data, steps=2)
    partition = root / "partition.json"
    assert main(["partition", "--teacher", str(teacher), "-K", "2", "--top-k", "4", "--percentile", "50",
                 "--out", str(partition), "--no-progress", "--device", "cpu"]) == 0
    return {"root": root, "data": data, "teacher": teacher, "other": other, "partition": partition}


STUDENTS = ["--arch", "cnn-small:width=4", "--epochs", "1", "--batch-size", "16", "--beta", "10", "--device", "cpu", "--no-progress"]


def test_partition_records_the_data_set_and_input_contract(run):
    part = Partition.load(run["partition"])
    assert part.data == {"dataset": str(run["data"].resolve()), "data_dir": None, "image_size": None}
    assert part.contract.normalize == "dataset" and part.contract.input_shape == (1, 8, 8)


def test_a_partition_of_another_teacher_is_refused_unless_forced(run, tmp_path, capsys, caplog):
    args = ["train-students", "--teacher", str(run["other"]), "--partition", str(run["partition"]), "--out",
            str(tmp_path / "s.pt"), *STUDENTS]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    recorded = Partition.load(run["partition"]).teacher["fingerprint"]
    from nonn.artifacts import sha256_file

    assert err.startswith(f"nonn: error: {run['partition']} was made for the teacher with fingerprint {recorded}, but teacher ")
    assert f"has fingerprint {sha256_file(run['other'])}" in err and "--force" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.pt").exists()
    with caplog.at_level("WARNING", logger="nonn"):
        assert main(args + ["--force"]) == 0
    assert f"--force: {run['partition']} was made for teacher {recorded}, training against teacher" in caplog.text


def test_train_students_and_evaluate_take_the_recorded_data_set(run, tmp_path, capsys, caplog):
    out = tmp_path / "s.pt"
    with caplog.at_level("INFO", logger="nonn"):
        assert main(["train-students", "--teacher", str(run["teacher"]), "--partition", str(run["partition"]),
                     "--out", str(out), *STUDENTS]) == 0
    assert f"data set: {run['data'].resolve()}, as recorded in {run['partition']} (pass --dataset to use another)" in caplog.text
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level("INFO", logger="nonn"):
        assert main(["evaluate", "--students", str(out), "--device", "cpu", "--no-progress"]) == 0
    assert f"data set: {run['data'].resolve()}, as recorded in {out}" in caplog.text
    assert "ensemble accuracy" in capsys.readouterr().out
    from nonn.students.train import load_students

    assert load_students(out).contract == Partition.load(run["partition"]).contract
