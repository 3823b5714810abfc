"""Bytes per inference: one definition (nonn.runtime.traffic) that plan, infer and simulate share,
so that the figures a user reads in each can be put side by side."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from nonn.cli import main
from nonn.devices.planner import plan
from nonn.devices.profiles import load_profiles
from nonn.runtime.traffic import BytesPerInference, describe


def test_measured_totals_and_the_fleet_sum():
    one = BytesPerInference.measured(1000, 400, 10, wire_total=2500)
    assert one == BytesPerInference(request=100.0, features=40.0, wire=250.0)
    assert BytesPerInference.measured(0, 0, 0) == BytesPerInference(0.0, 0.0)  # nothing answered: no division error
    fleet = BytesPerInference.total([one, BytesPerInference(120.0, 20.0, 300.0)])
    assert fleet == BytesPerInference(request=220.0, features=60.0, wire=550.0)
    assert BytesPerInference.total([one, BytesPerInference(1.0, 1.0)]).wire is None  # not measured on one device
    assert describe(one) == "request bytes sent 100 B, features sent back 40 B, wire bytes 250 B per inference"
    assert describe(BytesPerInference(5.0, 6.0)) == "request bytes sent 5 B, features sent back 6 B per inference (wire bytes not measured)"


def test_infer_reports_the_bytes_plan_estimates_with_the_same_labels(bundle, devices, tmp_path, capsys):
    images = np.random.default_rng(3).integers(0, 256, size=(5, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    endpoints = ",".join(d.address for d in devices)
    args = ["infer", "--bundle", str(bundle.root), "--devices", endpoints, "--input", str(tmp_path / "images.npy"), "--batch-size", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    planned = plan(bundle, [load_profiles()["rpi3b+"]] * len(devices), placement=list(range(len(devices))))
    for d, row, student in zip(report["devices"], planned.devices, bundle.students):
        measured, estimated = d["bytes_per_inference"], row.bytes_per_inference
        assert measured["wire"] is None  # infer cannot see the wire
        # Batch 1: the measured messages are the plan's, but for the request id's digits.
        assert abs(measured["request"] - estimated.request) <= 4
        assert abs(measured["features"] - estimated.features) <= 4
        line = re.search(rf"{student.name} @ .*; request bytes sent (\d+) B, features sent back (\d+) B per inference \(wire bytes not measured\)", text)
        assert line, text
        assert (int(line[1]), int(line[2])) == (round(measured["request"]), round(measured["features"]))
    main(["plan", "--bundle", str(bundle.root), "--fleet", f"rpi3b+:{len(devices)}"])
    plan_text = capsys.readouterr().out
    assert "request bytes sent (B/inference)" in plan_text and "features sent back (B/inference)" in plan_text


@pytest.mark.parametrize("field", ["request", "features"])
def test_more_features_more_bytes_back_same_request(bundle, field):
    rows = plan(bundle, [load_profiles()["rpi3b+"]] * bundle.num_students, placement=list(range(bundle.num_students))).devices
    values = [getattr(r.bytes_per_inference, field) for r in rows]
    sizes = [s.feature_size for s in bundle.students]
    if field == "request":
        assert len(set(values)) == 1  # every student gets the same image
    else:
        assert [v - values[0] for v in values] == [4 * (n - sizes[0]) for n in sizes]  # 4 bytes per float feature
