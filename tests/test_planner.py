"""Device profiles, the device-list syntax, and the placement planner (feasible and not)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from nonn.artifacts import ArtifactError, sha256_file
from nonn.cli import main
from nonn.devices.cost_model import RUNTIME_FOOTPRINT_MB, exchange_bytes, model_memory_mb
from nonn.devices.plan_file import load_plan
from nonn.devices.plan_text import format_plan
from nonn.devices.planner import PlanError, plan, simulation_estimates
from nonn.devices.profiles import load_profiles, parse_device_list
from nonn.runtime.bundle import Bundle, LayerSummary, ModelEntry, StudentEntry, TeacherSummary, TensorSpec
from nonn.runtime.input_contract import InputContract

SHAPE = [1, 28, 28]


def make_bundle(student_flops=(1e7, 1e7, 1e7, 1e7), student_bytes=(200_000,) * 4, feature_sizes=(16, 16, 16, 16),
                input_datatype: str = "FP32") -> Bundle:
    """An in-memory bundle (the planner reads only the manifest) with a two-conv teacher."""
    students, start = [], 0
    for k, (flops, size, f) in enumerate(zip(student_flops, student_bytes, feature_sizes)):
        students.append(
            StudentEntry(
                name=f"student_{k}",
                file=f"student_{k}.onnx",
                sha256="0" * 64,
                input=TensorSpec("image", [-1, *SHAPE], input_datatype),
                output=TensorSpec("features", [-1, f]),
                params=size // 4,
                flops=int(flops),
                size_bytes=size,
                activation_bytes=100_000,
                feature_size=f,
                group=list(range(start, start + f)),
                index=k,
            )
        )
        start += f
    head = ModelEntry("head", "head.onnx", "0" * 64, TensorSpec("features", [-1, start]), TensorSpec("logits", [-1, 10]), start * 10 + 10, 2 * start * 10 + 10)
    teacher = TeacherSummary(
        arch={"name": "toy"},
        params=4_000_000,
        flops=2_000_000_000,
        input_shape=SHAPE,
        layers=[
            LayerSummary("conv1", [64, 28, 28], 1_000_000_000, 2_000_000, input_shape=[1, 28, 28]),
            LayerSummary("conv2", [64, 14, 14], 999_000_000, 1_990_000, input_shape=[64, 28, 28]),
            LayerSummary("fc", [10], 1_000_000, 10_000, input_shape=[64]),
        ],
        activation_bytes=2 * 64 * 28 * 28 * 4,
    )
    contract = InputContract(SHAPE, [0.5], [0.25], normalize="explicit", datatype=input_datatype)
    return Bundle(students, head, contract, [str(i) for i in range(10)], teacher=teacher)


def test_builtin_profiles_have_sources_for_every_figure() -> None:
    profiles = load_profiles()
    assert {"rpi3b+", "rpi4b", "jetson-nano", "x86"} <= set(profiles)
    for p in profiles.values():
        assert p.memory_mb > p.reserved_mb >= 0 and p.gflops > 0 and p.link.bandwidth_mbps > 0
        for figure in ("memory_mb", "gflops", "power_w", "link", "threads"):
            assert p.sources.get(figure), f"{p.name}: no source for {figure}"
    assert profiles["rpi4b"].memory_mb == 2048


def test_parse_device_list() -> None:
    devices = parse_device_list("rpi3b+:4, X86")
    assert [d.name for d in devices] == ["rpi3b+"] * 4 + ["x86"]
    for bad, message in [
        ("", "empty"),
        ("rpi5", "unknown device profile 'rpi5'; known: jetson-nano, rpi3b\\+, rpi4b, x86"),
        ("rpi3b+:0", "count '0' for rpi3b\\+ must be a positive integer"),
        ("rpi3b+:two", "count 'two'"),
        ("rpi3b+,,x86", "item '' is not NAME"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_device_list(bad)


def test_user_profiles_add_and_override(tmp_path: Path) -> None:
    user = tmp_path / "my.json"
    user.write_text(
        json.dumps(
            {
                "format": "nonn.devices/1",
                "profiles": {
                    "rpi3b+": {"gflops": 5.0, "sources": {"gflops": "my own HPL run"}},
                    "tiny": {"memory_mb": 256, "gflops": 1, "power_w": {"idle": 0.5, "active": 1}, "link": {"bandwidth_mbps": 10, "latency_ms": 2}, "threads": 1},
                },
            }
        )
    )
    profiles = load_profiles(user)
    assert profiles["rpi3b+"].gflops == 5.0 and profiles["rpi3b+"].memory_mb == 1024
    assert profiles["rpi3b+"].sources["gflops"] == "my own HPL run" and profiles["rpi3b+"].sources["power_w"]
    assert [d.name for d in parse_device_list("tiny:2", profiles)] == ["tiny", "tiny"]
    user.write_text(json.dumps({"format": "nonn.devices/1", "profiles": {"bad": {"memory_mb": -1}}}))
    with pytest.raises(ArtifactError, match=r"my.json: profile 'bad': power_w"):
        load_profiles(user)
    user.write_text(json.dumps({"format": "nonn.devices/1", "profiles": {"rpi3b+": {"link": {"bandwidth_mbps": "fast"}}}}))
    with pytest.raises(ArtifactError, match=r"my.json: profile 'rpi3b\+': link.bandwidth_mbps: expected a positive number"):
        load_profiles(user)


def test_plan_four_pis_costs_follow_the_model() -> None:
    bundle = make_bundle()
    devices = parse_device_list("rpi3b+:4")
    p = plan(bundle, devices)
    assert [s.student for s in p.placement] == [f"student_{k}" for k in range(4)]
    assert len({d for s in p.placement for d in s.devices}) == 4
    pi = devices[0]
    row = p.devices[0]
    assert row.memory_mb == pytest.approx(RUNTIME_FOOTPRINT_MB + (2 * 200_000 + 100_000) / 2**20)
    assert row.compute_ms == pytest.approx(1e7 / (pi.gflops * 1e9) * 1000)
    # What a device sends back: the 16-float feature vector (64 B) in a ModelInfer reply; the
    # wire bytes add the image's request and gRPC/HTTP/2 framing (nonn.runtime.traffic).
    features, features_wire = exchange_bytes("student_0", "features", [1, 16], response=True)
    request, request_wire = exchange_bytes("student_0", "image", [1, 1, 28, 28], output="features")
    assert row.bytes_per_inference.features == features and 64 < features < 120
    assert row.bytes_per_inference.request == request and 28 * 28 * 4 < request < 28 * 28 * 4 + 80
    assert row.bytes_per_inference.wire == request_wire + features_wire > request + features
    assert p.nonn.bytes_per_inference.features == sum(r.bytes_per_inference.features for r in p.devices)
    assert p.nonn.bytes_per_inference.between_devices == 0

    # Model-parallel bytes follow from the teacher's activation shapes: two conv layers, each
    # with its input scattered and output gathered by the owner, three bands of four go out.
    band = lambda elements, response: exchange_bytes("layer", "band", [1, round(elements / 4)], response=response)[0]  # noqa: E731
    expected = 3 * (band(28 * 28, False) + band(64 * 28 * 28, True) + band(64 * 28 * 28, False) + band(64 * 14 * 14, True))
    assert p.model_parallel is not None and p.model_parallel.bytes_per_inference.between_devices == expected
    assert p.model_parallel.bytes_per_inference.between_devices > 100 * p.nonn.bytes_per_inference.features
    # The teacher's bytes are its image in and its logits back, and its column says so.
    assert p.teacher is not None and p.teacher.bytes_per_inference.features < p.nonn.bytes_per_inference.features
    assert "its bytes are the image sent to it and the logits it sends back" in p.teacher.note
    # The teacher (2 GFLOP) on one Pi is slower than four students of 10 MFLOP in parallel.
    ratios = p.ratios()
    assert p.teacher is not None and p.teacher.memory_per_device_mb == pytest.approx(model_memory_mb(16_000_000, 2 * 64 * 28 * 28 * 4))
    assert ratios["teacher"]["latency"] > 10 and ratios["model_parallel"]["wire_bytes_per_inference"] > 20
    text = format_plan(p)
    assert "rpi3b+#3" in text and "teacher/NoNN" in text and "model-parallel/NoNN" in text
    assert "device order" in text and "student_3" in text.split("device order")[1]
    for label in ("request bytes sent (B/inference)", "features sent back (B/inference)", "wire bytes (B/inference)",
                  "bytes between devices (B/inference)"):  # fmt: skip
        assert label in text


def test_teacher_columns_take_the_images_the_students_take() -> None:
    # A uint8 bundle's students get raw pixels; the teacher it is compared with gets the same.
    devices = parse_device_list("rpi4b:4")
    fp32, uint8 = plan(make_bundle(), devices), plan(make_bundle(input_datatype="UINT8"), devices)
    image = {t: exchange_bytes("teacher", "image", [1, *SHAPE], t, output="logits") for t in ("FP32", "UINT8")}
    saved_message, saved_wire = (f - u for f, u in zip(image["FP32"], image["UINT8"]))
    assert abs(saved_message - 3 * 28 * 28) <= 8  # 3 of every 4 pixel bytes (the datatype's name is a byte longer)
    for name in ("teacher", "model_parallel"):
        f, u = getattr(fp32, name), getattr(uint8, name)
        assert f is not None and u is not None
        assert f.bytes_per_inference.request - u.bytes_per_inference.request == saved_message, name
        assert f.bytes_per_inference.wire - u.bytes_per_inference.wire == saved_wire, name
        # What comes back (logits) and what passes between devices do not depend on the input.
        assert f.bytes_per_inference.features == u.bytes_per_inference.features, name
    assert fp32.nonn.bytes_per_inference.request - uint8.nonn.bytes_per_inference.request >= 4 * (3 * 28 * 28 - 8)
    assert fp32.nonn.bytes_per_inference.features == uint8.nonn.bytes_per_inference.features


def test_plan_balances_the_slowest_device() -> None:
    # Two heavy and two light students on two fast and two slow devices: min-max puts the heavy
    # ones on the fast devices. Checked against brute force over all placements.
    bundle = make_bundle(student_flops=(4e8, 1e7, 3e8, 2e7))
    devices = parse_device_list("rpi3b+,x86,rpi3b+,rpi4b")
    p = plan(bundle, devices)
    assert p.devices_of("student_0")[0] in ("x86", "rpi4b") and p.devices_of("student_2")[0] in ("x86", "rpi4b")
    by_student = {r.student: r.busy_ms for r in p.devices if r.student}
    best = min(
        max(
            infer_time
            for infer_time in (
                plan_time(bundle, devices, k, d) for k, d in enumerate(perm)
            )
        )
        for perm in itertools.permutations(range(4))
    )
    assert max(by_student.values()) == pytest.approx(best)


def plan_time(bundle: Bundle, devices, k: int, d: int) -> float:
    """busy time of student k on device d, from a one-student, one-device plan."""
    one = make_bundle(student_flops=(bundle.students[k].flops,), student_bytes=(bundle.students[k].size_bytes,), feature_sizes=(16,))
    return plan(one, [devices[d]]).devices[0].busy_ms


def test_infeasible_plans_name_the_student_and_shortfall() -> None:
    with pytest.raises(PlanError, match=r"fewer devices than students: the bundle has 4 students .* gives 3; add 1 more"):
        plan(make_bundle(), parse_device_list("rpi3b+:3"))
    too_big = make_bundle(student_bytes=(200_000, 600 * 2**20, 200_000, 200_000))
    with pytest.raises(PlanError, match=r"student_1 needs 1282\.\d MB .* largest device, rpi3b\+#0, has 824 MB available .* short by 458\.\d MB"):
        plan(too_big, parse_device_list("rpi3b+:4"))
    # It fits the Jetson, but two such students cannot share one.
    two_big = make_bundle(student_bytes=(500 * 2**20, 500 * 2**20, 200_000, 200_000))
    with pytest.raises(PlanError, match="no placement fits every student: student_[01]"):
        plan(two_big, parse_device_list("jetson-nano,rpi3b+:3"))
    assert plan(two_big, parse_device_list("jetson-nano:2,rpi3b+:2")).devices_of("student_0")[0].startswith("jetson-nano")


def test_cli_plan_and_simulation_hook(tmp_path: Path, capsys) -> None:
    bundle = make_bundle()
    bundle.save(tmp_path / "b")
    assert main(["plan", "--bundle", str(tmp_path / "b"), "--fleet", "rpi3b+:4", "--out", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "student_3" in out and "latency (ms)" in out
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["format"] == "nonn.plan/2" and len(saved["devices"]) == 4
    assert main(["plan", "--bundle", str(tmp_path / "b"), "--fleet", "rpi3b+:2"]) == 2
    assert "fewer devices than students" in capsys.readouterr().err
    est = simulation_estimates(tmp_path / "b", [{"name": "rpi3b+"}] * 4)
    assert est is not None and est["comparison"][0]["metric"] == "memory per device"


def test_plan_json_round_trip_and_validation(tmp_path: Path) -> None:
    make_bundle().save(tmp_path / "b")
    bundle = Bundle.load(tmp_path / "b")
    p = plan(bundle, parse_device_list("rpi4b,rpi3b+:4"))
    path = p.save(tmp_path / "plan.json")
    loaded = load_plan(path)
    assert loaded.to_dict() == p.to_dict()
    assert loaded.bundle is not None and loaded.bundle.manifest_sha256 == sha256_file(tmp_path / "b" / "manifest.json")
    assert [s.student for s in loaded.placement] == [s.name for s in bundle.students]
    assert sum(d.student is None for d in loaded.devices) == 1  # five devices, four students
    assert all(loaded.device(loaded.devices_of(s.name)[0]).student == s.name for s in bundle.students)
    assert loaded.device("rpi4b").threads == 4
    loaded.check_bundle(bundle)  # made for this bundle: no error

    good = json.loads(path.read_text())
    cases = [
        (lambda d: d.update(format="nonn.plan/0"), "format is 'nonn.plan/0', expected 'nonn.plan/2'"),
        (lambda d: d["bundle"].update(manifest_sha256="abc"), "bundle.manifest_sha256: expected 64 lowercase hex"),
        (lambda d: d["placement"].reverse(), "placement: places .* expected the bundle's students in order"),
        (lambda d: d["placement"][0].update(devices=["rpi5"]), r"placement\[0\] \(student_0\): device 'rpi5' is not among"),
        (lambda d: d["placement"][1].update(devices=d["placement"][0]["devices"]), "already serves student_0"),
        (lambda d: d["devices"][0].update(memory_mb="lots"), r"devices\[0\].memory_mb: expected a number, got 'lots'"),
        (lambda d: d["nonn"].pop("latency_ms"), "nonn.latency_ms: missing required field"),
    ]
    for change, message in cases:
        broken = json.loads(json.dumps(good))
        change(broken)
        path.write_text(json.dumps(broken))
        with pytest.raises(ArtifactError, match=message):
            load_plan(path)

    # Another bundle (another export of the same models): refused, naming both bundles and hashes.
    other = make_bundle()
    other.created = "another run"
    other.save(tmp_path / "other")
    with pytest.raises(PlanError, match=r"was made for bundle .*/b \(manifest sha256 [0-9a-f]{64}\), not for bundle .*/other \(manifest sha256 [0-9a-f]{64}\)"):
        p.check_bundle(Bundle.load(tmp_path / "other"))
    # An in-memory bundle has no manifest to record: such a plan cannot be saved.
    with pytest.raises(PlanError, match="not on disk"):
        plan(make_bundle(), parse_device_list("rpi3b+:4")).save(tmp_path / "memory.json")
    assert not (tmp_path / "memory.json").exists()


def test_plan_with_replicas_puts_every_student_on_that_many_devices(tmp_path: Path) -> None:
    bundle = make_bundle(student_flops=(1e7, 4e7), student_bytes=(200_000,) * 2, feature_sizes=(16, 16))
    devices = parse_device_list("x86,rpi4b,rpi3b+:2")
    result = plan(bundle, devices, replicas=2)
    copies = {p.student: p.devices for p in result.placement}
    assert sorted(copies) == ["student_0", "student_1"] and all(len(d) == 2 for d in copies.values())
    assert len({d for ds in copies.values() for d in ds}) == 4  # every device holds one copy
    assert result.nonn.devices == 4
    assert result.nonn.bytes_per_inference == plan(bundle, devices[:2]).nonn.bytes_per_inference
    assert "replication: 2 devices per student, 4 devices instead of 2" in format_plan(result)
    with pytest.raises(PlanError, match="2 students x 3 replicas need 6 devices, the device list gives 4"):
        plan(bundle, devices, replicas=3)


def test_a_plan_from_an_older_nonn_says_to_plan_again(tmp_path):
    old = tmp_path / "plan.json"
    old.write_text(json.dumps({"format": "nonn.plan/1", "devices": []}))
    with pytest.raises(ArtifactError, match=r"format is 'nonn.plan/1', expected 'nonn.plan/2': made by an older nonn; "
                                            r"run `nonn plan --bundle BUNDLE --fleet \.\.\. --out .*plan.json` again"):
        load_plan(old)
