"""The simulation report: figures computed from a known run, JSON schema, terminal table, HTML."""

from __future__ import annotations

import base64
import html
import html.parser
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from fleet_testing import make_bundle
from nonn.devices.profiles import load_profiles
from nonn.devices.report import REQUIRED_KEYS, build_report, format_table, write_html, write_json
from nonn.devices.simulate import FaultSpec, SimulationConfig, SimulationResult

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> SimulationResult:
    """A hand-made run: 10 requests over 5 images on 2 devices; device 1 down for requests 4-6,
    request 9 lost, the teacher disagrees on image 0."""
    root = tmp_path_factory.mktemp("b") / "bundle<&>"
    make_bundle(root, feature_sizes=(3, 2))
    R = 10
    labels = np.array([0, 1, 2, 1, 0])
    image_index = (np.arange(R) % 5)[:, None]
    predictions = labels[image_index].copy()
    predictions[4, 0] = (labels[4] + 1) % 3  # two of the three degraded answers are wrong
    predictions[5, 0] = (labels[0] + 1) % 3
    predictions[9, 0] = -1  # lost
    contributed = np.ones((R, 2), bool)
    contributed[4:7, 1] = False
    contributed[9] = False
    answered = np.ones(R, bool)
    answered[9] = False
    latency = np.arange(1, R + 1, dtype=float) / 1000.0
    latency[9] = np.nan
    sent = np.tile([100, 120], (R, 1))
    received = np.tile([40, 60], (R, 1))
    received[4:7, 1] = 0
    sent[9] = received[9] = 0
    teacher = labels.copy()
    teacher[0] = 2
    profiles = [load_profiles()["rpi3b+"]] * 2
    devices = [
        {"index": k, "student": f"student_{k}", "profile": "rpi3b+", "threads": 4, "endpoint": f"127.0.0.1:{9000 + k}",
         "server_address": f"127.0.0.1:{8000 + k}", "starts": 1 + k, "peak_rss_mb": [80.0, 900.0][k],
         "memory_limit_mb": 824.0, "over_memory": k == 1, "events": [],
         "link_stats": {"bytes_up": 3000, "bytes_down": 1000, "lost_segments": 0, "connections": 1}}
        for k in range(2)
    ]
    events = [
        {"t": 0.35, "device": 1, "event": "killed", "fault": "1@0.35:0.2"},
        {"t": 0.55, "device": 1, "event": "restarted", "fault": "1@0.35:0.2"},
        {"t": 0.65, "device": 1, "event": "serving"},
    ]
    return SimulationResult(
        bundle_dir=str(root),
        config=SimulationConfig(requests=R, concurrency=2, faults=[FaultSpec(1, 0.35, 0.2)], network="delay"),
        profiles=profiles,
        student_names=["student_0", "student_1"],
        class_names=["a", "b", "c"],
        network={"mode": "client-delay", "reason": "test", "links": [{"bandwidth_mbps": 300.0, "latency_ms": 0.5, "loss": 0.0}] * 2,
                 "model": "delay model text"},
        devices=devices,
        events=events,
        wall_s=1.0,
        startup_s=0.5,
        request_start_s=np.arange(R) / 10.0,
        latency_s=latency,
        answered=answered,
        contributed=contributed,
        bytes_sent=sent,
        bytes_received=received,
        image_index=image_index,
        predictions=predictions,
        labels=labels,
        teacher_predictions=teacher,
        errors=["request 9: AggregationError: no device answered"],
    )


def test_report_figures(result):
    r = build_report(result, dataset="tiny")
    assert (r["requests"], r["answered"], r["lost"], r["degraded"]) == (10, 9, 1, 3)
    assert r["accuracy"] == pytest.approx(7 / 9, abs=1e-6)
    assert r["accuracy_all_devices"] == 1.0
    assert r["accuracy_degraded"] == pytest.approx(1 / 3, abs=1e-6)
    # Requests 4, 5, 6 were sent while device 1 was down (0.35 s to 0.65 s).
    assert r["accuracy_during_outage"] == pytest.approx(1 / 3, abs=1e-6)
    outage = r["timeline"]["outages"][0]
    assert (outage["device"], outage["start_s"], outage["end_s"], outage["answering_again_s"]) == (1, 0.35, 0.65, 0.7)
    # The teacher (class 2 for image 0, sent in requests 0 and 5) disagrees with the fleet there
    # and on request 4, where the fleet is wrong.
    assert r["teacher_agreement"] == pytest.approx(6 / 9, abs=1e-6)
    assert r["teacher_accuracy"] == pytest.approx(7 / 9, abs=1e-6)
    assert r["latency_ms"]["p50"] == pytest.approx(5.0)
    assert r["latency_ms"]["p99"] == pytest.approx(np.percentile(np.arange(1, 10), 99))
    assert sum(r["latency_ms"]["histogram"]["counts"]) == 9
    assert r["throughput"]["requests_per_s"] == pytest.approx(9.0)
    # Requests 4, 5, 6 (5, 6, 7 ms) are the degraded ones: the histogram colours them apart.
    assert sum(r["latency_ms"]["histogram"]["degraded_counts"]) == 3
    by = r["latency_ms"]["by_answer"]
    assert (by["degraded"]["answers"], by["degraded"]["p50"]) == (3, pytest.approx(6.0))
    assert (by["full"]["answers"], by["full"]["p50"]) == (6, pytest.approx(3.5))
    # Bytes per inference (nonn.runtime.traffic): totals of the answered requests per image answered.
    d0, d1 = r["devices"]
    assert d0["bytes_per_inference"] == {"request": 100.0, "features": 40.0, "wire": pytest.approx(4000 / 9, abs=0.05), "between_devices": 0.0}
    assert d1["bytes_per_inference"]["request"] == 120.0
    assert d1["bytes_per_inference"]["features"] == pytest.approx(6 * 60 / 9, abs=0.05)
    assert d1["contributed"] == pytest.approx(6 / 9, abs=1e-6)
    total = r["bytes_per_inference"]
    assert (total["request"], total["features"]) == (220.0, pytest.approx(80.0)) and total["wire"] == pytest.approx(8000 / 9, abs=0.1)
    assert d1["over_memory"] and any("900.0 MB exceeds its 824 MB" in w for w in r["warnings"])
    assert r["errors"] == ["request 9: AggregationError: no device answered"]


def test_report_json_schema(result, tmp_path):
    path = write_json(build_report(result), tmp_path / "sim.json")
    r = json.loads(path.read_text())
    for key in REQUIRED_KEYS:
        assert key in r, key
    assert r["format"] == "nonn.simulation/1"
    assert isinstance(r["accuracy"], float) and 0 <= r["accuracy"] <= 1
    for key in ("requests", "answered", "lost", "degraded"):
        assert isinstance(r[key], int) and r[key] >= 0
    assert r["answered"] + r["lost"] == r["requests"]
    for p in ("p50", "p95", "p99"):
        assert isinstance(r["latency_ms"][p], float)
    assert r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"]
    assert isinstance(r["devices"], list) and len(r["devices"]) == 2
    for d in r["devices"]:
        assert set(d["bytes_per_inference"]) == {"request", "features", "wire", "between_devices"} and isinstance(d["peak_rss_mb"], float)
        assert {"index", "profile", "memory_limit_mb", "over_memory", "starts"} <= set(d)
    assert r["network_emulation"]["mode"] in ("netns", "client-delay", "none")
    assert {"bin_s", "bins", "events", "outages"} <= set(r["timeline"])
    for b in r["timeline"]["bins"]:
        assert {"t0_s", "t1_s", "requests", "answered", "degraded", "accuracy"} <= set(b)
    assert r["faults"] == ["1@0.35:0.2"]
    # The planner's estimate of the same devices: NoNN against the teacher on one device.
    metrics = {row["metric"] for row in r["estimates"]["comparison"]}
    assert {"memory per device", "latency", "energy per node"} <= metrics


def test_terminal_table(result):
    text = format_table(build_report(result))
    assert re.search(r"requests \(answered / lost / degraded\)\s+10 \(9 / 1 / 3\)", text)
    # Bytes carry the labels plan and infer use (nonn.runtime.traffic), the teacher's what its bytes are.
    assert re.search(r"request bytes sent per inference, all devices\s+220 B", text)
    assert re.search(r"features sent back per inference, all devices\s+80 B", text)
    assert "features sent back (B/inference)" in text and "wire bytes (B/inference)" in text
    assert "teacher, one device: on one rpi3b+; its bytes are the image sent to it and the logits it sends back" in text
    assert "accuracy during outage" in text and "33.33%" in text
    assert re.search(r"1 student_1\s+rpi3b\+\s+900\.0\s+824\s+OVER", text)
    assert "teacher, one device" in text and "energy per node (mJ)" in text
    assert "warning: device 1 (rpi3b+)" in text


class _Structure(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[dict[str, str]] = []
        self.external: list[str] = []
        self.headings: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(a)
        if tag in ("script", "link", "iframe") or (a.get("src", "") and not a["src"].startswith("data:")):
            self.external.append(tag)
        self._in_h2 = tag == "h2"

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data.strip())


def test_html_report_is_self_contained_with_three_plots(result, tmp_path):
    path = write_html(build_report(result, dataset="tiny"), tmp_path / "report.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    parser = _Structure()
    parser.feed(text)
    parser.close()
    assert parser.external == []  # nothing loaded from elsewhere
    assert len(parser.images) == 3
    for img in parser.images:
        assert img["src"].startswith("data:image/png;base64,") and img["alt"]
        png = base64.b64decode(img["src"].split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert parser.tags.count("table") >= 4  # summary, devices, comparison, links, faults
    assert {"Summary", "Devices", "Plots", "Faults"} <= set(parser.headings)
    assert any(h.startswith("Network emulation: client-delay") for h in parser.headings)
    # User-controlled text is escaped.
    assert "bundle&lt;&amp;&gt;" in text and "bundle<&>" not in text
    assert 'class="warn"' in text and "OVER LIMIT" in text


_BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=90, check=True)  # fmt: skip


@pytest.mark.skipif(_BROWSER is None, reason="no chromium or chromium-browser on PATH to render the report headless")
def test_html_report_renders_in_headless_chromium(result, tmp_path):
    from matplotlib import image as mpimg

    from nonn.devices.report_plots import FULL_COLOUR

    page = write_html(build_report(result), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    _chromium("--window-size=1400,3000", f"--screenshot={shot}", page.as_uri())
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (3000, 1400)
    # Not a blank page: text, tables and plots give many distinct colours and dark pixels.
    gray = pixels.mean(axis=2)
    assert (gray < 0.3).mean() > 0.005 and len(np.unique(np.round(gray, 2))) > 30
    # The plots span the page: the full answers' bars and the accuracy line (FULL_COLOUR) reach
    # across most of the 1400 px window, not a 640 px figure beside another.
    target = np.array([int(FULL_COLOUR[i : i + 2], 16) for i in (1, 3, 5)]) / 255
    columns = np.flatnonzero((np.abs(pixels - target).max(axis=2) < 0.03).any(axis=0))
    assert columns.size and columns.max() - columns.min() > 0.6 * 1400

    # The laid-out page, measured by the browser: each plot as wide as the text column, and that
    # column most of the window.
    probe = tmp_path / "probe.html"
    script = (
        "<script>addEventListener('load',()=>{const w=[...document.images].map(i=>Math.round(i.getBoundingClientRect().width));"
        "document.body.setAttribute('data-widths',JSON.stringify({images:w,column:document.querySelector('h2').getBoundingClientRect().width}));});</script>"
    )
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    dom = _chromium("--window-size=1400,3000", "--virtual-time-budget=2000", "--dump-dom", probe.as_uri()).stdout
    found = re.search(r'data-widths="([^"]+)"', dom)
    assert found, dom[:500]
    widths = json.loads(html.unescape(found[1]))
    assert len(widths["images"]) == 3 and widths["column"] > 0.8 * 1400
    assert all(abs(w - widths["column"]) <= 4 for w in widths["images"]), widths
