"""The aggregator: fan one request out to the K students' devices, concatenate, apply the head.

Each request goes to every student at once over asyncio gRPC (`grpc.aio`): to its device, one
`DeviceClient` each (`nonn.runtime.device_client`: stream or unary transport, retries, checked
replies, the device's health), or to its replicas (`nonn.runtime.replicas`: the healthiest one,
hedged when slow), under one shared deadline (`nonn.runtime.retry`). The pooled feature vectors
are concatenated in group order (student 0 first) and the head runs locally in ONNX Runtime.
Under load, queued requests can share device calls (`nonn.runtime.coalescing`).

Degraded mode (the default): a student whose devices are down, too slow or answer badly
contributes zeros, which is what student-dropout training prepares the head for, and the result
(`nonn.runtime.aggregate_result`) says which students contributed and what each device cost.
Strict mode raises AggregationError instead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Mapping, Sequence

import grpc
import numpy as np

from nonn.runtime.aggregate_result import AggregateResult
from nonn.runtime.aioloop import BlockingFacade
from nonn.runtime.arrays import numpy_dtype
from nonn.runtime.backends import DEFAULT_MAX_BATCH
from nonn.runtime.checks import at_least
from nonn.runtime.codec import TensorError, bytes_per_item, check_shape
from nonn.runtime.coalescing import Coalescer
from nonn.runtime.device_client import TRANSPORTS, DeviceClient, DeviceOutcome
from nonn.runtime.ensemble import EnsembleSpec, StudentRoute, parse_endpoints
from nonn.runtime.health import DeviceHealth, HealthEvent
from nonn.runtime.onnx_model import OnnxModel
from nonn.runtime.replicas import ReplicaSet
from nonn.runtime.retry import Backoff, Deadline
from nonn.runtime.tls import ClientTLS

__all__ = [
    "TRANSPORTS",
    "AggregationError",
    "DeviceMismatchError",
    "AggregateResult",
    "Aggregator",
    # Defined elsewhere, importable from here as before:
    "StudentRoute",
    "EnsembleSpec",
    "parse_endpoints",
]

log = logging.getLogger(__name__)

_MESSAGE_SLACK = 1 << 20
_FALLBACK_MESSAGE_BYTES = 64 << 20  # when the input has dynamic non-batch dimensions


class AggregationError(RuntimeError):
    """Too few devices answered (any missing one in strict mode); names each device's problem."""


class DeviceMismatchError(ValueError):
    """A device serves another model than the bundle names (name, inputs/outputs or sha256)."""


class Aggregator(BlockingFacade):
    """Serve the ensemble by fanning requests out to K devices and applying the head locally.

    `bundle`: a Bundle, a bundle directory, or an EnsembleSpec. `endpoints`: `replicas` "host:port"
    per student in student order (list or comma string: student 0's replicas first), or
    {student name: endpoint or list of endpoints}. `deadline_s` bounds each device's exchange
    (all retries included), `retries` is the number of extra attempts after UNAVAILABLE. A device
    that fails `failures_to_down` calls in a row (or cannot be reached at all) is skipped until a
    health check finds it serving again (`nonn.runtime.health`). With replicas, each request for a
    student goes to its healthiest device and, with `hedge`, also to a second one when the first
    is slower than usual (`nonn.runtime.replicas`). `strict` turns a missing student into
    AggregationError (at once while all its devices are down); otherwise fewer than
    `min_contributing` students is the only failure. `coalesce` > 1 merges
    requests that queue up behind `pipeline` in-flight fan-outs into one call per device (up to
    `coalesce` images): fewer, larger calls under load, no added wait when idle. `transport`:
    "auto" streams to each device that offers ModelStreamInfer and calls the others with
    ModelInfer; "stream" or "unary" forces one (a device that cannot stream is then missing).

    Async use: ``async with Aggregator(...) as agg: result = await agg.infer(batch)``.
    Sync use: ``with Aggregator(...) as agg: result = agg.infer_sync(batch)`` (a private event
    loop thread carries the gRPC channels).
    """

    _thread_name = "nonn-aggregator"

    def __init__(
        self,
        bundle: Any,
        endpoints: str | Sequence[str] | Mapping[str, str],
        deadline_s: float = 1.0,
        retries: int = 2,
        strict: bool = False,
        tls: ClientTLS | None = None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        head_threads: int = 1,
        backoff_s: float = 0.02,
        min_contributing: int = 1,
        coalesce: int = 1,
        pipeline: int = 2,
        transport: str = "auto",
        replicas: int = 1,
        hedge: bool = True,
        failures_to_down: int = 3,
    ) -> None:
        self.spec = bundle if isinstance(bundle, EnsembleSpec) else EnsembleSpec.from_bundle(bundle)
        if not self.spec.students:
            raise ValueError("the ensemble has no students")
        self.routes = list(self.spec.students)
        self.replicas = int(replicas)
        self.endpoints = parse_endpoints(endpoints, [r.name for r in self.routes], self.replicas)
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be positive, got {deadline_s}")
        at_least(0, retries=retries)
        at_least(1, max_batch=max_batch, replicas=replicas, failures_to_down=failures_to_down)
        if not 0 <= min_contributing <= len(self.routes):
            raise ValueError(f"min_contributing must be in 0..{len(self.routes)}, got {min_contributing}")
        if not 1 <= coalesce <= max_batch:
            raise ValueError(f"coalesce must be in 1..max_batch ({max_batch}), got {coalesce}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.deadline_s = float(deadline_s)
        self.retries = int(retries)
        self.strict = bool(strict)
        self.tls = tls
        self.max_batch = int(max_batch)
        self.backoff = Backoff(float(backoff_s))
        self.min_contributing = int(min_contributing)
        self.coalesce = int(coalesce)
        self.transport = transport
        self.hedge = bool(hedge)
        self.failures_to_down = int(failures_to_down)
        self._coalescer = Coalescer(self._fan_out, self.coalesce, pipeline) if self.coalesce > 1 else None

        first = self.routes[0].input
        for route in self.routes[1:]:
            if route.input.shape != first.shape or route.input.datatype != first.datatype:
                raise ValueError(
                    f"students disagree on the input: {self.routes[0].name} takes {first}, {route.name} takes {route.input}"
                )
        for route in self.routes:
            if len(route.output.shape) != 2 or route.output.shape[1] < 1:
                raise ValueError(
                    f"student {route.name}: output shape {list(route.output.shape)} is not (batch, fixed number of features)"
                )
        self.input_spec = first
        self.head = OnnxModel(self.spec.head_path, threads=head_threads, expected_sha256=self.spec.head_sha256)
        if len(self.head.inputs) != 1 or len(self.head.outputs) != 1:
            raise ValueError(f"{self.spec.head_path}: the head must have one input and one output")
        self.head_input = self.head.inputs[0]
        self.head_output = self.head.outputs[0]
        total = sum(route.feature_size for route in self.routes)
        if self.head_input.shape[-1] not in (-1, total):
            raise ValueError(
                f"{self.spec.head_path}: head takes {self.head_input.shape[-1]} features, "
                f"but the students produce {total} in all"
            )
        self.feature_total = total
        self.class_names = list(self.spec.class_names)

        item = bytes_per_item(first)
        self.max_message_bytes = item * self.max_batch + _MESSAGE_SLACK if item else _FALLBACK_MESSAGE_BYTES
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.devices: list[DeviceClient] = []
        self.students: list[ReplicaSet] = []
        # Each device's changes of state (down, half-open, healthy), in order, for reports.
        self.health_events: list[HealthEvent] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count()

    # -- connection life cycle ---------------------------------------------------------------
    def _channel(self, target: str) -> grpc.aio.Channel:
        options = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # Notice a restarted device quickly instead of waiting out gRPC's default backoff.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 500),
            ("grpc.enable_retries", 0),
        ]
        if self.tls is not None:
            return grpc.aio.secure_channel(target, self.tls.credentials(), options + self.tls.channel_options())
        return grpc.aio.insecure_channel(target, options)

    async def start(self) -> None:
        """Open one channel per distinct endpoint on the running loop (idempotent)."""
        loop = asyncio.get_running_loop()
        if self._loop is not None:
            if self._loop is not loop:
                raise RuntimeError("this Aggregator's channels belong to another event loop")
            return
        self._loop = loop
        for endpoint in dict.fromkeys(self.endpoints):
            self._channels[endpoint] = self._channel(endpoint)
        self.devices = []
        for d, endpoint in enumerate(self.endpoints):
            route = self.routes[d // self.replicas]
            health = DeviceHealth(f"{route.name} at {endpoint}", self.failures_to_down, on_event=self.health_events.append)
            self.devices.append(DeviceClient(route, endpoint, self._channels[endpoint], transport=self.transport,
                                             retries=self.retries, backoff=self.backoff, health=health))  # fmt: skip
        R = self.replicas
        self.students = [ReplicaSet(self.devices[k * R : (k + 1) * R], self.hedge) for k in range(len(self.routes))]
        for device in self.devices:
            device.watch_health()

    async def close(self) -> None:
        if self._coalescer is not None:
            self._coalescer.close()
        for student in self.students:
            await student.close()
        for device in self.devices:
            await device.close()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._loop = None

    def _loop_in_use(self) -> bool:
        return self._loop is not None

    async def __aenter__(self) -> "Aggregator":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def transports(self) -> list[str]:
        """How each device is called: "stream" (ModelStreamInfer) or "unary" (ModelInfer)."""
        if not self.devices:
            return ["unary" if self.transport == "unary" else "stream"] * len(self.endpoints)
        return ["stream" if device.streams else "unary" for device in self.devices]

    @property
    def unmatched_replies(self) -> list[int]:
        """Per device: stream replies dropped because their request was no longer waiting."""
        return [device.unmatched_replies for device in self.devices] or [0] * len(self.endpoints)

    async def check_devices(self, timeout_s: float | None = None) -> list[str]:
        """Ask every device what it serves; list every device that is unreachable or serves
        another model than the bundle names (name, inputs/outputs, sha256 where reported)."""
        checks = await self._verifications(timeout_s)
        return [c.message for c in checks if c.status in ("mismatch", "unreachable")]

    async def verify_devices(self, timeout_s: float | None = None) -> list[str]:
        """Confirm every device serves the student the bundle names; DeviceMismatchError naming
        each one that does not. Returns warnings: devices that could not be reached (checked
        again when they rejoin) or that do not report their model's sha256."""
        checks = await self._verifications(timeout_s)
        mismatches = [c.message for c in checks if c.status == "mismatch"]
        if mismatches:
            raise DeviceMismatchError("; ".join(mismatches))
        return [c.message for c in checks if c.status in ("unreachable", "unconfirmed")]

    async def _verifications(self, timeout_s: float | None) -> list[Any]:
        await self.start()
        timeout_s = self.deadline_s if timeout_s is None else timeout_s
        return list(await asyncio.gather(*(device.verify(timeout_s) for device in self.devices)))

    def health(self) -> list[dict[str, Any]]:
        """Each device's breaker now: state, since when (monotonic s), why, requests skipped."""
        return [
            {"device": d.name, "state": d.health.state.value, "since": d.health.since, "reason": d.health.reason,
             "skipped": d.health.skipped}
            for d in self.devices
        ]  # fmt: skip

    # -- inference ---------------------------------------------------------------------------
    def _validate(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        dtype = numpy_dtype(self.input_spec.datatype)
        if batch.dtype != dtype:
            if batch.dtype.kind not in "fiu" or (batch.dtype.kind == "f" and dtype.kind in "iu"):
                raise ValueError(
                    f"batch has dtype {batch.dtype}; the students take {self.input_spec.datatype} "
                    "(prepare images with the bundle's input contract: Bundle.input_contract.prepare)"
                )
            batch = batch.astype(dtype)
        try:
            check_shape(self.input_spec, batch.shape, self.max_batch)
        except TensorError as exc:
            raise ValueError(str(exc)) from None
        return np.ascontiguousarray(batch)

    async def infer(self, batch: np.ndarray) -> AggregateResult:
        """Run one batch (already preprocessed, shape of the students' input) through the ensemble.

        With `coalesce` > 1, requests that arrive while `pipeline` fan-outs are in flight wait
        and go out together as one device call (up to `coalesce` images); each caller still
        gets its own rows, and the bytes of a shared call are split by image count.
        """
        await self.start()
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("this Aggregator's channels belong to another event loop")
        batch = self._validate(batch)
        if self._coalescer is None:
            return await self._fan_out(batch)
        return await self._coalescer.submit(batch)

    def _refuse_if_strict(self) -> None:
        """Strict mode fails at once while every device of some student is down."""
        out = [rs for rs in self.students if not any(c.health.available() for c in rs.clients)]
        if out:
            for client in (c for rs in out for c in rs.clients):
                client.health.skipped += 1
            why = "; ".join(f"{c.name}: {c.health.why_skipped()}" for rs in out for c in rs.clients)
            raise AggregationError(f"strict mode: {why}")

    async def _fan_out(self, batch: np.ndarray) -> AggregateResult:
        """Ask every student for `batch` at once (one device each, or its replicas), then the head."""
        if self.strict:
            self._refuse_if_strict()
        started = time.perf_counter()
        raw = batch.tobytes()
        request_id = str(next(self._ids))
        loop = asyncio.get_running_loop()
        deadline = Deadline(loop, self.deadline_s)
        if self.replicas == 1:
            calls = [loop.create_task(device.call(batch.shape, raw, request_id, deadline)) for device in self.devices]
            deadline.guard(calls)
            try:
                outcomes: list[DeviceOutcome] = list(await asyncio.gather(*calls))
            finally:
                deadline.disarm()
            answered_by = [d if o.features is not None else None for d, o in enumerate(outcomes)]
        else:
            deadline.guard([])  # each student's replica calls register themselves
            try:
                asked = await asyncio.gather(*(rs.ask(batch.shape, raw, request_id, deadline) for rs in self.students))
            finally:
                deadline.disarm()
            R = self.replicas
            answered_by = [None if winner is None else k * R + winner for k, (winner, _) in enumerate(asked)]
            outcomes = [o for _, replica_outcomes in asked for o in replica_outcomes]
        contributed = [d is not None for d in answered_by]
        if not all(contributed):
            R = self.replicas
            missing = [
                "; ".join(f"{self.devices[d].name}: {outcomes[d].error}" for d in range(k * R, (k + 1) * R))
                for k, ok in enumerate(contributed) if not ok
            ]  # fmt: skip
            if self.strict or sum(contributed) < self.min_contributing:
                why = "strict mode" if self.strict else f"fewer than {self.min_contributing} student(s) answered"
                raise AggregationError(f"{why}: " + "; ".join(missing))
            log.debug("degraded answer: %s", "; ".join(missing))
        dtype = numpy_dtype(self.head_input.datatype)
        parts = [
            outcomes[d].features.astype(dtype, copy=False) if d is not None else np.zeros((batch.shape[0], r.feature_size), dtype)
            for r, d in zip(self.routes, answered_by)
        ]
        head_in = np.concatenate(parts, axis=1)
        logits = self.head.run({self.head_input.name: head_in})[self.head_output.name]
        return AggregateResult(
            logits=logits,
            contributed=contributed,
            bytes_sent=[o.bytes_sent for o in outcomes],
            bytes_received=[o.bytes_received for o in outcomes],
            latency_s=time.perf_counter() - started,
            device_latency_s=[o.latency_s for o in outcomes],
            attempts=[o.attempts for o in outcomes],
            errors=[o.error for o in outcomes],
            devices=list(self.endpoints),
            answered_by=answered_by,
            skipped=[o.skipped for o in outcomes],
        )

    # -- blocking use (a private event loop thread carries the channels) ---------------------
    def infer_sync(self, batch: np.ndarray) -> AggregateResult:
        """Blocking infer() for synchronous callers."""
        return self.blocking(self.infer(batch))

    def check_devices_sync(self, timeout_s: float | None = None) -> list[str]:
        return self.blocking(self.check_devices(timeout_s))

    def verify_devices_sync(self, timeout_s: float | None = None) -> list[str]:
        return self.blocking(self.verify_devices(timeout_s))
