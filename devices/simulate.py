"""Simulate a NoNN fleet on this machine: K device processes, emulated links, faults, a stream.

`simulate(bundle_dir, profiles, images, labels, ...)` starts one `nonn serve` process per
student (`LocalFleet`), each behind its profile's link (`netem`), streams the images through
the runtime's Aggregator with `concurrency` requests in flight, kills and restarts devices as
the `FaultSpec`s say, and returns a `SimulationResult` holding every request's outcome. Every
process it started is stopped before it returns, also when the run fails or is interrupted.
`nonn.devices.report` turns the result into JSON, a terminal table and an HTML report.

Pure numpy + the runtime: no torch. Images are raw: uint8 pixels, or floats in [0, 1], shaped
(N, C, H, W); the bundle's preprocessing (mean, std) is applied here, as a client of the fleet
would (`nonn.runtime.preprocessing.preprocess_images`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from nonn.devices.fleet import LocalFleet
from nonn.devices.netem import NETWORK_MODES, LinkModel, choose_network

__all__ = ["FaultSpec", "SimulationConfig", "SimulationResult", "simulate", "parse_faults"]

log = logging.getLogger(__name__)

_FAULT_RE = re.compile(r"^\s*(\d+)\s*@\s*(\d+(?:\.\d*)?|\.\d+)\s*(?::\s*(\d+(?:\.\d*)?|\.\d+)\s*)?$")


@dataclass(frozen=True)
class FaultSpec:
    """Kill device `device` (index from 0) `at_s` seconds into the stream; restart it
    `restart_after_s` seconds later (None: it stays down).

    Text form (`--kill`): ``DEVICE@SECONDS`` or ``DEVICE@SECONDS:RESTART_AFTER``, e.g. ``1@2``
    (device 1 dies at 2 s) or ``1@2:5`` (dies at 2 s, restarted 5 s later, at 7 s).
    """

    device: int
    at_s: float
    restart_after_s: float | None = None

    @classmethod
    def parse(cls, text: str) -> "FaultSpec":
        m = _FAULT_RE.match(text)
        if not m:
            raise ValueError(
                f"--kill {text!r}: expected DEVICE@SECONDS or DEVICE@SECONDS:RESTART_AFTER "
                "(device index from 0, times in seconds), e.g. 1@2 or 1@2:5"
            )
        restart = float(m.group(3)) if m.group(3) is not None else None
        return cls(device=int(m.group(1)), at_s=float(m.group(2)), restart_after_s=restart)

    @property
    def end_s(self) -> float:
        """When the fault is over (restart time), or when it starts if there is no restart."""
        return self.at_s + (self.restart_after_s or 0.0)

    def __str__(self) -> str:
        base = f"{self.device}@{self.at_s:g}"
        return base if self.restart_after_s is None else f"{base}:{self.restart_after_s:g}"


def parse_faults(texts: Sequence[str], num_devices: int) -> list[FaultSpec]:
    """Parse `--kill` values and check each device index is in range."""
    faults = [FaultSpec.parse(t) for t in texts]
    for f in faults:
        if not 0 <= f.device < num_devices:
            raise ValueError(f"--kill {f}: device {f.device} does not exist; devices are 0..{num_devices - 1}")
    return faults


@dataclass
class SimulationConfig:
    """How to run the stream. `requests` 0 means one pass over all images.

    The stream sends at least `requests` requests and lasts at least `min_duration_s`; with
    faults it also runs until every fault has played out (the device killed and, when it is
    restarted, serving again) plus `recovery_s`, cycling over the images as needed.
    """

    requests: int = 1000
    concurrency: int = 4
    batch_size: int = 1
    rate: float | None = None  # requests per second (open loop); None: closed loop at `concurrency`
    min_duration_s: float = 0.0  # keep streaming (cycling the images) at least this long
    recovery_s: float = 1.0  # with faults: keep streaming this long after the last fault event
    deadline_s: float = 2.0
    retries: int = 2
    strict: bool = False
    transport: str = "auto"  # auto | stream | unary: how the aggregator calls the devices
    network: str = "auto"  # auto | netns | delay | none
    faults: list[FaultSpec] = field(default_factory=list)
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
        for f in self.faults:
            if not 0 <= f.device < num_devices:
                raise ValueError(f"fault {f}: device {f.device} does not exist; devices are 0..{num_devices - 1}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["faults"] = [str(f) for f in self.faults]
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
    contributed: np.ndarray  # (R, K) bool, which devices' features reached the head
    bytes_sent: np.ndarray  # (R, K) request bytes per device
    bytes_received: np.ndarray  # (R, K) response bytes per device
    image_index: np.ndarray  # (R, B) which images each request carried (cycling over the N images)
    predictions: np.ndarray  # (R, B) predicted class, -1 for lost requests
    labels: np.ndarray  # (N,) ground truth of the images
    teacher_predictions: np.ndarray | None = None  # (N,) teacher's classes for the images
    errors: list[str] = field(default_factory=list)
    bundle_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return int(self.latency_s.shape[0])

    @property
    def num_devices(self) -> int:
        return len(self.student_names)


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

    `profiles` holds one DeviceProfile per student (student k on profiles[k]). `labels` are the
    images' true classes; `teacher_predictions` (classes or logits per image) adds agreement
    with the teacher to the report.
    """
    from nonn.runtime.preprocessing import preprocess_images
    from nonn.runtime.bundle import Bundle

    config = config or SimulationConfig()
    bundle = Bundle.load(bundle_dir)
    profiles = list(profiles)
    if len(profiles) != bundle.num_students:
        raise ValueError(
            f"{len(profiles)} device profiles for a bundle with {bundle.num_students} students; "
            "give one device per student (e.g. --devices rpi3b+:4)"
        )
    pre = bundle.preprocessing
    x = preprocess_images(images, pre.mean, pre.std, pre.input_shape, pre.pixel_scale)
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
    config.validate(bundle.num_students, x.shape[0])

    links = [LinkModel.from_profile(p) for p in profiles]
    network = choose_network(config.network, links, seed=config.seed)
    fleet = LocalFleet(
        bundle.root,
        profiles,
        network,
        students=[s.name for s in bundle.students],
        startup_timeout_s=config.startup_timeout_s,
        memory_interval_s=config.memory_interval_s,
        log_dir=log_dir,
    )
    t_start = time.monotonic()
    with fleet:
        startup_s = time.monotonic() - t_start
        log.info("fleet of %d devices ready in %.1f s (network: %s)", len(profiles), startup_s, network.mode)
        stream = _Stream(bundle, fleet, x, config, on_progress)
        asyncio.run(stream.run())
        devices = fleet.summary()
    return SimulationResult(
        bundle_dir=str(bundle.root),
        config=config,
        profiles=profiles,
        student_names=[s.name for s in bundle.students],
        class_names=list(bundle.class_names),
        network=network.describe(),
        devices=devices,
        events=stream.events,
        wall_s=stream.wall_s,
        startup_s=startup_s,
        request_start_s=np.asarray(stream.start_s, dtype=np.float64),
        latency_s=np.asarray(stream.latency_s, dtype=np.float64),
        answered=np.asarray(stream.answered, dtype=bool),
        contributed=np.asarray(stream.contributed, dtype=bool).reshape(-1, bundle.num_students),
        bytes_sent=np.asarray(stream.bytes_sent, dtype=np.int64).reshape(-1, bundle.num_students),
        bytes_received=np.asarray(stream.bytes_received, dtype=np.int64).reshape(-1, bundle.num_students),
        image_index=np.asarray(stream.image_index, dtype=np.int64).reshape(-1, config.batch_size),
        predictions=np.asarray(stream.predictions, dtype=np.int64).reshape(-1, config.batch_size),
        labels=labels,
        teacher_predictions=teacher,
        errors=stream.errors,
        bundle_summary=_bundle_summary(bundle),
    )


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
        "input_shape": list(bundle.preprocessing.input_shape),
        "num_classes": bundle.num_classes,
    }


class _Stream:
    """The request stream: workers sending requests through the aggregator, and the fault schedule."""

    def __init__(self, bundle: Any, fleet: LocalFleet, x: np.ndarray, config: SimulationConfig, on_progress: Callable[[int], None] | None) -> None:
        self.bundle = bundle
        self.fleet = fleet
        self.x = x
        self.config = config
        self.on_progress = on_progress
        n_images = x.shape[0]
        per_pass = math.ceil(n_images / config.batch_size)
        self.target = config.requests if config.requests > 0 else per_pass
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.start_s: list[float] = []
        self.latency_s: list[float] = []
        self.answered: list[bool] = []
        self.contributed: list[list[bool]] = []
        self.bytes_sent: list[list[int]] = []
        self.bytes_received: list[list[int]] = []
        self.image_index: list[list[int]] = []
        self.predictions: list[list[int]] = []
        self.wall_s = 0.0
        self._next = 0
        self._t0 = 0.0
        self._faults_pending = len(config.faults)
        self._last_fault_event = 0.0

    def _batch_indices(self, request: int) -> np.ndarray:
        b = self.config.batch_size
        n = self.x.shape[0]
        return (np.arange(request * b, request * b + b)) % n

    def _more(self, loop: asyncio.AbstractEventLoop) -> int | None:
        """The next request number, or None when the stream is complete."""
        i = self._next
        now = loop.time() - self._t0
        done = i >= self.target and now >= self.config.min_duration_s
        if done and self.config.faults:
            done = self._faults_pending == 0 and now >= self._last_fault_event + self.config.recovery_s
        if done:
            return None
        self._next += 1
        return i

    async def run(self) -> None:
        from nonn.runtime.aggregator import Aggregator

        loop = asyncio.get_running_loop()
        cfg = self.config
        aggregator = Aggregator(
            self.bundle,
            self.fleet.endpoints,
            deadline_s=cfg.deadline_s,
            retries=cfg.retries,
            strict=cfg.strict,
            transport=cfg.transport,
        )
        progress = _progress_bar(self.target, cfg.progress)
        try:
            await aggregator.start()
            self._t0 = loop.time()
            self.fleet_offset = self.fleet.elapsed()
            fault_tasks = [asyncio.ensure_future(self._fault(f)) for f in cfg.faults]
            workers = [asyncio.ensure_future(self._worker(aggregator, progress)) for _ in range(cfg.concurrency)]
            await asyncio.gather(*workers)
            self.wall_s = loop.time() - self._t0
            for task in fault_tasks:
                if not task.done():
                    task.cancel()
            await asyncio.gather(*fault_tasks, return_exceptions=True)
        finally:
            progress.close()
            await aggregator.close()

    async def _worker(self, aggregator: Any, progress: Any) -> None:
        loop = asyncio.get_running_loop()
        k = self.bundle.num_students
        while (i := self._more(loop)) is not None:
            if self.config.rate is not None:
                due = self._t0 + i / self.config.rate
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
            idx = self._batch_indices(i)
            sent_at = loop.time()
            try:
                result = await aggregator.infer(self.x[idx])
            except Exception as exc:  # a lost request: recorded, never fatal to the run
                latency = float("nan")
                self.errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                answered, contributed, preds = False, [False] * k, [-1] * len(idx)
                sent, received = [0] * k, [0] * k
            else:
                latency = loop.time() - sent_at
                answered = True
                contributed = [bool(c) for c in result.contributed]
                preds = np.asarray(result.logits).argmax(axis=1).astype(int).tolist()
                sent = _per_device(result, "bytes_sent", k)
                received = _per_device(result, "bytes_received", k)
            self.start_s.append(sent_at - self._t0)
            self.latency_s.append(latency)
            self.answered.append(answered)
            self.contributed.append(contributed)
            self.bytes_sent.append(sent)
            self.bytes_received.append(received)
            self.image_index.append(idx.tolist())
            self.predictions.append(preds)
            progress.update(1)
            if self.on_progress is not None:
                self.on_progress(len(self.latency_s))

    def _event(self, device: int, event: str, **extra: Any) -> None:
        t = asyncio.get_running_loop().time() - self._t0
        self._last_fault_event = max(self._last_fault_event, t)
        self.events.append({"t": round(t, 4), "device": device, "event": event, **extra})
        log.info("t=%.2f s: device %d %s", t, device, event)

    async def _fault(self, fault: FaultSpec) -> None:
        try:
            await self._play_fault(fault)
        finally:
            self._faults_pending -= 1

    async def _play_fault(self, fault: FaultSpec) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, self._t0 + fault.at_s - loop.time()))
        # Killing is quick (SIGKILL + reap); restarting waits for health off the event loop.
        self.fleet.kill(fault.device)
        self._event(fault.device, "killed", fault=str(fault))
        if fault.restart_after_s is None:
            return
        await asyncio.sleep(fault.restart_after_s)
        self.fleet.spawn(fault.device)
        self._event(fault.device, "restarted", fault=str(fault))
        deadline = loop.time() + self.config.startup_timeout_s
        while loop.time() < deadline:
            if await loop.run_in_executor(None, self.fleet.is_serving, fault.device, 0.5):
                self._event(fault.device, "serving")
                return
            await asyncio.sleep(0.05)
        self._event(fault.device, "restart-timeout")


def _per_device(result: Any, name: str, k: int) -> list[int]:
    values = getattr(result, name, None)
    if values is None:
        return [0] * k
    return [int(v) for v in values]


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="simulate", unit="req", disable=not enabled, dynamic_ncols=True, leave=False)
