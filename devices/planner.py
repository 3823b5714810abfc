"""Placement planner: which device runs which student, and what the fleet costs.

`place(bundle, devices)` assigns the bundle's K students to K of the given devices so that each
fits the device's memory and the slowest device is as fast as possible (exact min-max
assignment); it is the one placement `plan`, `simulate` and `deploy` use. `plan(bundle,
devices)` places the students that way, then estimates per device the memory, compute time, bytes on the wire and
energy of one inference, and compares the fleet with

(a) the teacher on one device (the fleet's largest-memory kind), and
(b) a layer-wise model-parallel split of the teacher over the same devices, MoDNN-style.

The result is a `Plan` (nonn.devices.plan_file), saved as plan.json.

The cost model, all per single image (batch 1):

- Memory of a served model = RUNTIME_FOOTPRINT_MB (measured: resident set of `nonn serve`
  hosting a small student; Python, numpy, ONNX Runtime, grpcio) + 2 x the model's weights (the
  file bytes read for hashing plus the session's initialisers) + its activation working memory
  (largest layer input + output, from the manifest). It must fit `memory_mb - reserved_mb`.
- Compute time = FLOPs / sustained GFLOP/s of the profile (FLOPs as in the manifest: 2 per
  multiply-accumulate of convolutions and linear layers).
- Bytes per inference as `nonn.runtime.traffic` defines them (the one definition `simulate`
  and `infer` measure too): request bytes sent and features sent back = the exact protobuf size
  of the KServe v2 ModelInfer request/response (tritonclient's generated messages, raw tensor
  contents); wire bytes add gRPC's 5-byte message prefix and HTTP/2 frame headers (9 bytes per
  frame; one HEADERS frame per request, HEADERS + trailers per response, HPACK_HEADER_BYTES
  each for their indexed header blocks).
- Transfer time = (wire bytes + TCP/IPv4 headers, 52 bytes per MSS-sized segment) x 8 / link
  bandwidth; each request/response exchange adds one round-trip latency of the link.
  Acknowledgements and Ethernet framing are not counted.
- NoNN latency = round trip + all K requests (the image) through the aggregator's link +
  the slowest device's (compute + response transfer) + the head on the aggregator.
- Energy of a node = active power x its busy time (compute + its own transfers) + idle power
  x the rest of the inference.
- Model-parallel (MoDNN, Mao et al. DATE 2017): every convolution is split spatially across
  the devices in proportion to their GFLOP/s (so each device holds every convolution's
  weights); linear layers run on the owner (the device with the fastest link). Around each
  convolution the owner scatters the input bands and gathers the output bands: the bytes
  follow from the teacher's per-layer activation shapes in the manifest; halo rows are not
  counted, which favours model parallelism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from nonn.devices.plan_file import BundleRef, DevicePlan, Estimate, Plan, PlanError, StudentPlacement
from nonn.devices.profiles import DeviceProfile, load_profiles
from nonn.runtime.bundle import Bundle, TeacherSummary
from nonn.runtime.traffic import (
    DEVICE_FIELDS,
    FIELDS,
    HPACK_HEADER_BYTES,
    TCP_IP_HEADER_BYTES,
    TCP_MSS,
    BytesPerInference,
    column,
    describe,
    link_bytes,
    message_bytes,
    wire_bytes,
)

__all__ = [
    "RUNTIME_FOOTPRINT_MB",
    "PlanError",
    "DevicePlan",
    "Estimate",
    "Plan",
    "place",
    "plan",
    "model_memory_mb",
    "exchange_bytes",
    "format_plan",
    "format_device_order",
    "simulation_estimates",
]

# Resident set size of a `nonn serve` process hosting one small student, measured with psutil
# on x86-64 Linux (Python 3.11, onnxruntime 1.32, grpcio): 81.6 MB. ARM builds are similar.
RUNTIME_FOOTPRINT_MB = 82.0
FLOAT_BYTES = 4
MB = 1024 * 1024


# --------------------------------------------------------------------------- cost model


def exchange_bytes(model: str, tensor: str, shape: Sequence[int], datatype: str = "FP32", response: bool = False,
                   output: str = "output") -> tuple[int, int]:  # fmt: skip
    """(message bytes, wire bytes) of one ModelInfer request (or reply) carrying one raw tensor."""
    message = message_bytes(model, tensor, shape, datatype, response, output)
    return message, wire_bytes(message, response)


def _batch1(shape: Sequence[int]) -> list[int]:
    return [1 if d == -1 else int(d) for d in shape]


def model_memory_mb(weight_bytes: float, activation_bytes: float, runtime_mb: float = RUNTIME_FOOTPRINT_MB) -> float:
    """Memory of a served model: runtime + 2 x weights + activation working memory (see module doc)."""
    return runtime_mb + (2 * weight_bytes + activation_bytes) / MB


def _transfer_s(wire: Sequence[float] | float, profile: DeviceProfile) -> float:
    """Seconds to send messages of `wire` bytes each (their TCP/IP headers added) over the profile's link."""
    messages = [wire] if isinstance(wire, (int, float)) else wire
    return sum(link_bytes(w) for w in messages) * 8 / (profile.link.bandwidth_mbps * 1e6)


def _compute_s(flops: float, profile: DeviceProfile) -> float:
    return flops / (profile.gflops * 1e9)


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


# --------------------------------------------------------------------------- estimates


def _teacher_estimate(
    teacher: TeacherSummary, profile: DeviceProfile, name: str, runtime_mb: float, num_classes: int, input_shape: list[int],
    input_datatype: str,
) -> Estimate:
    """The teacher on one device, taking the images the students take (`input_datatype`)."""
    memory = model_memory_mb(teacher.params * FLOAT_BYTES, teacher.activation_bytes, runtime_mb)
    request, request_wire = exchange_bytes("teacher", "image", [1, *input_shape], input_datatype, output="logits")
    response, response_wire = exchange_bytes("teacher", "logits", [1, num_classes], response=True)
    compute = _compute_s(teacher.flops, profile)
    transfer = _transfer_s(request_wire, profile) + _transfer_s(response_wire, profile)
    latency = profile.link.latency_ms / 1000 + transfer + compute
    energy = profile.power_w.active * (compute + transfer) + profile.power_w.idle * (latency - compute - transfer)
    fits = memory <= profile.available_mb
    return Estimate(
        name="teacher",
        devices=1,
        memory_per_device_mb=memory,
        model_memory_per_device_mb=memory - runtime_mb,
        bytes_per_inference=BytesPerInference(request=request, features=response, wire=request_wire + response_wire),
        latency_ms=latency * 1000,
        compute_ms=compute * 1000,
        energy_per_node_mj=energy * 1000,
        fits=fits,
        note=f"on one {name}; its bytes are the image sent to it and the logits it sends back (it has no features)"
        + ("" if fits else f" (does not fit: needs {memory:.0f} MB of {profile.available_mb:.0f} MB)"),
    )


def _model_parallel_estimate(
    teacher: TeacherSummary, devices: Sequence[DeviceProfile], runtime_mb: float, num_classes: int, input_shape: list[int],
    input_datatype: str,
) -> Estimate:
    D = len(devices)
    owner = max(range(D), key=lambda d: (devices[d].link.bandwidth_mbps, devices[d].gflops))
    total_gflops = sum(p.gflops for p in devices)
    share = [p.gflops / total_gflops for p in devices]
    others = [d for d in range(D) if d != owner]
    layers = teacher.layers
    if not layers:
        raise PlanError("the bundle's teacher summary lists no layers; re-export the bundle with its teacher")
    is_conv = [len(layer.output_shape) == 3 for layer in layers]
    input_elements = 1
    for dim in input_shape:
        input_elements *= dim

    sent: list[list[int]] = [[] for _ in range(D)]  # wire bytes of the messages each device sends
    phases = 0  # scatter/gather phases, each costing half a round trip
    owner_wire: list[int] = []  # all traffic passes the owner's link
    between = 0  # message bytes the devices send each other
    between_wire = 0

    def exchange(elements: int, scatter: bool) -> None:
        nonlocal phases, owner_wire, between, between_wire
        phases += 1
        for d in others:
            band = max(1, round(elements * share[d]))
            message, wire = exchange_bytes("layer", "band", [1, band], response=not scatter)
            sent[owner if scatter else d].append(wire)
            owner_wire.append(wire)
            between += message
            between_wire += wire

    compute_s = 0.0
    busy_compute = [0.0] * D
    previous_elements = input_elements
    for i, layer in enumerate(layers):
        if is_conv[i]:
            # The owner scatters the layer's input bands and gathers its output bands.
            if others:
                exchange(layer.input_elements or previous_elements, scatter=True)
                exchange(layer.output_elements, scatter=False)
            layer_s = layer.flops / (total_gflops * 1e9)
            compute_s += layer_s
            for d in range(D):
                busy_compute[d] += layer_s
        else:
            layer_s = _compute_s(layer.flops, devices[owner])
            compute_s += layer_s
            busy_compute[owner] += layer_s
        previous_elements = layer.output_elements

    request, request_wire = exchange_bytes("teacher", "image", [1, *input_shape], input_datatype, output="logits")
    response, response_wire = exchange_bytes("teacher", "logits", [1, num_classes], response=True)
    owner_link = devices[owner]
    comm_s = _transfer_s([*owner_wire, request_wire, response_wire], owner_link) + phases * owner_link.link.latency_ms / 2000
    latency_s = owner_link.link.latency_ms / 1000 + comm_s + compute_s
    conv_params = sum(l.params for l, c in zip(layers, is_conv) if c)
    fc_params = sum(l.params for l, c in zip(layers, is_conv) if not c)
    memory = [
        model_memory_mb((conv_params + (fc_params if d == owner else 0)) * FLOAT_BYTES, teacher.activation_bytes * share[d], runtime_mb)
        for d in range(D)
    ]
    energy = []
    for d in range(D):
        busy = busy_compute[d] + _transfer_s(sent[d] + ([request_wire, response_wire] if d == owner else []), devices[d])
        busy = min(busy, latency_s)
        energy.append(devices[d].power_w.active * busy + devices[d].power_w.idle * (latency_s - busy))
    fits = all(m <= p.available_mb for m, p in zip(memory, devices))
    return Estimate(
        name="model_parallel",
        devices=D,
        memory_per_device_mb=max(memory),
        model_memory_per_device_mb=max(memory) - runtime_mb,
        bytes_per_inference=BytesPerInference(
            request=request, features=response, between_devices=between, wire=between_wire + request_wire + response_wire
        ),
        latency_ms=latency_s * 1000,
        compute_ms=compute_s * 1000,
        energy_per_node_mj=max(energy) * 1000,
        fits=fits,
        note=f"MoDNN-style spatial split of {sum(is_conv)} conv layers over {D} devices, {phases} scatter/gather phases; "
        "its bytes are the image in, the logits back and the layer bands between devices",
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
    sent = [exchange_bytes(s.name, s.input.name, _batch1(s.input.shape), s.input.datatype, output=s.output.name) for s in students]
    back = [exchange_bytes(s.name, s.output.name, _batch1(s.output.shape), s.output.datatype, response=True) for s in students]
    compute = [[_compute_s(s.flops, p) for p in devices] for s in students]
    transfer = [[_transfer_s([sent[k][1], back[k][1]], p) for p in devices] for k in range(len(students))]
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
    head_s = _compute_s(bundle.head.flops, agg)
    rtt = max(devices[d].link.latency_ms for d in placed) / 1000
    fan_out_s = _transfer_s(costs.request_wire + costs.response_wire, agg)
    slowest = max(compute[k][placed[k]] + _transfer_s(costs.response_wire[k], devices[placed[k]]) for k in range(len(students)))
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
        teacher_est = _teacher_estimate(bundle.teacher, t_profile, t_profile.name, runtime_mb, bundle.num_classes, input_shape, datatype)
        mp_devices = [devices[d] for d in sorted(placed)]  # the same devices the students use
        mp_est = _model_parallel_estimate(bundle.teacher, mp_devices, runtime_mb, bundle.num_classes, input_shape, datatype)

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


# --------------------------------------------------------------------------- presentation


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _num(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_device_order(p: Plan) -> str:
    """Which device serves each student, in the student order `serve --aggregate` and `infer` take."""
    width = max(len(s.student) for s in p.placement)
    lines = [f"  {s.student.ljust(width)}  {', '.join(s.devices)}" for s in p.placement]
    return "device order (student order: give the devices' host:port in this order to serve --aggregate / infer --devices):\n" + "\n".join(lines)


def format_plan(p: Plan) -> str:
    """The plan as terminal tables: per device, the device order, then NoNN vs teacher vs model-parallel."""
    device_rows = [
        [
            r.device,
            r.student or "(unused)",
            _num(r.memory_mb),
            _num(r.available_mb, ".0f"),
            _num(r.compute_ms, ".2f"),
            *(_num(getattr(r.bytes_per_inference, f), ".0f") for f in DEVICE_FIELDS),
            _num(r.energy_mj, ".2f"),
        ]
        for r in p.devices
    ]
    byte_columns = [column(f) for f in DEVICE_FIELDS]
    parts = [
        _table(["device", "student", "memory MB", "avail MB", "compute ms", *byte_columns, "energy mJ"], device_rows),
        format_device_order(p),
        *_replication_lines(p),
        f"fleet latency {p.nonn.latency_ms:.2f} ms per image (head {p.head_ms:.2g} ms on {p.aggregator}); "
        f"all devices: {describe(p.nonn.bytes_per_inference)}",
    ]
    baselines = [b for b in (p.teacher, p.model_parallel) if b is not None]
    if not baselines:
        parts.append("no teacher summary in the bundle: no comparison with the teacher or a model-parallel split")
        return "\n\n".join(parts)
    ratios = p.ratios()
    headers = ["", "NoNN"] + [f"{b.name.replace('_', '-')} ({b.devices} dev)" for b in baselines] + [f"{b.name.replace('_', '-')}/NoNN" for b in baselines]
    rows = []
    for label, attr, key, spec in (
        ("memory per device (MB)", "memory_per_device_mb", "memory_per_device", ".1f"),
        ("  without runtime (MB)", "model_memory_per_device_mb", "model_memory_per_device", ".2f"),
        ("latency (ms)", "latency_ms", "latency", ".2f"),
        ("energy per node (mJ)", "energy_per_node_mj", "energy_per_node", ".2f"),
    ):
        row = [label, _num(getattr(p.nonn, attr), spec)]
        row += [_num(getattr(b, attr), spec) for b in baselines]
        row += [_num(ratios[b.name][key], ".2f") + "x" if ratios[b.name][key] is not None else "-" for b in baselines]
        rows.append(row)
    for f in FIELDS:
        values = [getattr(e.bytes_per_inference, f) for e in (p.nonn, *baselines)]
        ratio = [None if values[0] in (None, 0) or v is None else v / values[0] for v in values[1:]]
        rows.append([column(f), *(_num(v, ".0f") for v in values), *("-" if r is None else f"{r:.2f}x" for r in ratio)])
    parts.append(_table(headers, rows))
    for b in baselines:
        parts.append(f"{b.name.replace('_', '-')}: {b.note}" + ("" if b.fits else "  [does not fit]"))
    return "\n\n".join(parts)


def _replication_lines(p: Plan) -> list[str]:
    """What replicas cost (devices; bytes per inference stay those of one copy, hedges aside) and buy."""
    replicas = max((len(s.devices) for s in p.placement), default=1)
    if replicas == 1:
        return []
    return [
        f"replication: {replicas} devices per student, {p.nonn.devices} devices instead of {len(p.placement)}; "
        f"the same bytes per inference as one copy ({describe(p.nonn.bytes_per_inference)}; up to about 5% more when "
        "slow replicas are hedged); "
        f"buys: answers at full accuracy with {replicas - 1} device(s) of every student lost (measure accuracy under "
        "loss and p99 with `nonn simulate --replicas ... --kill/--slow`)"
    ]


def simulation_estimates(bundle_dir: str | Path, profiles: Sequence[Any], replicas: int = 1) -> dict[str, Any] | None:
    """The estimates for the fleet a simulation ran (student k on profiles[k], or its first replica
    on profiles[k * replicas], for reports); None if not possible."""
    try:
        bundle = Bundle.load(bundle_dir)
        first = [k * replicas for k in range(bundle.num_students)]
        return plan(bundle, [_as_profile(p) for p in profiles], placement=first).to_dict()
    except (PlanError, KeyError, TypeError, ValueError):
        return None
