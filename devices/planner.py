"""Placement planner: which device runs which student, and what the fleet costs.

`place(bundle, devices)` assigns the bundle's K students to K of the given devices so that each
fits the device's memory and the slowest device is as fast as possible (exact min-max
assignment); it is the one placement `plan`, `simulate` and `deploy` use. `plan(bundle,
devices)` places the students that way, then estimates per device the memory, compute time, bytes on the wire and
energy of one inference, and compares the fleet with

(a) the teacher on one device (the fleet's largest-memory kind), and
(b) a layer-wise model-parallel split of the teacher over the same devices, MoDNN-style.

The result is a `Plan` (nonn.devices.plan_file), saved as plan.json and shown by
nonn.devices.plan_text.

The cost model (per single image) is nonn.devices.cost_model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from nonn.devices.cost_model import (
    RUNTIME_FOOTPRINT_MB,
    batch1,
    compute_seconds,
    exchange_bytes,
    model_memory_mb,
    model_parallel_estimate,
    teacher_estimate,
    transfer_seconds,
)
from nonn.devices.plan_file import BundleRef, DevicePlan, Estimate, Plan, PlanError, StudentPlacement
from nonn.devices.profiles import DeviceProfile, load_profiles
from nonn.runtime.bundle import Bundle
from nonn.runtime.traffic import HPACK_HEADER_BYTES, TCP_IP_HEADER_BYTES, TCP_MSS, BytesPerInference

__all__ = [
    "PlanError",
    "DevicePlan",
    "Estimate",
    "Plan",
    "place",
    "plan",
    "simulation_estimates",
]

# --------------------------------------------------------------------------- assignment


def _match(candidates: list[list[int]], num_devices: int) -> list[int | None]:
    """Maximum bipartite matching (Kuhn's augmenting paths): student -> device or None."""
    owner: list[int | None] = [None] * num_devices

    def augment(s: int, seen: set[int]) -> bool:
        for d in candidates[s]:
            if d in seen:
                continue
            seen.add(d)
            if owner[d] is None or augment(owner[d], seen):  # type: ignore[arg-type]
                owner[d] = s
                return True
        return False

    for s in range(len(candidates)):
        augment(s, set())
    result: list[int | None] = [None] * len(candidates)
    for d, s in enumerate(owner):
        if s is not None:
            result[s] = d
    return result


def _device_names(devices: Sequence[DeviceProfile]) -> list[str]:
    counts: dict[str, int] = {}
    for p in devices:
        counts[p.name] = counts.get(p.name, 0) + 1
    seen: dict[str, int] = {}
    names = []
    for p in devices:
        i = seen.get(p.name, 0)
        seen[p.name] = i + 1
        names.append(f"{p.name}#{i}" if counts[p.name] > 1 else p.name)
    return names


def _assign(
    bundle: Bundle, devices: Sequence[DeviceProfile], names: list[str], memory: list[float], times: list[list[float]], runtime_mb: float
) -> list[int]:
    """Student k -> device index: every student fits its device, the slowest device is as fast as possible."""
    K, D = bundle.num_students, len(devices)
    students = [s.name for s in bundle.students]
    if D < K:
        raise PlanError(
            f"fewer devices than students: the bundle has {K} students ({', '.join(students)}) but the device list "
            f"gives {D}; add {K - D} more device(s)"
        )
    fits = [[d for d in range(D) if memory[s] <= devices[d].available_mb] for s in range(K)]
    for s in range(K):
        if not fits[s]:
            best = max(range(D), key=lambda d: devices[d].available_mb)
            raise PlanError(
                f"{students[s]} needs {memory[s]:.1f} MB (runtime {runtime_mb:.0f} MB + model and activations) but the "
                f"largest device, {names[best]}, has {devices[best].available_mb:.0f} MB available "
                f"({devices[best].memory_mb:.0f} MB - {devices[best].reserved_mb:.0f} MB reserved): short by "
                f"{memory[s] - devices[best].available_mb:.1f} MB"
            )
    # Exact min-max (bottleneck) assignment: the smallest time limit under which every
    # student still gets its own device that fits it.
    for limit in sorted({times[s][d] for s in range(K) for d in fits[s]}):
        allowed = [[d for d in sorted(fits[s], key=lambda d: times[s][d]) if times[s][d] <= limit] for s in range(K)]
        matched = _match(allowed, D)
        if all(m is not None for m in matched):
            return [int(m) for m in matched]  # type: ignore[arg-type]
    matched = _match(fits, D)
    stuck = [students[s] for s, m in enumerate(matched) if m is None]
    raise PlanError(
        f"no placement fits every student: {', '.join(stuck)} cannot get a device of its own with enough memory "
        f"(the devices large enough are all needed by other students); add larger devices"
    )


def _as_profile(p: Any) -> DeviceProfile:
    if isinstance(p, DeviceProfile):
        return p
    if isinstance(p, Mapping):
        name = str(p.get("name", ""))
        known = load_profiles()
        base = known[name.lower()].to_dict() if name.lower() in known else {}
        return DeviceProfile.from_dict(name, {**base, **{k: v for k, v in p.items() if k != "name"}})
    if isinstance(p, str):
        return load_profiles()[p.lower()]
    raise TypeError(f"expected a DeviceProfile, a profile dict or a profile name, got {type(p).__name__}")


@dataclass
class _StudentCosts:
    """Per student (and per student x device) figures the placement and the estimates share."""

    memory: list[float]  # MB on any device
    request: list[int]  # message bytes of the image sent to it
    response: list[int]  # message bytes of its features sent back
    request_wire: list[int]  # their wire bytes
    response_wire: list[int]
    compute: list[list[float]]  # seconds, [student][device]
    transfer: list[list[float]]
    times: list[list[float]]  # compute + transfer


def _student_costs(bundle: Bundle, devices: Sequence[DeviceProfile], runtime_mb: float) -> _StudentCosts:
    students = bundle.students
    sent = [exchange_bytes(s.name, s.input.name, batch1(s.input.shape), s.input.datatype, output=s.output.name) for s in students]
    back = [exchange_bytes(s.name, s.output.name, batch1(s.output.shape), s.output.datatype, response=True) for s in students]
    compute = [[compute_seconds(s.flops, p) for p in devices] for s in students]
    transfer = [[transfer_seconds([sent[k][1], back[k][1]], p) for p in devices] for k in range(len(students))]
    return _StudentCosts(
        memory=[model_memory_mb(s.size_bytes, s.activation_bytes, runtime_mb) for s in students],
        request=[m for m, _ in sent],
        response=[m for m, _ in back],
        request_wire=[w for _, w in sent],
        response_wire=[w for _, w in back],
        compute=compute,
        transfer=transfer,
        times=[[compute[k][d] + transfer[k][d] for d in range(len(devices))] for k in range(len(students))],
    )


def _student_bytes(costs: _StudentCosts, k: int) -> BytesPerInference:
    return BytesPerInference(request=costs.request[k], features=costs.response[k], wire=costs.request_wire[k] + costs.response_wire[k])


def place(bundle: Bundle | str | Path, devices: Sequence[Any], *, runtime_mb: float = RUNTIME_FOOTPRINT_MB) -> list[int]:
    """Which of `devices` serves each student: the index of student k's device, for every k.

    The one placement of nonn (`plan`, `simulate` and the deployment files use it): every student
    on a device of its own whose memory holds it, the slowest device as fast as possible (exact
    min-max assignment). Raises PlanError naming the student and the shortfall when none exists.
    """
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    devices = [_as_profile(p) for p in devices]
    if not devices:
        raise PlanError("no devices given")
    costs = _student_costs(bundle, devices, runtime_mb)
    return _assign(bundle, devices, _device_names(devices), costs.memory, costs.times, runtime_mb)


def place_replicas(bundle: Bundle | str | Path, devices: Sequence[Any], replicas: int = 1, *,
                   runtime_mb: float = RUNTIME_FOOTPRINT_MB) -> list[list[int]]:  # fmt: skip
    """Each student on `replicas` devices: [student k's device indices], first copy first.

    The first copy of every student is placed as `place` does; each further copy the same way on
    the devices still unused, so spare devices take the copies (the fastest spares first).
    """
    if replicas < 1:
        raise PlanError(f"replicas must be at least 1, got {replicas}")
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    devices = [_as_profile(p) for p in devices]
    K = bundle.num_students
    if replicas > 1 and len(devices) < K * replicas:
        raise PlanError(
            f"{K} students x {replicas} replicas need {K * replicas} devices, the device list gives {len(devices)}; "
            f"add {K * replicas - len(devices)} more device(s)"
        )
    costs = _student_costs(bundle, devices, runtime_mb)
    names = _device_names(devices)
    copies: list[list[int]] = [[] for _ in range(K)]
    free = list(range(len(devices)))
    for _ in range(replicas):
        sub = _assign(bundle, [devices[d] for d in free], [names[d] for d in free], costs.memory,
                      [[row[d] for d in free] for row in costs.times], runtime_mb)  # fmt: skip
        for k, i in enumerate(sub):
            copies[k].append(free[i])
        free = [d for d in free if all(d not in c for c in copies)]
    return copies


def _check_placement(placement: Sequence[int], num_students: int, num_devices: int) -> list[int]:
    placed = [int(d) for d in placement]
    if len(placed) != num_students or len(set(placed)) != len(placed) or not all(0 <= d < num_devices for d in placed):
        raise PlanError(
            f"placement {placed}: expected {num_students} distinct device indices in 0..{num_devices - 1}, one per student"
        )
    return placed


def plan(
    bundle: Bundle | str | Path,
    devices: Sequence[DeviceProfile],
    *,
    aggregator: DeviceProfile | None = None,
    runtime_mb: float = RUNTIME_FOOTPRINT_MB,
    placement: Sequence[int] | None = None,
    replicas: int = 1,
) -> Plan:
    """Place the bundle's students on `devices` (one each, or `replicas` each) and estimate the
    fleet's cost.

    `placement` (student k on devices[placement[k]]) replaces the search, e.g. to estimate a fleet
    that already runs; by default `place` (`place_replicas` with replicas) chooses.
    """
    if not isinstance(bundle, Bundle):
        bundle = Bundle.load(bundle)
    devices = [_as_profile(p) for p in devices]
    if not devices:
        raise PlanError("no devices given")
    names = _device_names(devices)
    input_shape = list(bundle.input_contract.input_shape)
    students = bundle.students
    costs = _student_costs(bundle, devices, runtime_mb)
    memory, request, response, compute, transfer, times = (
        costs.memory, costs.request, costs.response, costs.compute, costs.transfer, costs.times
    )
    if placement is None:
        copies = place_replicas(bundle, devices, replicas, runtime_mb=runtime_mb)
    else:
        if replicas != 1:
            raise PlanError("a given placement has one device per student: leave replicas at 1")
        copies = [[d] for d in _check_placement(placement, len(students), len(devices))]
    placed = [c[0] for c in copies]

    agg = aggregator or devices[0]
    head_s = compute_seconds(bundle.head.flops, agg)
    rtt = max(devices[d].link.latency_ms for d in placed) / 1000
    fan_out_s = transfer_seconds(costs.request_wire + costs.response_wire, agg)
    slowest = max(compute[k][placed[k]] + transfer_seconds(costs.response_wire[k], devices[placed[k]]) for k in range(len(students)))
    latency = rtt + fan_out_s + slowest + head_s

    rows: list[DevicePlan] = []
    by_device = {d: k for k, c in enumerate(copies) for d in c}
    for d, profile in enumerate(devices):
        k = by_device.get(d)
        if k is None:
            rows.append(
                DevicePlan(names[d], profile.name, None, 0.0, profile.available_mb, 0.0, BytesPerInference(0, 0, 0), 0.0, 0.0,
                           profile.power_w.idle * latency * 1000, profile.threads)
            )
            continue
        busy = min(times[k][d], latency)
        energy = profile.power_w.active * busy + profile.power_w.idle * (latency - busy)
        rows.append(
            DevicePlan(
                device=names[d],
                profile=profile.name,
                student=students[k].name,
                memory_mb=memory[k],
                available_mb=profile.available_mb,
                compute_ms=compute[k][d] * 1000,
                bytes_per_inference=_student_bytes(costs, k),
                transfer_ms=transfer[k][d] * 1000,
                busy_ms=times[k][d] * 1000,
                energy_mj=energy * 1000,
                threads=profile.threads,
            )
        )
    used = [r for r in rows if r.student is not None]
    nonn = Estimate(
        name="nonn",
        devices=len(students) * replicas,
        memory_per_device_mb=max(r.memory_mb for r in used),
        model_memory_per_device_mb=max(r.memory_mb for r in used) - runtime_mb,
        bytes_per_inference=BytesPerInference.total(_student_bytes(costs, k) for k in range(len(students))),
        latency_ms=latency * 1000,
        compute_ms=max(r.compute_ms for r in used),
        energy_per_node_mj=max(r.energy_mj for r in used),
        fits=True,
        note=f"{len(students)} students" + (f" x {replicas} replicas" if replicas > 1 else "") + f", head on {agg.name}",
    )

    teacher_est = mp_est = None
    if bundle.teacher is not None:
        # The teacher's device: the fleet's kind with the most memory (fastest on ties).
        t_profile = max(devices, key=lambda p: (p.available_mb, p.gflops))
        # The teacher columns take the images the students take, so their bytes compare like for like.
        datatype = bundle.input_contract.datatype
        teacher_est = teacher_estimate(bundle.teacher, t_profile, t_profile.name, runtime_mb, bundle.num_classes, input_shape, datatype)
        mp_devices = [devices[d] for d in sorted(placed)]  # the same devices the students use
        mp_est = model_parallel_estimate(bundle.teacher, mp_devices, runtime_mb, bundle.num_classes, input_shape, datatype)

    return Plan(
        bundle=BundleRef.of(bundle),
        placement=[StudentPlacement(s.name, [names[d] for d in copies[k]]) for k, s in enumerate(students)],
        devices=rows,
        nonn=nonn,
        teacher=teacher_est,
        model_parallel=mp_est,
        aggregator=agg.name,
        head_ms=head_s * 1000,
        assumptions={
            "runtime_footprint_mb": runtime_mb,
            "memory_model": "runtime + 2 x model bytes + largest layer input+output (batch 1)",
            "compute_model": "FLOPs / sustained GFLOP/s of the profile",
            "bytes_model": (
                "request bytes sent, features sent back: KServe v2 ModelInfer protobuf (exact, batch 1); wire bytes: "
                f"+ 5 B gRPC prefix + 9 B per HTTP/2 frame + {HPACK_HEADER_BYTES} B per header block; transfer time "
                f"adds {TCP_IP_HEADER_BYTES} B TCP/IPv4 per {TCP_MSS} B segment"
            ),
            "energy_model": "active W x busy time + idle W x rest of the inference",
            "model_parallel": "MoDNN-style spatial split of every conv layer, linear layers on the owner, halos ignored",
        },
    )


def simulation_estimates(bundle_dir: str | Path, profiles: Sequence[Any], replicas: int = 1) -> dict[str, Any] | None:
    """The estimates for the fleet a simulation ran (student k on profiles[k], or its first replica
    on profiles[k * replicas], for reports); None if not possible."""
    try:
        bundle = Bundle.load(bundle_dir)
        first = [k * replicas for k in range(bundle.num_students)]
        return plan(bundle, [_as_profile(p) for p in profiles], placement=first).to_dict()
    except (PlanError, KeyError, TypeError, ValueError):
        return None
