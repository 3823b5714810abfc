"""What serving costs on a device, per single image (batch 1): the model behind `nonn plan`.

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

from typing import Sequence

from nonn.devices.plan_file import Estimate, PlanError
from nonn.devices.profiles import DeviceProfile
from nonn.runtime.bundle import TeacherSummary
from nonn.runtime.traffic import BytesPerInference, link_bytes, message_bytes, wire_bytes

__all__ = [
    "RUNTIME_FOOTPRINT_MB",
    "exchange_bytes",
    "batch1",
    "model_memory_mb",
    "transfer_seconds",
    "compute_seconds",
    "teacher_estimate",
    "model_parallel_estimate",
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


def batch1(shape: Sequence[int]) -> list[int]:
    return [1 if d == -1 else int(d) for d in shape]


def model_memory_mb(weight_bytes: float, activation_bytes: float, runtime_mb: float = RUNTIME_FOOTPRINT_MB) -> float:
    """Memory of a served model: runtime + 2 x weights + activation working memory (see module doc)."""
    return runtime_mb + (2 * weight_bytes + activation_bytes) / MB


def transfer_seconds(wire: Sequence[float] | float, profile: DeviceProfile) -> float:
    """Seconds to send messages of `wire` bytes each (their TCP/IP headers added) over the profile's link."""
    messages = [wire] if isinstance(wire, (int, float)) else wire
    return sum(link_bytes(w) for w in messages) * 8 / (profile.link.bandwidth_mbps * 1e6)


def compute_seconds(flops: float, profile: DeviceProfile) -> float:
    return flops / (profile.gflops * 1e9)


# --------------------------------------------------------------------------- the baselines


def teacher_estimate(
    teacher: TeacherSummary, profile: DeviceProfile, name: str, runtime_mb: float, num_classes: int, input_shape: list[int],
    input_datatype: str,
) -> Estimate:
    """The teacher on one device, taking the images the students take (`input_datatype`)."""
    memory = model_memory_mb(teacher.params * FLOAT_BYTES, teacher.activation_bytes, runtime_mb)
    request, request_wire = exchange_bytes("teacher", "image", [1, *input_shape], input_datatype, output="logits")
    response, response_wire = exchange_bytes("teacher", "logits", [1, num_classes], response=True)
    compute = compute_seconds(teacher.flops, profile)
    transfer = transfer_seconds(request_wire, profile) + transfer_seconds(response_wire, profile)
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


def model_parallel_estimate(
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
            layer_s = compute_seconds(layer.flops, devices[owner])
            compute_s += layer_s
            busy_compute[owner] += layer_s
        previous_elements = layer.output_elements

    request, request_wire = exchange_bytes("teacher", "image", [1, *input_shape], input_datatype, output="logits")
    response, response_wire = exchange_bytes("teacher", "logits", [1, num_classes], response=True)
    owner_link = devices[owner]
    comm_s = transfer_seconds([*owner_wire, request_wire, response_wire], owner_link) + phases * owner_link.link.latency_ms / 2000
    latency_s = owner_link.link.latency_ms / 1000 + comm_s + compute_s
    conv_params = sum(l.params for l, c in zip(layers, is_conv) if c)
    fc_params = sum(l.params for l, c in zip(layers, is_conv) if not c)
    memory = [
        model_memory_mb((conv_params + (fc_params if d == owner else 0)) * FLOAT_BYTES, teacher.activation_bytes * share[d], runtime_mb)
        for d in range(D)
    ]
    energy = []
    for d in range(D):
        busy = busy_compute[d] + transfer_seconds(sent[d] + ([request_wire, response_wire] if d == owner else []), devices[d])
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
