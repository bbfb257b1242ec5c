"""The reading: what a collector hands to the stream, and what the Kafka envelope carries.

One `Reading` is one poll of one device (or one MQTT message batch for one device): many
points at one timestamp, with the device's per-device sequence number so that the sink can
see gaps and drop duplicates. The wire form (`podwatch.telemetry.v1`) is the JSON object of
`Reading.to_envelope()`; `docs/kafka.md` documents it and `podwatch/stream/schema/` holds
its JSON Schema.

Envelope (schema version 1):
    {"v": 1, "site": "demo", "device": "pdu-m1-r01-a", "seq": 4211, "ts": 1732240000123,
     "quality": "good", "points": {"pdu.power_kw": 66.1, "pdu.l1.voltage_v": 239.8, ...},
     "pq": {"pdu.l2.current_a": "bad"}}
- `ts`: milliseconds since the Unix epoch (UTC) when the device was read.
- `quality`: the reading's quality; `pq` (optional) overrides it per point.
- a point's value is a finite float, or null when its quality is "bad".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

SCHEMA_VERSION = 1


class Quality(StrEnum):
    GOOD = "good"
    STALE = "stale"  # value repeated from an earlier read (device answered, value did not refresh)
    BAD = "bad"  # value could not be read or decoded

    @property
    def code(self) -> int:
        """Small integer for storage: good=0, stale=1, bad=2."""
        return _QUALITY_CODES[self]


_QUALITY_CODES = {Quality.GOOD: 0, Quality.STALE: 1, Quality.BAD: 2}


@dataclass(slots=True)
class Reading:
    site: str
    device: str
    seq: int
    ts_ms: int
    points: dict[str, float | None]
    quality: Quality = Quality.GOOD
    point_quality: dict[str, Quality] = field(default_factory=dict)

    def to_envelope(self) -> dict:
        env = {
            "v": SCHEMA_VERSION,
            "site": self.site,
            "device": self.device,
            "seq": self.seq,
            "ts": self.ts_ms,
            "quality": str(self.quality),
            "points": {k: (None if v is None or not math.isfinite(v) else float(v)) for k, v in self.points.items()},
        }
        if self.point_quality:
            env["pq"] = {k: str(q) for k, q in self.point_quality.items()}
        return env

    @classmethod
    def from_envelope(cls, env: dict) -> "Reading":
        """Inverse of `to_envelope`; raises KeyError/ValueError/TypeError on a malformed envelope."""
        if env["v"] != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema version {env['v']!r}")
        return cls(
            site=str(env["site"]),
            device=str(env["device"]),
            seq=int(env["seq"]),
            ts_ms=int(env["ts"]),
            points=dict(env["points"]),
            quality=Quality(env.get("quality", "good")),
            point_quality={k: Quality(q) for k, q in env.get("pq", {}).items()},
        )
