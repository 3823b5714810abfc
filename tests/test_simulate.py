"""`simulate` end to end: real device server processes, the real aggregator, faults, cleanup."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import psutil
import pytest

from fleet_testing import ensemble_predictions, make_bundle, tiny_images, tiny_profile
from nonn.devices.fleet import FleetError, LocalFleet, live_fleets
from nonn.devices.netem import LinkModel, NetworkEmulation
from nonn.devices.report import REQUIRED_KEYS, build_report
from nonn.devices.simulate import FaultSpec, SimulationConfig, parse_faults, simulate

pytestmark = pytest.mark.timeout(120)

FEATURE_SIZES = (3, 2, 3)


@pytest.fixture(scope="module")
def data(bundle):
    x = tiny_images(40)
    return x, ensemble_predictions(bundle, x)


def _started_pids(result) -> list[int]:
    return [e["pid"] for d in result.devices for e in d["events"] if e["event"] == "start"]


def _assert_no_children() -> None:
    children = [p for p in psutil.Process().children(recursive=True) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert children == [], f"processes left running: {[(p.pid, p.cmdline()) for p in children]}"
    assert live_fleets() == []


def test_fault_syntax():
    assert FaultSpec.parse("1@2") == FaultSpec(1, 2.0, None)
    assert FaultSpec.parse("0@0.5:3") == FaultSpec(0, 0.5, 3.0)
    assert str(FaultSpec.parse(" 2 @ 1.5 : 2 ")) == "2@1.5:2"
    for bad in ("1", "a@2", "1@", "1@2:", "-1@2", "1@2:3:4"):
        with pytest.raises(ValueError, match="DEVICE@SECONDS"):
            FaultSpec.parse(bad)
    with pytest.raises(ValueError, match="device 3 does not exist; devices are 0..2"):
        parse_faults(["3@1"], 3)


def test_simulate_three_students_end_to_end(bundle, data):
    x, y = data
    teacher = y.copy()
    teacher[:10] = (teacher[:10] + 1) % 3  # the teacher disagrees on 10 of 40 images
    result = simulate(
        bundle.root,
        [tiny_profile(latency_ms=25.0, bandwidth_mbps=50.0)] * 3,
        x,
        y,
        teacher_predictions=teacher,
        config=SimulationConfig(requests=60, concurrency=3, network="delay", progress=False),
    )
    report = build_report(result, dataset="tiny")
    for key in REQUIRED_KEYS:
        assert key in report
    assert (report["requests"], report["answered"], report["lost"], report["degraded"]) == (60, 60, 0, 0)
    # The fleet's answers equal the ensemble run in-process: every image right.
    assert report["accuracy"] == 1.0
    # Requests cycle over the 40 images: 0..19 are sent twice, so the 10 disagreements count twice.
    assert report["teacher_agreement"] == pytest.approx(1 - 20 / 60, abs=1e-6)
    # The client delay model ran: no request can beat the 25 ms round trip.
    assert report["network_emulation"]["mode"] == "client-delay"
    assert float(np.nanmin(result.latency_s)) >= 0.025
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p95"] <= report["latency_ms"]["p99"]
    # Bytes per inference are those the plan estimates (nonn.runtime.traffic): at batch 1 the
    # measured request and reply sizes are the plan's to within the request id's digits.
    from nonn.devices.planner import plan

    planned = plan(bundle.root, [{**tiny_profile(), "power_w": {"idle": 1.0, "active": 2.0}}] * 3, placement=[0, 1, 2])
    for d, row in zip(report["devices"], planned.devices):
        measured, estimated = d["bytes_per_inference"], row.bytes_per_inference
        assert d["peak_rss_mb"] > 10  # a real Python + ONNX Runtime process was measured
        assert abs(measured["request"] - estimated.request) <= 4 and measured["request"] > 16 * 4
        assert abs(measured["features"] - estimated.features) <= 4
        assert d["contributed"] == 1.0 and d["starts"] == 1 and not d["over_memory"]
        assert measured["wire"] >= measured["request"] + measured["features"]  # gRPC and HTTP/2 framing on top
    # The student with 2 features sends back fewer bytes than those with 3.
    per_dev = [d["bytes_per_inference"]["features"] for d in report["devices"]]
    assert per_dev[1] < per_dev[0] == per_dev[2]
    json.dumps(report)  # plain JSON data
    pids = _started_pids(result)
    assert len(pids) == 3 and not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    _assert_no_children()


def test_requests_n_sends_exactly_n_and_says_which_fault_did_not_happen(bundle, data):
    """A kill due after the last request neither happens nor stretches the stream."""
    x, y = data
    result = simulate(
        bundle.root, [tiny_profile()] * 3, x, y,
        config=SimulationConfig(requests=12, concurrency=2, network="none", faults=[FaultSpec(1, 4.0, 1.0)], progress=False),
    )  # fmt: skip
    report = build_report(result)
    assert report["requests"] == 12 and result.wall_s < 4.0 and result.events == []
    assert any("fault 1@4:1 did not happen" in w and "--until-faults-end" in w for w in report["warnings"])
    _assert_no_children()


def test_the_progress_bar_has_a_known_total():
    from nonn.devices.simulate import SlowSpec
    from nonn.devices.stream import StreamProgress, planned_seconds

    by_count = SimulationConfig(requests=30, faults=[FaultSpec(1, 2.0, 3.0)])
    assert planned_seconds(by_count) is None
    bar = StreamProgress(30, planned_seconds(by_count), enabled=False)
    for _ in range(30):
        bar.request_done(0.1)
    assert (bar.total, bar.requests) == (30, 30)
    until = SimulationConfig(requests=30, faults=[FaultSpec(1, 2.0, 3.0)], slowdowns=[SlowSpec(0, 7.0, 2.0)],
                             recovery_s=1.5, until_faults_end=True)  # fmt: skip
    assert planned_seconds(until) == 7.0
    assert planned_seconds(SimulationConfig(min_duration_s=9.0, until_faults_end=True, faults=[FaultSpec(1, 2.0, 3.0)],
                                            recovery_s=1.5)) == 9.0  # fmt: skip
    bar = StreamProgress(30, planned_seconds(until), enabled=False)
    bar.request_done(2.5)
    assert (bar.total, bar.elapsed_s, bar.requests) == (7.0, 2.5, 1)
    bar.request_done(8.0)  # a restart slower than planned: the total follows
    assert (bar.total, bar.elapsed_s) == (8.0, 8.0)


def test_kill_and_restart_gives_degraded_answers_and_loses_nothing(bundle, data):
    x, y = data
    result = simulate(
        bundle.root,
        [tiny_profile(latency_ms=1.0)] * 3,
        x,
        y,
        config=SimulationConfig(
            requests=20,
            concurrency=2,
            rate=50.0,
            recovery_s=2.0,
            deadline_s=0.5,
            network="none",
            faults=[FaultSpec(device=1, at_s=0.3, restart_after_s=0.3)],
            until_faults_end=True,
            progress=False,
        ),
    )
    report = build_report(result)
    events = [(e["device"], e["event"]) for e in result.events]
    assert events[:2] == [(1, "killed"), (1, "restarted")] and (1, "serving") in events
    assert report["lost"] == 0 and report["answered"] == report["requests"]
    assert report["degraded"] > 0
    # Degraded answers are missing exactly device 1; full answers are all right.
    degraded = ~result.contributed.all(axis=1)
    assert not result.contributed[degraded, 1].any() and result.contributed[degraded][:, [0, 2]].all()
    assert report["accuracy_all_devices"] == 1.0
    assert report["accuracy_during_outage"] is not None
    # Device 1 came back: requests sent after it reported serving use all three devices again.
    serving_at = next(e["t"] for e in result.events if e["event"] == "serving")
    # The stream ran until the fault had played out, and beyond; the aggregator reconnects
    # within its 1 s maximum reconnect backoff (+20% jitter).
    assert result.wall_s >= serving_at + 2.0
    after = result.request_start_s > serving_at + 1.5
    assert after.sum() >= 5 and result.contributed[after].all()
    outage = report["timeline"]["outages"][0]
    assert outage["start_s"] <= outage["end_s"] <= outage["answering_again_s"] <= serving_at + 1.5
    dev1 = report["devices"][1]
    assert dev1["starts"] == 2 and dev1["contributed"] < 1.0
    assert any(b["degraded"] for b in report["timeline"]["bins"])
    assert report["timeline"]["outages"][0]["device"] == 1
    # The aggregator's view: it took device 1 out, a health check found it serving, it answered again.
    seen = report["device_health"]["faults"][0]
    assert seen["device"] == 1 and seen["killed_s"] <= seen["down_s"] <= seen["half_open_s"] <= seen["rejoined_s"]
    assert seen["serving_s"] == serving_at and seen["rejoined_after_serving_s"] is not None
    assert report["devices"][1]["skipped"] > 0  # requests did not wait for the dead device
    _assert_no_children()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_every_process_is_stopped_when_the_run_fails(bundle, data, error, tmp_path):
    x, y = data
    seen: list[int] = []

    def explode(done: int) -> None:
        if done == 5:
            seen.extend(p for f in live_fleets() for p in f.pids())
            raise error("stream interrupted")

    with pytest.raises(error):
        simulate(
            bundle.root,
            [tiny_profile()] * 3,
            x,
            y,
            config=SimulationConfig(requests=50, concurrency=1, network="delay", progress=False),
            on_progress=explode,
            log_dir=tmp_path / "logs",
        )
    assert len(seen) == 3
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in seen)
    _assert_no_children()


def test_a_device_that_cannot_start_is_reported_and_the_others_are_stopped(bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bundle.root, broken)
    (broken / "student_2.onnx").write_bytes(b"tampered")  # the server refuses a sha256 mismatch
    profiles = [tiny_profile()] * 3
    with pytest.raises(FleetError, match=r"device 2 \(student_2\) exited[^\n]*\n(.|\n)*sha256"):
        with LocalFleet(broken, profiles, NetworkEmulation([LinkModel()] * 3), startup_timeout_s=30, log_dir=tmp_path / "logs"):
            pass
    _assert_no_children()


def test_simulate_checks_its_inputs(bundle, data):
    x, y = data
    with pytest.raises(ValueError, match="2 device profiles for a bundle with 3 students"):
        simulate(bundle.root, [tiny_profile()] * 2, x, y)
    with pytest.raises(ValueError, match="40 images but 39 labels"):
        simulate(bundle.root, [tiny_profile()] * 3, x, y[:-1])
    with pytest.raises(ValueError, match="device 5 does not exist"):
        simulate(bundle.root, [tiny_profile()] * 3, x, y, config=SimulationConfig(faults=[FaultSpec(5, 1.0)]))
    with pytest.raises(ValueError, match="images have shape"):
        simulate(bundle.root, [tiny_profile()] * 3, np.zeros((4, 3, 4, 4), np.float32), y[:4])
    _assert_no_children()


TINY_PROFILES = {
    "format": "nonn.devices/1",
    "profiles": {
        "tiny": {
            "memory_mb": 2048,
            "gflops": 1.0,
            "power_w": {"idle": 1.0, "active": 2.0},
            "link": {"bandwidth_mbps": 100, "latency_ms": 2.0, "loss": 0.0},
            "threads": 1,
            "sources": {"all": "made up for the tests"},
        },
        "slow": {
            "memory_mb": 2048,
            "gflops": 1e-6,
            "power_w": {"idle": 1.0, "active": 2.0},
            "link": {"bandwidth_mbps": 100, "latency_ms": 2.0, "loss": 0.0},
            "threads": 1,
            "sources": {"all": "made up for the tests"},
        },
    },
}


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    bundle = make_bundle(root / "bundle", feature_sizes=(2, 3), seed=3)
    x = tiny_images(30, seed=4)
    y = ensemble_predictions(bundle, x)
    np.savez(root / "data.npz", x=x, y=y, x_test=x, y_test=y)
    np.save(root / "teacher.npy", y)
    (root / "profiles.json").write_text(json.dumps(TINY_PROFILES))
    return root


def test_cli_simulate_with_a_fault_writes_json_and_html(cli_inputs, capsys):
    from nonn.cli import main

    root = cli_inputs
    code = main([
        "simulate", "--bundle", str(root / "bundle"), "--fleet", "tiny:2", "--profiles", str(root / "profiles.json"),
        "--dataset", str(root / "data.npz"), "--requests", "30", "--concurrency", "2", "--rate", "60",
        "--kill", "1@0.3:0.2", "--until-faults-end", "--recovery", "0.3", "--network", "delay", "--no-progress",
        "--teacher-predictions", str(root / "teacher.npy"),
        "--json", str(root / "sim.json"), "--report", str(root / "sim.html"),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads((root / "sim.json").read_text())
    assert report["lost"] == 0 and report["degraded"] > 0 and report["requests"] >= 30
    assert report["accuracy_all_devices"] == 1.0 and report["teacher_agreement"] is not None
    assert report["network_emulation"]["mode"] == "client-delay"
    assert [d["profile"] for d in report["devices"]] == ["tiny", "tiny"]
    assert [d["memory_limit_mb"] for d in report["devices"]] == [2048.0, 2048.0]
    assert report["devices"][1]["starts"] == 2
    assert "accuracy during outage" in out and "HTML report:" in out
    assert (root / "sim.html").read_text().count("data:image/png;base64,") == 3
    _assert_no_children()


def test_cli_simulate_samples_a_split_sorted_by_class(cli_inputs, tmp_path, capsys):
    """Fewer requests than images: a seeded sample of the split, not its first images (an image
    folder lists them class by class), with --teacher-predictions taken for the same images."""
    from nonn.cli import main

    root = cli_inputs
    x = tiny_images(40, seed=5)
    y = np.repeat([0, 1], 20)  # sorted by class, as an image folder's files are
    np.savez(tmp_path / "sorted.npz", x=x, y=y, x_test=x, y_test=y)
    np.save(tmp_path / "teacher.npy", np.zeros(40, dtype=np.int64))  # right on class 0 only
    code = main([
        "simulate", "--bundle", str(root / "bundle"), "--fleet", "tiny:2", "--profiles", str(root / "profiles.json"),
        "--dataset", str(tmp_path / "sorted.npz"), "--requests", "10", "--network", "none", "--no-progress",
        "--teacher-predictions", str(tmp_path / "teacher.npy"), "--json", str(tmp_path / "sim.json"),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "sim.json").read_text())
    assert report["requests"] == 10
    # The first 10 images are all class 0 (teacher accuracy 1); a sample of 40 holds both classes.
    assert 0.0 < report["teacher_accuracy"] < 1.0
    _assert_no_children()


def test_cli_simulate_places_students_as_plan_does(cli_inputs, tmp_path, capsys):
    """One placement: the heavier student_1 goes on the fast device in both commands, whatever the list's order."""
    from nonn.cli import main
    from nonn.devices.plan_file import load_plan

    root = cli_inputs
    common = ["--bundle", str(root / "bundle"), "--fleet", "tiny,slow", "--profiles", str(root / "profiles.json")]
    assert main(["plan", *common, "--out", str(tmp_path / "plan.json")]) == 0
    planned = load_plan(tmp_path / "plan.json")
    planned_profiles = [planned.device(planned.devices_of(s)[0]).profile for s in ("student_0", "student_1")]
    assert planned_profiles == ["slow", "tiny"]
    code = main(["simulate", *common, "--dataset", str(root / "data.npz"), "--requests", "4", "--network", "none",
                 "--no-progress", "--json", str(tmp_path / "sim.json")])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "sim.json").read_text())
    assert [d["profile"] for d in report["devices"]] == planned_profiles
    assert "student_0 on slow, student_1 on tiny" in capsys.readouterr().err
    _assert_no_children()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fleet", "tiny:1"], "gives 1 device(s) where at least 2 are needed"),
        (["--fleet", "tiny:2", "--replicas", "2"], "gives 2 device(s) where at least 4 are needed"),
        (["--fleet", "tiny:2", "--slow", "1@0:0.5"], "a slowdown factor above 1"),
        (["--fleet", "tiny:2", "--slow", "2@0:4"], "--slow 2@0:4: device 2 does not exist"),
        (["--fleet", "tiny:2", "--kill", "5@1"], "device 5 does not exist"),
        (["--fleet", "tiny:2", "--kill", "1at2"], "expected DEVICE@SECONDS"),
        (["--fleet", "nosuch:2"], "unknown device profile 'nosuch'"),
    ],
)
def test_cli_simulate_rejects_bad_arguments(cli_inputs, capsys, extra, message):
    from nonn.cli import main

    root = cli_inputs
    code = main(["simulate", "--bundle", str(root / "bundle"), "--profiles", str(root / "profiles.json"),
                 "--dataset", str(root / "data.npz"), "--no-progress", *extra])  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    _assert_no_children()


def test_cli_simulate_runs_the_teacher_for_agreement(tmp_path, capsys):
    """--teacher: the teacher's predictions on the streamed images, normalised as it was trained."""
    torch = pytest.importorskip("torch")
    from students_testing import make_npz, make_teacher

    from nonn.cli import main
    from nonn.students.data import load_dataset
    from nonn.students.teacher_loading import load_teacher

    data = make_npz(tmp_path / "bars.npz", n_train=48, n_test=24)
    teacher_path = make_teacher(tmp_path / "teacher.pt", data, steps=10)
    make_bundle(tmp_path / "bundle", feature_sizes=(2, 2), input_shape=(1, 8, 8))
    (tmp_path / "profiles.json").write_text(json.dumps(TINY_PROFILES))
    code = main([
        "simulate", "--bundle", str(tmp_path / "bundle"), "--fleet", "tiny", "--profiles", str(tmp_path / "profiles.json"),
        "--dataset", str(data), "--requests", "0", "--network", "none", "--no-progress",
        "--teacher", str(teacher_path), "--json", str(tmp_path / "sim.json"),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "sim.json").read_text())
    ds = load_dataset(str(data))
    teacher = load_teacher(teacher_path)
    with torch.no_grad():
        expected = teacher.model(torch.from_numpy(ds.normalize(ds.test_x))).argmax(1).numpy()
    assert report["requests"] == 24  # --requests 0: every test image once
    assert report["teacher_accuracy"] == pytest.approx(float((expected == ds.test_y).mean()), abs=1e-6)
    assert report["teacher_agreement"] is not None
    _assert_no_children()


def test_cli_simulate_with_a_tampered_student_says_so_in_one_line(cli_inputs, tmp_path):
    """The device's own error reaches the user as one `nonn: error:` line, not a traceback."""
    broken = tmp_path / "bundle"
    shutil.copytree(cli_inputs / "bundle", broken)
    (broken / "student_1.onnx").write_bytes(b"tampered")
    proc = subprocess.run(
        [sys.executable, "-m", "nonn", "simulate", "--bundle", str(broken), "--fleet", "tiny:2", "--profiles",
         str(cli_inputs / "profiles.json"), "--dataset", str(cli_inputs / "data.npz"), "--requests", "4",
         "--network", "none", "--no-progress", "--startup-timeout", "30", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("nonn: error:")]
    assert error.startswith("nonn: error: device 1 (student_1) exited with status 2 before it was ready: ")
    assert "student_1.onnx: sha256 is" in error and "refusing to load it" in error
    assert f"(log: {tmp_path / 'logs'}" in error
    _assert_no_children()
