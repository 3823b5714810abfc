"""Device profiles: memory, sustained compute, power and network link of edge devices, as data.

The catalogue lives in `profiles.json` beside this module ("format": "nonn.devices/1"), each
figure with a `sources` entry saying where it comes from. A user file in the same format adds
profiles or overrides fields of existing ones (`load_profiles("my.json")`, `--profiles`).

Device lists are written `rpi3b+:4,x86` (a comma list of profile names, `:N` repeating one)
and parsed here, in one place, by `parse_device_list` for every command that takes devices.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from nonn.artifacts import ArtifactError, read_json_artifact

__all__ = [
    "PROFILES_FORMAT",
    "BUILTIN_PROFILES",
    "Power",
    "Link",
    "DeviceProfile",
    "load_profiles",
    "parse_device_list",
]

PROFILES_FORMAT = "nonn.devices/1"
BUILTIN_PROFILES = Path(__file__).with_name("profiles.json")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Power:
    """Board power draw in watts: idle, and with all cores busy."""

    idle: float
    active: float


@dataclass(frozen=True)
class Link:
    """Network link: bandwidth (Mbit/s, each direction), round-trip latency (ms), packet loss."""

    bandwidth_mbps: float
    latency_ms: float
    loss: float = 0.0


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of device, as the planner and the simulator see it."""

    name: str
    memory_mb: float
    gflops: float  # sustained compute, GFLOP/s
    power_w: Power
    link: Link
    threads: int
    reserved_mb: float = 0.0  # memory the OS keeps for itself
    description: str = ""
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @property
    def available_mb(self) -> float:
        """Memory left for the inference runtime and its model."""
        return self.memory_mb - self.reserved_mb

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"] = dict(self.sources)
        return d

    @classmethod
    def from_dict(cls, name: str, obj: Mapping[str, Any], source: str = "profile") -> "DeviceProfile":
        """Build and validate; errors name the source file, the profile and the field."""

        def fail(key: str, message: str) -> None:
            raise ArtifactError(f"{source}: profile {name!r}: {key}: {message}")

        def number(container: Mapping[str, Any], key: str, where: str, positive: bool = True, default: Any = None) -> float:
            value = container.get(key, default)
            if value is None:
                fail(where, "missing required field")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (value <= 0 if positive else value < 0):
                fail(where, f"expected a {'positive' if positive else 'non-negative'} number, got {value!r}")
            return float(value)

        if not isinstance(obj, Mapping):
            fail("profile", f"expected an object, got {type(obj).__name__}")
        if not _NAME_RE.match(name):
            fail("name", "letters, digits and _ . + - only")
        power = obj.get("power_w")
        link = obj.get("link")
        if not isinstance(power, Mapping):
            fail("power_w", "expected an object with idle and active watts")
        if not isinstance(link, Mapping):
            fail("link", "expected an object with bandwidth_mbps and latency_ms")
        loss = number(link, "loss", "link.loss", positive=False, default=0.0)
        if loss >= 1:
            fail("link.loss", f"expected a probability below 1, got {loss}")
        threads = obj.get("threads", 1)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            fail("threads", f"expected a positive integer, got {threads!r}")
        sources = obj.get("sources", {})
        if not isinstance(sources, Mapping) or not all(isinstance(v, str) for v in sources.values()):
            fail("sources", "expected an object of strings (field -> where the figure comes from)")
        profile = cls(
            name=name,
            memory_mb=number(obj, "memory_mb", "memory_mb"),
            gflops=number(obj, "gflops", "gflops"),
            power_w=Power(idle=number(power, "idle", "power_w.idle", positive=False), active=number(power, "active", "power_w.active")),
            link=Link(
                bandwidth_mbps=number(link, "bandwidth_mbps", "link.bandwidth_mbps"),
                latency_ms=number(link, "latency_ms", "link.latency_ms", positive=False),
                loss=loss,
            ),
            threads=threads,
            reserved_mb=number(obj, "reserved_mb", "reserved_mb", positive=False, default=0.0),
            description=str(obj.get("description", "")),
            sources=dict(sources),
        )
        if profile.available_mb <= 0:
            fail("reserved_mb", f"{profile.reserved_mb} MB reserved leaves nothing of {profile.memory_mb} MB")
        if profile.power_w.idle > profile.power_w.active:
            fail("power_w", f"idle ({profile.power_w.idle} W) exceeds active ({profile.power_w.active} W)")
        return profile


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Override fields of a profile, recursing into power_w, link and sources."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_catalogue(path: Path) -> dict[str, Any]:
    obj = read_json_artifact(path, PROFILES_FORMAT)
    profiles = obj.get("profiles")
    if not isinstance(profiles, dict):
        raise ArtifactError(f"{path}: profiles: expected an object of name -> profile")
    return profiles


def load_profiles(extra_file: str | os.PathLike[str] | None = None) -> dict[str, DeviceProfile]:
    """The built-in profiles, plus/overridden by `extra_file` (same format; partial overrides
    of an existing profile keep its other fields). Keys are lower-case profile names."""
    raw = {name.lower(): spec for name, spec in _read_catalogue(BUILTIN_PROFILES).items()}
    sources = {name: str(BUILTIN_PROFILES) for name in raw}
    if extra_file is not None:
        path = Path(extra_file)
        for name, spec in _read_catalogue(path).items():
            key = name.lower()
            if not isinstance(spec, Mapping):
                raise ArtifactError(f"{path}: profile {name!r}: expected an object, got {type(spec).__name__}")
            raw[key] = _merge(raw[key], spec) if key in raw else dict(spec)
            sources[key] = str(path)
    return {name: DeviceProfile.from_dict(name, spec, source=sources[name]) for name, spec in raw.items()}


_ITEM_RE = re.compile(r"^\s*([^:\s]+)\s*(?::\s*(\S+)\s*)?$")


def parse_device_list(text: str, profiles: Mapping[str, DeviceProfile] | None = None) -> list[DeviceProfile]:
    """Parse `rpi3b+:4,x86` into one DeviceProfile per device (names are case-insensitive).

    Raises ValueError naming the bad item and what was expected.
    """
    if profiles is None:
        profiles = load_profiles()
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"device list {text!r} is empty; expected e.g. rpi3b+:4 or rpi4b,jetson-nano")
    devices: list[DeviceProfile] = []
    for item in text.split(","):
        match = _ITEM_RE.match(item)
        if not match:
            raise ValueError(f"device list {text!r}: item {item.strip()!r} is not NAME or NAME:COUNT")
        name, count_text = match.group(1).lower(), match.group(2)
        if name not in profiles:
            raise ValueError(f"device list {text!r}: unknown device profile {name!r}; known: {', '.join(sorted(profiles))}")
        count = 1
        if count_text is not None:
            if not count_text.isdigit() or int(count_text) < 1:
                raise ValueError(f"device list {text!r}: count {count_text!r} for {name} must be a positive integer")
            count = int(count_text)
        devices.extend([profiles[name]] * count)
    return devices
