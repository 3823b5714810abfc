"""A local fleet: one `nonn serve` process per student on this machine, behind its emulated link.

`LocalFleet` starts every device server as a separate process (each with its profile's thread
count), waits for grpc.health.v1 SERVING, samples each process's resident memory with psutil
while it runs, and stops EVERY process it started: on leaving the `with` block, on an
exception, at interpreter exit (atexit), and, on Linux, when the parent dies (PR_SET_PDEATHSIG).
Devices can be killed and restarted to inject faults.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import psutil

from nonn.devices.netem import LinkModel, NetworkEmulation

__all__ = ["FleetError", "Device", "LocalFleet", "health_status", "live_fleets", "memory_limit_mb"]

log = logging.getLogger(__name__)

MB = 1024.0 * 1024.0


class FleetError(RuntimeError):
    """A device server failed to start, died, or did not become healthy in time.

    `summary` is the one line a command-line user needs (the device's own error, where it gave
    one, and where its log is); the message itself carries the log's tail as well.
    """

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary or message.splitlines()[0]


def _start_failure(index: int, student: str, what: str, log_path: object, tail: str) -> FleetError:
    """The error for a device that did not start: the device's own `nonn: error:` line, if it wrote one."""
    errors = [line.removeprefix("nonn: error: ") for line in tail.splitlines() if line.startswith("nonn: error: ")]
    reason = f": {errors[-1]}" if errors else ""
    return FleetError(
        f"device {index} ({student}) {what}; its log ({log_path}):\n{tail}",
        summary=f"device {index} ({student}) {what}{reason} (log: {log_path})",
    )


def health_status(endpoint: str, timeout_s: float = 1.0, service: str = "") -> str:
    """The grpc.health.v1 status of `endpoint` ("SERVING", "NOT_SERVING", ... or "UNREACHABLE")."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(endpoint) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _profile_field(profile: Any, name: str, default: Any = None) -> Any:
    value = profile.get(name, default) if isinstance(profile, dict) else getattr(profile, name, default)
    return default if value is None else value


def memory_limit_mb(profile: Any) -> float | None:
    """Memory a device leaves to the model server: its memory less what the OS reserves."""
    memory = _profile_field(profile, "memory_mb", None)
    if memory is None:
        return None
    return float(memory) - float(_profile_field(profile, "reserved_mb", 0.0))


@dataclass
class Device:
    """One simulated device: which student it serves, its limits, its current process."""

    index: int
    student: str
    profile: str
    threads: int
    memory_limit_mb: float | None
    host: str
    port: int
    endpoint: str = ""  # where clients connect (a link relay under the client delay model)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    peak_rss_mb: float = 0.0
    last_rss_mb: float = 0.0
    rss_samples: int = 0
    log_path: Path | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # "t": seconds since the fleet started

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def over_memory(self) -> bool:
        return self.memory_limit_mb is not None and self.peak_rss_mb > self.memory_limit_mb

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])


# Run in the child before the server: ask Linux to SIGTERM it when its parent (the launcher)
# dies (PR_SET_PDEATHSIG = 1, kept across exec), quit if the launcher is already gone, then exec
# the real command. A trampoline rather than `preexec_fn`, so that Popen can use vfork and gRPC's
# fork handlers in the launcher never run.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('nonn fleet: the launcher exited before this device started')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _with_parent_watch(cmd: list[str], python: str) -> list[str]:
    if not sys.platform.startswith("linux"):
        return cmd
    return [python, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


class _Throttle:
    """Pause and resume a process in a 20 ms cycle so that it runs `factor` times slower on
    average (as `cpulimit` does): a slow device, whatever it is doing."""

    PERIOD_S = 0.02

    def __init__(self, pid: int, factor: float) -> None:
        self.pid = pid
        self.factor = factor
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"throttle-{pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        running_s = self.PERIOD_S / self.factor
        paused_s = self.PERIOD_S - running_s
        try:
            while not self._stop.wait(running_s):
                os.kill(self.pid, signal.SIGSTOP)
                stopping = self._stop.wait(paused_s)
                os.kill(self.pid, signal.SIGCONT)
                if stopping:
                    return
        except ProcessLookupError:
            return

    def stop(self) -> None:
        """End the cycle and leave the process running."""
        self._stop.set()
        self._thread.join(1.0)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)


_fleets: "weakref.WeakSet[LocalFleet]" = weakref.WeakSet()


def live_fleets() -> list["LocalFleet"]:
    """Fleets that still have running processes (for tests and the atexit hook)."""
    return [f for f in list(_fleets) if any(d.alive for d in f.devices)]


@atexit.register
def _stop_all_fleets() -> None:
    for fleet in list(_fleets):
        with contextlib.suppress(Exception):
            fleet.stop()


class LocalFleet:
    """K device server processes for a bundle's students, one per device profile.

    Use as a context manager::

        with LocalFleet(bundle_dir, profiles, network) as fleet:
            aggregator = Aggregator(bundle, fleet.endpoints, ...)

    `profiles[k]` is the DeviceProfile (or a dict with the same fields) of the device that
    holds student k. `network` decides where servers listen and how clients reach them.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        profiles: Sequence[Any],
        network: NetworkEmulation | None = None,
        *,
        students: Sequence[str] | None = None,
        startup_timeout_s: float = 60.0,
        memory_interval_s: float = 0.1,
        stop_timeout_s: float = 5.0,
        log_dir: str | os.PathLike[str] | None = None,
        python: str = sys.executable,
        server_args: Sequence[str] = (),
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        if not profiles:
            raise ValueError("a fleet needs at least one device profile")
        self.profiles = list(profiles)
        self.network = network if network is not None else NetworkEmulation([LinkModel() for _ in self.profiles])
        if len(self.network.links) != len(self.profiles):
            raise ValueError(f"the network has {len(self.network.links)} links for {len(self.profiles)} devices")
        self.students = list(students) if students is not None else [f"student_{i}" for i in range(len(self.profiles))]
        if len(self.students) != len(self.profiles):
            raise ValueError(f"{len(self.students)} students for {len(self.profiles)} device profiles")
        self.startup_timeout_s = startup_timeout_s
        self.memory_interval_s = memory_interval_s
        self.stop_timeout_s = stop_timeout_s
        self.python = python
        self.server_args = list(server_args)
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="nonn-fleet-"))
        self.devices: list[Device] = []
        self._throttles: dict[int, _Throttle] = {}
        self._lock = threading.RLock()
        self._sampler: threading.Thread | None = None
        self._stopping = threading.Event()
        self.started_at: float | None = None
        self._stopped = False

    # ---- life cycle

    def __enter__(self) -> "LocalFleet":
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop()
        if self._own_log_dir:
            if exc_type is None:
                shutil.rmtree(self.log_dir, ignore_errors=True)
            else:
                log.warning("device server logs kept in %s", self.log_dir)

    def start(self) -> None:
        """Set up the network, start every server, wait until all report SERVING.

        On any failure every process already started is stopped before the error propagates.
        """
        try:
            self._start()
        except BaseException:
            self.stop()
            if self._own_log_dir:
                log.warning("device server logs kept in %s", self.log_dir)
            raise

    def _start(self) -> None:
        _fleets.add(self)
        self.network.setup()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i, (profile, student) in enumerate(zip(self.profiles, self.students)):
            threads = int(_profile_field(profile, "threads", 1))
            memory = memory_limit_mb(profile)
            host = self.network.server_host(i)
            self.devices.append(
                Device(
                    index=i,
                    student=student,
                    profile=str(_profile_field(profile, "name", f"device{i}")),
                    threads=max(1, threads),
                    memory_limit_mb=memory,
                    host=host,
                    port=self.network.server_port(i),
                    log_path=self.log_dir / f"device_{i}.log",
                )
            )
        self.started_at = time.monotonic()
        for device in self.devices:
            self.spawn(device.index)
        for device in self.devices:
            self.wait_ready(device.index)
            device.endpoint = self.network.client_endpoint(device.index, device.host, device.port)
        self._sampler = threading.Thread(target=self._sample_memory, name="fleet-memory", daemon=True)
        self._sampler.start()

    def server_command(self, index: int) -> list[str]:
        """The command line of device `index`'s server (`nonn serve` for its student)."""
        d = self.devices[index]
        return [
            *self.network.command_prefix(index),
            self.python, "-m", "nonn", "serve",
            "--bundle", str(self.bundle_dir),
            "--student", d.student,
            "--host", d.host,
            "--port", str(d.port),
            "--threads", str(d.threads),
            *self.server_args,
        ]  # fmt: skip

    def spawn(self, index: int) -> Device:
        """Start device `index`'s server process (does not wait for it to be ready)."""
        with self._lock:
            d = self.devices[index]
            if d.alive:
                raise FleetError(f"device {index} ({d.student}) is already running (pid {d.process.pid})")  # type: ignore[union-attr]
            cmd = self.server_command(index)
            env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(d.threads))
            with open(d.log_path, "ab") as logf:  # type: ignore[arg-type]
                logf.write(f"$ {' '.join(cmd)}\n".encode())
                logf.flush()
                d.process = subprocess.Popen(
                    _with_parent_watch(cmd, self.python),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            d.starts += 1
            d.events.append({"t": self.elapsed(), "event": "start", "pid": d.process.pid})
            log.debug("device %d (%s): started pid %d", index, d.student, d.process.pid)
            return d

    def is_serving(self, index: int, timeout_s: float = 1.0) -> bool:
        d = self.devices[index]
        return d.alive and health_status(f"{d.host}:{d.port}", timeout_s) == "SERVING"

    def wait_ready(self, index: int, timeout_s: float | None = None) -> None:
        """Block until device `index` reports SERVING; FleetError (with its log) if it dies or times out."""
        d = self.devices[index]
        timeout_s = self.startup_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            if not d.alive:
                code = d.process.returncode if d.process is not None else None
                raise _start_failure(index, d.student, f"exited with status {code} before it was ready", d.log_path, d.log_tail())
            if self.is_serving(index, timeout_s=min(1.0, max(0.1, deadline - time.monotonic()))):
                d.events.append({"t": self.elapsed(), "event": "ready"})
                return
            if time.monotonic() > deadline:
                raise _start_failure(index, d.student, f"did not report SERVING within {timeout_s:.0f} s", d.log_path, d.log_tail())
            time.sleep(0.05)

    def slow(self, index: int, factor: float) -> None:
        """From now on, device `index` runs `factor` times slower (until it is killed or stopped)."""
        with self._lock:
            d = self.devices[index]
            if not d.alive:
                raise FleetError(f"device {index} ({d.student}) is not running")
            if factor <= 1:
                raise ValueError(f"a slowdown factor must be above 1, got {factor}")
            self._unthrottle(index)
            self._throttles[index] = _Throttle(d.process.pid, factor)  # type: ignore[union-attr]
            d.events.append({"t": self.elapsed(), "event": "slow", "factor": factor})

    def _unthrottle(self, index: int) -> None:
        throttle = self._throttles.pop(index, None)
        if throttle is not None:
            throttle.stop()

    def kill(self, index: int, graceful: bool = False) -> None:
        """Stop device `index` abruptly (SIGKILL, a crash) or gracefully (SIGTERM)."""
        with self._lock:
            self._unthrottle(index)
            d = self.devices[index]
            if not d.alive:
                return
            self._record_memory(d)
            proc = d.process
            assert proc is not None
            proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(self.stop_timeout_s)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            d.events.append({"t": self.elapsed(), "event": "stop" if graceful else "kill"})

    def restart(self, index: int, wait: bool = True) -> None:
        """Start device `index` again on the same address (after kill)."""
        self.kill(index)
        self.spawn(index)
        if wait:
            self.wait_ready(index)

    def stop(self) -> None:
        """Stop every process this fleet started (SIGTERM, then SIGKILL), then the network."""
        self._stopping.set()
        if self._sampler is not None and self._sampler is not threading.current_thread():
            self._sampler.join(2.0)
        with self._lock:
            for index in list(self._throttles):
                self._unthrottle(index)
            procs = []
            for d in self.devices:
                if d.alive:
                    self._record_memory(d)
                    with contextlib.suppress(ProcessLookupError):
                        d.process.terminate()  # type: ignore[union-attr]
                    procs.append(d)
            deadline = time.monotonic() + self.stop_timeout_s
            for d in procs:
                assert d.process is not None
                try:
                    d.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    d.process.kill()
                    d.process.wait()
                if not self._stopped:
                    d.events.append({"t": self.elapsed(), "event": "stop"})
        with contextlib.suppress(Exception):
            self.network.close()
        self._stopped = True

    # ---- observation

    @property
    def endpoints(self) -> list[str]:
        return [d.endpoint for d in self.devices]

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else time.monotonic() - self.started_at

    def pids(self) -> list[int]:
        """Every process id this fleet has running now."""
        return [d.process.pid for d in self.devices if d.alive]  # type: ignore[union-attr]

    def _record_memory(self, d: Device) -> None:
        """Update the device's RSS figures: psutil's current RSS and the kernel's high-water mark."""
        if not d.alive:
            return
        try:
            proc = psutil.Process(d.process.pid)  # type: ignore[union-attr]
            rss = proc.memory_info().rss / MB
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return
        d.last_rss_mb = rss
        d.rss_samples += 1
        d.peak_rss_mb = max(d.peak_rss_mb, rss, _vm_hwm_mb(d.process.pid))  # type: ignore[union-attr]

    def sample_memory(self) -> None:
        with self._lock:
            for d in self.devices:
                self._record_memory(d)

    def _sample_memory(self) -> None:
        while not self._stopping.wait(self.memory_interval_s):
            self.sample_memory()

    def summary(self) -> list[dict[str, Any]]:
        """Per device: student, profile, endpoint, starts, RSS figures, limit, over-limit flag, events."""
        self.sample_memory()
        return [
            {
                "index": d.index,
                "student": d.student,
                "profile": d.profile,
                "threads": d.threads,
                "endpoint": d.endpoint,
                "server_address": f"{d.host}:{d.port}",
                "starts": d.starts,
                "peak_rss_mb": round(d.peak_rss_mb, 2),
                "rss_samples": d.rss_samples,
                "memory_limit_mb": d.memory_limit_mb,
                "over_memory": d.over_memory,
                "events": list(d.events),
                "link_stats": self.network.link_stats(d.index),
            }
            for d in self.devices
        ]


def _vm_hwm_mb(pid: int) -> float:
    """The kernel's peak resident set size (VmHWM) of `pid` in MiB, 0 where not available."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return 0.0
