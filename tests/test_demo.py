"""`nonn demo` end to end with the smallest settings: every stage runs and every artifact lands."""

import json

import pytest

from nonn.cli import main
from nonn.cli.demo import format_summary, run_demo


@pytest.mark.slow
def test_demo_pipeline_writes_every_artifact(tmp_path, capsys):
    out = tmp_path / "demo"
    result = run_demo(out, teacher_epochs=1, student_epochs=1, requests=24, fault=False)
    for key in ("teacher", "partition", "fan_plot", "students", "plan", "simulation", "report"):
        assert result.artifacts[key].is_file(), key
    assert (out / "bundle" / "manifest.json").is_file()
    sim = json.loads((out / "simulation.json").read_text())
    assert sim["requests"] == 24 and sim["answered"] == 24 and sim["lost"] == 0
    assert len(sim["devices"]) == 4
    assert 0.0 <= sim["accuracy"] <= 1.0
    assert result.teacher_accuracy is not None and result.students_accuracy is not None
    summary = format_summary(result)
    assert "HTML report" in summary and str(out / "report.html") in summary

    # --reuse keeps the trained artifacts and reruns only plan and simulate.
    before = (out / "students.pt").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--reuse", "--requests", "8", "--no-fault"]) == 0
    assert (out / "students.pt").stat().st_mtime_ns == before
    assert "nonn demo: summary" in capsys.readouterr().out


def test_demo_rejects_bad_settings(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "-K", "1"]) == 2
    assert "--students must be at least 2" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--teacher", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
