"""The delay model of a device's network link: what a call costs on a link of a given profile.

Per device link, full duplex, each direction independent (`LinkModel`, `LinkDirection`):

* a chunk of ``n`` bytes takes ``n * 8 / (bandwidth_mbps * 1e6)`` seconds to transmit; chunks
  queue FIFO behind each other on the link (concurrent calls share the bandwidth);
* it arrives ``latency_ms / 2`` after its transmission ends (``latency_ms`` is the round trip);
* it is cut into TCP segments of ``mss`` bytes; each segment is lost with probability
  ``loss`` and every lost segment delays the chunk by one retransmission timeout,
  ``rto_ms = 200 + latency_ms`` (Linux's minimum RTO plus one round trip);
* bytes are delivered in order (a delayed chunk holds back the ones behind it, as TCP does).

So an idle link answers a call with ``q`` request bytes and ``r`` response bytes after
``latency_ms + (q + r) * 8 / bandwidth`` plus the expected loss penalty
(``LinkModel.call_time_s``). The same figures become `tc ... netem` arguments for the kernel.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_MSS", "DELAY_MODEL_TEXT", "LinkModel", "LinkDirection"]

DEFAULT_MSS = 1448  # TCP payload per segment on a 1500-byte MTU with timestamps

DELAY_MODEL_TEXT = (
    "per device link, each direction: chunks queue FIFO at bandwidth_mbps, arrive latency_ms/2 after "
    "transmission, each lost TCP segment (probability loss) adds 200 ms + latency_ms; in-order delivery"
)


@dataclass(frozen=True)
class LinkModel:
    """One device's link: bandwidth (Mbit/s, each direction), round-trip latency (ms), loss."""

    bandwidth_mbps: float | None = None  # None or <= 0: unlimited
    latency_ms: float = 0.0
    loss: float = 0.0  # probability that one segment is lost
    mss: int = DEFAULT_MSS

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or not math.isfinite(self.latency_ms):
            raise ValueError(f"link latency_ms must be a finite number >= 0, got {self.latency_ms!r}")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"link loss must be a fraction in [0, 1), got {self.loss!r}")
        if self.bandwidth_mbps is not None and not math.isfinite(self.bandwidth_mbps):
            raise ValueError(f"link bandwidth_mbps must be finite, got {self.bandwidth_mbps!r}")
        if self.mss < 1:
            raise ValueError(f"mss must be >= 1, got {self.mss!r}")

    @classmethod
    def from_profile(cls, profile: Any) -> "LinkModel":
        """The link of a DeviceProfile or profile dict (its `link`), or of a link itself."""
        if isinstance(profile, dict):
            link = profile["link"] if "link" in profile else profile
        else:
            link = getattr(profile, "link", profile)
        if link is None:
            return cls()

        def get(name: str, default: float | None) -> Any:
            value = link.get(name, default) if isinstance(link, dict) else getattr(link, name, default)
            return default if value is None else value

        bandwidth = get("bandwidth_mbps", None)
        return cls(
            bandwidth_mbps=float(bandwidth) if bandwidth is not None else None,
            latency_ms=float(get("latency_ms", 0.0)),
            loss=float(get("loss", 0.0)),
        )

    @property
    def unlimited(self) -> bool:
        return self.bandwidth_mbps is None or self.bandwidth_mbps <= 0

    @property
    def one_way_s(self) -> float:
        return self.latency_ms / 2000.0

    @property
    def rto_s(self) -> float:
        """Retransmission timeout charged per lost segment."""
        return (200.0 + self.latency_ms) / 1000.0

    def transmit_s(self, nbytes: int) -> float:
        """Seconds to put `nbytes` on the wire at the link's bandwidth."""
        return 0.0 if self.unlimited else nbytes * 8.0 / (float(self.bandwidth_mbps) * 1e6)  # type: ignore[arg-type]

    def segments(self, nbytes: int) -> int:
        return max(1, math.ceil(nbytes / self.mss))

    def call_time_s(self, request_bytes: int, response_bytes: int, expected_loss: bool = True) -> float:
        """Time of one call on an idle link: round trip + transmission (+ expected loss penalty)."""
        t = self.latency_ms / 1000.0 + self.transmit_s(request_bytes) + self.transmit_s(response_bytes)
        if expected_loss and self.loss > 0:
            lost = (self.segments(request_bytes) + self.segments(response_bytes)) * self.loss
            t += lost * self.rto_s
        return t

    def netem_args(self) -> list[str]:
        """`tc qdisc ... netem` arguments for one direction of this link."""
        args = ["netem", "delay", f"{self.latency_ms / 2:.3f}ms"]
        if not self.unlimited:
            args += ["rate", f"{float(self.bandwidth_mbps) * 1000:.0f}kbit"]  # type: ignore[arg-type]
        if self.loss > 0:
            args += ["loss", f"{self.loss * 100:.4f}%"]
        return args


class LinkDirection:
    """One direction of a link: FIFO transmission queue, propagation delay, segment loss."""

    def __init__(self, model: LinkModel, rng: random.Random) -> None:
        self.model = model
        self.rng = rng
        self.free_at = 0.0
        self.bytes = 0
        self.lost_segments = 0

    def schedule(self, nbytes: int, now: float) -> float:
        """Arrival time of a chunk of `nbytes` handed to the link at `now` (before ordering)."""
        start = max(now, self.free_at)
        self.free_at = start + self.model.transmit_s(nbytes)
        arrival = self.free_at + self.model.one_way_s
        if self.model.loss > 0:
            lost = sum(1 for _ in range(self.model.segments(nbytes)) if self.rng.random() < self.model.loss)
            self.lost_segments += lost
            arrival += lost * self.model.rto_s
        self.bytes += nbytes
        return arrival
