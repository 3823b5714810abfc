"""`simulate` with replicated students, slowed devices, and the all-up run side by side."""

from __future__ import annotations

import pytest

from fleet_testing import ensemble_predictions, tiny_images, tiny_profile
from nonn.devices.report import build_report, format_table
from nonn.devices.simulate import FaultSpec, SimulationConfig, SlowSpec, simulate

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

FEATURE_SIZES = (3, 2)


@pytest.fixture(scope="module")
def data(bundle):
    x = tiny_images(30)
    return x, ensemble_predictions(bundle, x)


def test_one_device_of_each_pair_killed_loses_no_answer_and_no_accuracy(bundle, data):
    x, y = data
    result = simulate(
        bundle.root, [tiny_profile()] * 4, x, y,
        config=SimulationConfig(requests=40, concurrency=2, rate=40.0, replicas=2, network="none", deadline_s=1.0,
                                faults=[FaultSpec(0, 0.3), FaultSpec(3, 0.3)], recovery_s=0.5, until_faults_end=True,
                                progress=False),
    )  # fmt: skip
    report = build_report(result)
    assert (report["lost"], report["degraded"], report["accuracy"]) == (0, 0, 1.0)
    assert report["replicas"] == 2 and len(report["devices"]) == 4
    after = result.request_start_s > 0.3 + 0.5
    assert after.sum() > 0 and (result.answered_by[after] == [1, 2]).all()  # the live device of each pair
    # A killed device is taken out once a request finds it dead (a spare never asked goes unnoticed).
    down = {e["index"] for e in result.health_events if e["state"] == "down"}
    assert down and down <= {0, 3}
    assert all(report["devices"][d]["skipped"] > 0 for d in down)
    assert "device health" in format_table(report)


def test_a_slowed_replica_with_the_all_up_run_side_by_side(bundle, data):
    x, y = data
    result = simulate(
        bundle.root, [tiny_profile()] * 4, x, y,
        config=SimulationConfig(requests=30, concurrency=2, replicas=2, network="none", deadline_s=2.0,
                                slowdowns=[SlowSpec(0, 0.0, 5.0)], compare_all_up=True, progress=False),
    )  # fmt: skip
    report = build_report(result)
    assert (report["lost"], report["degraded"], report["accuracy"]) == (0, 0, 1.0)
    assert [(e["device"], e["event"]) for e in result.events] == [(0, "slowed")]
    comparison = report["comparison"]
    assert comparison["all_up"]["requests"] == comparison["with_faults"]["requests"] == 30
    assert comparison["all_up"]["degraded"] == comparison["with_faults"]["degraded"] == 0
    assert set(comparison["ratio"]) == {"p50", "p99", "throughput"}
    assert result.baseline is not None and not result.baseline.config.slowdowns
    assert "all devices up vs with the faults" in format_table(report)
