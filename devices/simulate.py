"""Simulate a NoNN fleet on this machine: K device processes, emulated links, faults, a stream.

`simulate(bundle_dir, profiles, images, labels, ...)` starts one `nonn serve` process per
device (`LocalFleet`; a student on one device, or on `replicas` devices), each behind its
profile's link (`netem`), streams the images through the runtime's Aggregator with
`concurrency` requests in flight (`nonn.devices.stream`), kills, restarts and slows devices as
the fault specs say (`nonn.devices.faults`), and returns a `SimulationResult` holding every
request's outcome; optionally the same stream with every device up first, for comparison.
Every process it started is stopped before it returns, also when the run fails or is
interrupted. `nonn.devices.report` turns the result into JSON, a terminal table and HTML.

Pure numpy + the runtime: no torch. Images are as stored: uint8 pixels, or floats in [0, 1],
shaped (N, C, H, W); the bundle's input contract turns them into what the students take (raw
uint8 pixels or normalised floats), as a client of the fleet would
(`nonn.runtime.input_contract.InputContract.prepare`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

from nonn.devices.faults import FaultSpec, SlowSpec, parse_faults, parse_slowdowns
from nonn.devices.fleet import LocalFleet
from nonn.devices.stream import RequestStream
from nonn.devices.netem import NETWORK_MODES, LinkModel, choose_network

__all__ = ["SimulationConfig", "SimulationResult", "simulate", "FaultSpec", "SlowSpec", "parse_faults", "parse_slowdowns"]

log = logging.getLogger(__name__)

@dataclass
class SimulationConfig:
    """How to run the stream. `requests` 0 means one pass over all images.

    The stream sends exactly `requests` requests, cycling over the images as needed. Two
    settings make it longer, and are the only ones that do: `min_duration_s` (it keeps sending
    until that many seconds have passed) and `until_faults_end` (it keeps sending until every
    fault has played out: the device killed and, when it is restarted, serving again, plus
    `recovery_s`; a slowdown started). Without them a fault scheduled after the last request
    does not happen, and the report says so.
    """

    requests: int = 1000
    concurrency: int = 4
    batch_size: int = 1
    rate: float | None = None  # requests per second (open loop); None: closed loop at `concurrency`
    min_duration_s: float = 0.0  # keep streaming (cycling the images) at least this long
    until_faults_end: bool = False  # keep streaming until every fault has played out (+ recovery_s)
    recovery_s: float = 1.0  # with faults: keep streaming this long after the last fault event
    deadline_s: float = 2.0
    retries: int = 2
    strict: bool = False
    transport: str = "auto"  # auto | stream | unary: how the aggregator calls the devices
    network: str = "auto"  # auto | netns | delay | none
    faults: list[FaultSpec] = field(default_factory=list)
    slowdowns: list[SlowSpec] = field(default_factory=list)
    replicas: int = 1  # devices per student (each student's replicas in a row)
    hedge: bool = True  # with replicas: ask a second replica when the first is slower than usual
    compare_all_up: bool = False  # first stream with every device up, then with the faults
    startup_timeout_s: float = 60.0
    memory_interval_s: float = 0.1
    seed: int = 0
    progress: bool = True

    def validate(self, num_devices: int, num_images: int) -> None:
        if self.requests < 0:
            raise ValueError(f"requests must be >= 0 (0 = every image once), got {self.requests}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be a positive number of requests per second, got {self.rate}")
        if self.min_duration_s < 0 or self.recovery_s < 0:
            raise ValueError(f"min_duration_s and recovery_s must be >= 0, got {self.min_duration_s}, {self.recovery_s}")
        if self.deadline_s <= 0:
            raise ValueError(f"deadline must be positive, got {self.deadline_s}")
        if self.network not in NETWORK_MODES:
            raise ValueError(f"network {self.network!r} is not one of {', '.join(NETWORK_MODES)}")
        from nonn.runtime.device_client import TRANSPORTS

        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport {self.transport!r} is not one of {', '.join(TRANSPORTS)}")
        if num_images < 1:
            raise ValueError("no images to stream")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        for f in [*self.faults, *self.slowdowns]:
            if not 0 <= f.device < num_devices:
                raise ValueError(f"fault {f}: device {f.device} does not exist; devices are 0..{num_devices - 1}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["faults"] = [str(f) for f in self.faults]
        d["slowdowns"] = [str(f) for f in self.slowdowns]
        return d


@dataclass
class SimulationResult:
    """Everything measured in one run; `nonn.devices.report.build_report` summarises it."""

    bundle_dir: str
    config: SimulationConfig
    profiles: list[Any]
    student_names: list[str]
    class_names: list[str]
    network: dict[str, Any]
    devices: list[dict[str, Any]]  # LocalFleet.summary() at the end of the run
    events: list[dict[str, Any]]  # faults: kill / restart / ready, with times from stream start
    wall_s: float  # stream duration (first request sent to last answer)
    startup_s: float  # fleet start until every device was SERVING
    # One row per request:
    request_start_s: np.ndarray  # (R,) seconds from stream start
    latency_s: np.ndarray  # (R,) NaN for a lost request
    answered: np.ndarray  # (R,) bool
    contributed: np.ndarray  # (R, K) bool, which students' features reached the head
    bytes_sent: np.ndarray  # (R, D) request bytes per device (D = K * replicas)
    bytes_received: np.ndarray  # (R, D) response bytes per device
    image_index: np.ndarray  # (R, B) which images each request carried (cycling over the N images)
    predictions: np.ndarray  # (R, B) predicted class, -1 for lost requests
    labels: np.ndarray  # (N,) ground truth of the images
    teacher_predictions: np.ndarray | None = None  # (N,) teacher's classes for the images
    errors: list[str] = field(default_factory=list)
    bundle_summary: dict[str, Any] = field(default_factory=dict)
    replicas: int = 1
    answered_by: np.ndarray | None = None  # (R, K) the device whose features each student used, -1: none
    skipped: np.ndarray | None = None  # (R, D) bool, devices skipped because they were down
    health_events: list[dict[str, Any]] = field(default_factory=list)  # the aggregator's view: down, half-open, healthy
    hedged: int = 0  # requests also sent to a second replica because the first was slow
    baseline: "SimulationResult | None" = None  # the same stream with every device up (compare_all_up)

    @property
    def num_requests(self) -> int:
        return int(self.latency_s.shape[0])

    @property
    def num_devices(self) -> int:
        return len(self.student_names) * self.replicas

    def device_answered(self, device: int) -> np.ndarray:
        """(R,) bool: requests for which `device`'s features reached the head."""
        if self.answered_by is None:
            return self.contributed[:, device]
        return self.answered_by[:, device // self.replicas] == device


def simulate(
    bundle_dir: str | os.PathLike[str],
    profiles: Sequence[Any],
    images: np.ndarray,
    labels: np.ndarray,
    teacher_predictions: np.ndarray | None = None,
    config: SimulationConfig | None = None,
    *,
    log_dir: str | os.PathLike[str] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> SimulationResult:
    """Run the bundle's students on a local fleet of `profiles` and stream `images` through it.

    `profiles` holds one DeviceProfile per device: student k on profiles[k], or, with
    `config.replicas` R, student k on profiles[k*R] ... profiles[k*R + R-1]. `labels` are the
    images' true classes; `teacher_predictions` (classes or logits per image) adds agreement
    with the teacher to the report. With `config.compare_all_up`, the same stream runs first
    with every device up (after a short warm-up), and `result.baseline` holds that run.
    """
    from nonn.runtime.bundle import Bundle

    config = config or SimulationConfig()
    bundle = Bundle.load(bundle_dir)
    profiles = list(profiles)
    num_devices = bundle.num_students * config.replicas
    if len(profiles) != num_devices:
        each = "one device per student" if config.replicas == 1 else f"{config.replicas} devices per student (--replicas)"
        raise ValueError(
            f"{len(profiles)} device profiles for a bundle with {bundle.num_students} students; "
            f"give {each} (e.g. --fleet rpi3b+:{num_devices})"
        )
    x = bundle.input_contract.prepare(images)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {labels.shape[0]} labels")
    teacher = None
    if teacher_predictions is not None:
        teacher = np.asarray(teacher_predictions)
        if teacher.ndim == 2:
            teacher = teacher.argmax(axis=1)
        teacher = teacher.astype(np.int64).reshape(-1)
        if teacher.shape[0] != x.shape[0]:
            raise ValueError(f"{teacher.shape[0]} teacher predictions for {x.shape[0]} images")
    config.validate(num_devices, x.shape[0])

    links = [LinkModel.from_profile(p) for p in profiles]
    network = choose_network(config.network, links, seed=config.seed)
    fleet = LocalFleet(
        bundle.root,
        profiles,
        network,
        students=[s.name for s in bundle.students for _ in range(config.replicas)],
        startup_timeout_s=config.startup_timeout_s,
        memory_interval_s=config.memory_interval_s,
        log_dir=log_dir,
    )
    t_start = time.monotonic()
    with fleet:
        startup_s = time.monotonic() - t_start
        log.info("fleet of %d devices ready in %.1f s (network: %s)", len(profiles), startup_s, network.mode)
        baseline = None
        if config.compare_all_up:
            all_up = replace(config, faults=[], slowdowns=[], compare_all_up=False)
            warm_up = replace(all_up, requests=min(config.requests or 50, 50), min_duration_s=0.0, until_faults_end=False,
                              progress=False)  # fmt: skip
            asyncio.run(RequestStream(bundle, fleet, x, warm_up, None).run())
            baseline_stream = RequestStream(bundle, fleet, x, all_up, on_progress)
            asyncio.run(baseline_stream.run())
        stream = RequestStream(bundle, fleet, x, config, on_progress)
        asyncio.run(stream.run())
        devices = fleet.summary()
        common = dict(
            bundle_dir=str(bundle.root), profiles=profiles, student_names=[s.name for s in bundle.students],
            class_names=list(bundle.class_names), network=network.describe(), devices=devices, startup_s=startup_s,
            labels=labels, teacher_predictions=teacher, bundle_summary=_bundle_summary(bundle),
        )  # fmt: skip
        if config.compare_all_up:
            baseline = SimulationResult(config=all_up, **common, **baseline_stream.measurements())
    return SimulationResult(config=config, baseline=baseline, **common, **stream.measurements())


def _bundle_summary(bundle: Any) -> dict[str, Any]:
    """The manifest figures the report needs (students, head, teacher), as plain data."""
    teacher = bundle.teacher
    return {
        "students": [
            {"name": s.name, "params": s.params, "flops": s.flops, "feature_size": s.feature_size, "size_bytes": s.size_bytes,
             "input_shape": s.input.shape, "precision": s.precision}
            for s in bundle.students
        ],
        "head": {"params": bundle.head.params, "flops": bundle.head.flops},
        "teacher": None if teacher is None else {"arch": teacher.arch, "params": teacher.params, "flops": teacher.flops},
        "input_shape": list(bundle.input_contract.input_shape),
        "input_datatype": bundle.input_contract.datatype,
        "num_classes": bundle.num_classes,
    }
