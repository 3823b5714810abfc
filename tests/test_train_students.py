"""Joint student training: a real run on tiny data, exact resume, baselines, bad input, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from nonn.artifacts import ArtifactError, sha256_file
from nonn.cli import main
from nonn.students import train as train_mod
from nonn.students.evaluate import evaluate_ensemble
from nonn.students.train import StudentsConfig, load_students, train_students

from students_testing import make_npz, make_partition, make_teacher

STUDENT = "cnn-small:width=4"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    data = make_npz(root / "bars.npz")
    teacher = make_teacher(root / "teacher.pt", data)
    partition = make_partition(root / "partition.json", teacher)
    return {"root": root, "data": data, "teacher": teacher, "partition": partition}


def config(files, out, **kw) -> StudentsConfig:
    base = dict(
        partition=str(files["partition"]), out=str(out), teacher=str(files["teacher"]), dataset=str(files["data"]),
        arch=STUDENT, epochs=2, batch_size=16, lr=0.05, beta=10.0, device="cpu", progress=False,
    )
    base.update(kw)
    return StudentsConfig(**base)


def test_training_writes_checkpoint_metrics_and_learns(files, tmp_path):
    out = tmp_path / "students.pt"
    result = train_students(config(files, out, epochs=4, student_dropout=0.2))
    lines = [json.loads(line) for line in (tmp_path / "students.pt.metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in lines] == [1, 2, 3, 4]
    for key in ("loss", "kd_loss", "at_loss", "train_accuracy", "test_accuracy", "accuracy_without", "contribution"):
        assert key in lines[0]
    assert set(lines[0]["accuracy_without"]) == {"student_0", "student_1"}
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert result["accuracy"] > 0.6  # three easy classes; chance is 1/3
    # Student 0: the teacher-sized backbone without its classifier (8*3+3) plus bridge 8x3 and BN 2*3.
    assert result["teacher_params"] == 1119
    assert result["params_per_student"][0] == 1119 - 27 + 24 + 6

    loaded = load_students(out)
    assert loaded.groups == [[0, 2, 5], [1, 3, 4, 6, 7]]
    assert loaded.meta["format"] == "nonn.students/1" and loaded.meta["complete"]
    assert loaded.meta["teacher"]["feature_layer"] == "act"
    assert loaded.meta["dataset"]["num_classes"] == 3
    # The rebuilt ensemble reproduces the recorded accuracy.
    from nonn.students.data import load_dataset
    from nonn.students.loader import make_loader

    data = load_dataset(str(files["data"]))
    report = evaluate_ensemble(loaded.ensemble, make_loader(data, "test", batch_size=16, train=False))
    assert report.accuracy == pytest.approx(result["accuracy"])


def test_resume_equals_uninterrupted_run(files, tmp_path, monkeypatch):
    # Spatial attention transfer and student dropout: every random stream must resume exactly.
    kw = dict(epochs=3, student_dropout=0.3, at="spatial")
    full = tmp_path / "full.pt"
    train_students(config(files, full, **kw))

    part = tmp_path / "part.pt"
    real_write = train_mod.atomic_write_jsonl
    calls = {"n": 0}

    def write_then_die(path, history):
        real_write(path, history)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed after the second epoch's checkpoint

    monkeypatch.setattr(train_mod, "atomic_write_jsonl", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_students(config(files, part, **kw))
    monkeypatch.setattr(train_mod, "atomic_write_jsonl", real_write)
    assert load_students(part).meta["epoch"] == 2
    train_students(config(files, part, resume=True, **kw))

    a, b = torch.load(full, weights_only=True), torch.load(part, weights_only=True)
    assert b["epoch"] == 3
    for sa, sb in zip(a["students"], b["students"]):
        for key in sa["state_dict"]:
            assert torch.equal(sa["state_dict"][key], sb["state_dict"][key]), key
    for key in a["head"]:
        assert torch.equal(a["head"][key], b["head"][key])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_resume_with_different_settings_is_refused_and_nothing_overwritten(files, tmp_path):
    out = tmp_path / "s.pt"
    train_students(config(files, out, epochs=1))
    before = sha256_file(out)
    with pytest.raises(ValueError, match="lr: saved 0.05, now 0.1"):
        train_students(config(files, out, epochs=1, lr=0.1, resume=True))
    with pytest.raises(FileExistsError, match="--resume"):
        train_students(config(files, out, epochs=1))
    assert sha256_file(out) == before


def test_bad_inputs_give_clear_errors(files, tmp_path):
    out = tmp_path / "never.pt"
    # K that disagrees with the partition
    with pytest.raises(ValueError, match="--num-students 3 disagrees"):
        train_students(config(files, out, num_students=3))
    # groups that do not match the teacher layer's channels
    wide = make_partition(tmp_path / "wide.json", files["teacher"], groups=((0, 1), (2, 12)), num_filters=16)
    with pytest.raises(ValueError, match="partitions 16 filters but teacher layer 'act' has 8 channels"):
        train_students(config(files, out, partition=str(wide)))
    # a teacher of another architecture than the partition was made for
    other_arch = {"name": "cnn-small", "num_classes": 3, "in_channels": 1, "kwargs": {"width": 8}}
    other = make_teacher(tmp_path / "other.pt", files["data"], steps=1, arch=other_arch)
    with pytest.raises(ValueError, match="was made for a cnn-small:width=4"):
        train_students(config(files, out, teacher=str(other)))
    # a truncated teacher checkpoint, a corrupt students checkpoint to resume
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(files["teacher"].read_bytes()[:200])
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        train_students(config(files, out, teacher=str(truncated)))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="corrupt.pt"):
        train_students(config(files, corrupt, resume=True))
    assert corrupt.read_bytes() == b"not a checkpoint"
    with pytest.raises(ArtifactError):
        load_students(corrupt)
    # settings
    with pytest.raises(ValueError, match="--arch lists 3"):
        train_students(config(files, out, arch="cnn-small,cnn-small,cnn-small"))
    with pytest.raises(ValueError, match="student dropout"):
        train_students(config(files, out, student_dropout=1.0))
    assert not out.exists()


def test_baselines(files, tmp_path):
    single = train_students(config(files, tmp_path / "single.pt", epochs=1, baseline="single-kd"))
    loaded = load_students(tmp_path / "single.pt")
    assert loaded.ensemble.num_students == 1 and loaded.groups == [[1, 3, 4, 6, 7]]
    assert loaded.meta["activation_transfer"] == "none" and single["accuracy_without"] == {}

    train_students(config(files, tmp_path / "random.pt", epochs=1, baseline="random-partition"))
    groups = load_students(tmp_path / "random.pt").groups
    assert [len(g) for g in groups] == [3, 5] and groups != [[0, 2, 5], [1, 3, 4, 6, 7]]
    assert not set(groups[0]) & set(groups[1])

    train_students(config(files, tmp_path / "noat.pt", epochs=1, baseline="no-at"))
    history = load_students(tmp_path / "noat.pt").meta["history"]
    assert history[0]["at_loss"] == 0.0


def test_heterogeneous_students(files, tmp_path):
    train_students(config(files, tmp_path / "het.pt", epochs=1, arch="cnn-small:width=4,wrn-10-1:width=4"))
    loaded = load_students(tmp_path / "het.pt")
    assert [s.spec.backbone["name"] for s in loaded.ensemble.students] == ["cnn-small", "wrn-10-1"]


def test_cli_train_and_evaluate(files, tmp_path, capsys):
    out = tmp_path / "cli.pt"
    args = ["train-students", "--teacher", str(files["teacher"]), "--partition", str(files["partition"]),
            "--dataset", str(files["data"]), "--arch", STUDENT, "--epochs", "1", "--batch-size", "16", "--beta", "10",
            "--device", "cpu", "--out", str(out), "--no-progress", "--num-students", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"train-students: wrote {out} (2 student(s)") and "ensemble test accuracy" in printed
    report_path = tmp_path / "eval.json"
    assert main(["evaluate", "--students", str(out), "--dataset", str(files["data"]), "--teacher", str(files["teacher"]),
                 "--device", "cpu", "--json", str(report_path), "--no-progress"]) == 0
    report = json.loads(report_path.read_text())
    assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["teacher_accuracy"] <= 1.0
    assert set(report["missing_one"]) == {"student_0", "student_1"}
    assert "ensemble accuracy" in capsys.readouterr().out
    # A wrong K is a user error (exit 2) naming the value.
    assert main(args[:-2] + ["--num-students", "5", "--overwrite"]) == 2
    assert "--num-students 5 disagrees" in capsys.readouterr().err
