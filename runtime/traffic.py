"""Bytes per inference: the one definition that `plan`, `simulate`, `infer` and the reports use.

An inference is one image. Its bytes, per device and summed over the devices:

- request bytes sent: the serialised ModelInfer request messages the aggregator sends to the
  devices (the image, once per student);
- features sent back: the serialised ModelInfer reply messages the devices send back (each
  student's feature vector);
- bytes between devices: what the devices send each other (only a layer-wise split of the
  teacher does; NoNN's students never talk to each other);
- wire bytes: all of the above as the devices' TCP connections carry them, with gRPC's message
  prefix and HTTP/2's frames and headers (TCP/IP headers not counted). `simulate` measures them
  at each device's link, connection upkeep and retries included; `plan` estimates them;
  `infer` cannot see them (None).

Measured figures are totals over a run divided by the images answered. The plan's figures are
the exact message sizes of one image (batch 1) built with the protocol's own messages, and the
HTTP/2 framing of `wire_bytes`. The teacher on one device has no features: its "features sent
back" are its logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

__all__ = [
    "BytesPerInference",
    "LABELS",
    "FIELDS",
    "DEVICE_FIELDS",
    "UNIT",
    "column",
    "describe",
    "message_bytes",
    "wire_bytes",
    "link_bytes",
    "GRPC_PREFIX_BYTES",
    "HTTP2_FRAME_HEADER_BYTES",
    "HTTP2_MAX_FRAME",
    "HPACK_HEADER_BYTES",
    "TCP_IP_HEADER_BYTES",
    "TCP_MSS",
]

GRPC_PREFIX_BYTES = 5
HTTP2_FRAME_HEADER_BYTES = 9
HTTP2_MAX_FRAME = 16384
HPACK_HEADER_BYTES = 20  # an indexed header block on a warm connection (assumption)
TCP_IP_HEADER_BYTES = 52  # IPv4 20 + TCP 20 + timestamp option 12
TCP_MSS = 1448
REQUEST_ID_DIGITS = 4  # the aggregator numbers requests 0, 1, 2, ...; the reply echoes the id

FIELDS = ("request", "features", "between_devices", "wire")
DEVICE_FIELDS = ("request", "features", "wire")  # per device of a NoNN fleet (students never talk)
LABELS = {
    "request": "request bytes sent",
    "features": "features sent back",
    "between_devices": "bytes between devices",
    "wire": "wire bytes",
}
UNIT = "B/inference"


def column(field: str) -> str:
    """A table column or row name: the label and the unit, e.g. "features sent back (B/inference)"."""
    return f"{LABELS[field]} ({UNIT})"


@dataclass(frozen=True)
class BytesPerInference:
    """Bytes per inference of one device or of a whole fleet (see the module docstring)."""

    request: float
    features: float
    wire: float | None = None
    between_devices: float = 0.0

    @classmethod
    def measured(cls, request_total: float, features_total: float, images: int, wire_total: float | None = None) -> "BytesPerInference":
        """Totals over a run, per image answered (`images` 0 gives zeros, not a division error)."""
        n = max(int(images), 1)
        return cls(
            request=round(request_total / n, 1),
            features=round(features_total / n, 1),
            wire=None if wire_total is None else round(wire_total / n, 1),
        )

    @classmethod
    def total(cls, parts: Iterable["BytesPerInference"]) -> "BytesPerInference":
        """The sum over devices (wire None when any part has none)."""
        parts = list(parts)
        wires = [p.wire for p in parts]
        return cls(
            request=round(sum(p.request for p in parts), 1),
            features=round(sum(p.features for p in parts), 1),
            wire=None if not parts or any(w is None for w in wires) else round(sum(wires), 1),  # type: ignore[arg-type]
            between_devices=round(sum(p.between_devices for p in parts), 1),
        )

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BytesPerInference":
        return cls(**{f: data.get(f) for f in ("request", "features", "wire")}, between_devices=data.get("between_devices") or 0.0)


def describe(b: BytesPerInference | dict[str, Any]) -> str:
    """One line: "request bytes sent 114 B, features sent back 56 B, wire bytes 290 B per inference"."""
    d = b.to_dict() if isinstance(b, BytesPerInference) else b
    parts = [f"{LABELS[f]} {d[f]:.0f} B" for f in FIELDS if d.get(f) is not None and (f != "between_devices" or d[f])]
    return ", ".join(parts) + " per inference" + (" (wire bytes not measured)" if d.get("wire") is None else "")


def message_bytes(model: str, tensor: str, shape: Sequence[int], datatype: str = "FP32", response: bool = False,
                  output: str = "output") -> int:  # fmt: skip
    """Exact serialised size of a ModelInfer request (or reply) carrying one raw tensor, as the
    aggregator builds it (a request asks for the one `output`; ids of REQUEST_ID_DIGITS digits)."""
    from nonn.runtime.datatypes import itemsize
    from nonn.runtime.protocol import pb

    raw = bytes(math.prod(int(d) for d in shape) * itemsize(datatype))
    request_id = "0" * REQUEST_ID_DIGITS
    if response:
        msg = pb.ModelInferResponse(model_name=model, model_version="1", id=request_id)
        out = msg.outputs.add()
        out.name, out.datatype = tensor, datatype
        out.shape.extend(int(d) for d in shape)
        msg.raw_output_contents.append(raw)
    else:
        msg = pb.ModelInferRequest(model_name=model, id=request_id)
        inp = msg.inputs.add()
        inp.name, inp.datatype = tensor, datatype
        inp.shape.extend(int(d) for d in shape)
        msg.outputs.add().name = output
        msg.raw_input_contents.append(raw)
    return msg.ByteSize()


def wire_bytes(message: int, response: bool) -> int:
    """Wire bytes of one gRPC message of `message` serialised bytes: the 5-byte prefix, HTTP/2 DATA
    frames, one HEADERS frame for a request (HEADERS and trailers for a reply) and their header
    blocks."""
    body = message + GRPC_PREFIX_BYTES
    header_frames = 2 if response else 1
    data_frames = max(1, math.ceil(body / HTTP2_MAX_FRAME))
    return body + HTTP2_FRAME_HEADER_BYTES * (data_frames + header_frames) + HPACK_HEADER_BYTES * header_frames


def link_bytes(wire: float) -> float:
    """What a link transmits for `wire` bytes: TCP/IPv4 headers added per MSS-sized segment (for
    transfer times; not part of the wire bytes reported)."""
    return wire + TCP_IP_HEADER_BYTES * math.ceil(wire / TCP_MSS)
