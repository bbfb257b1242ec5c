"""Ground truth: when each fault started and ended, and every moment a rack's coolant return
crossed its limit (the breach a detector must lead), so detection can be scored.

A breach is an upward crossing of the rack's `return_limit_c`; the crossing time is interpolated
between the two physics steps around it. After a breach the rack must cool 1 K below its limit
before another crossing counts as a new breach. Each breach names the physical faults that were
active on that rack's CDU or the rack itself at the time (`causes`).

Written as JSON (`truth.json`) and Parquet (`truth_faults.parquet`, `truth_breaches.parquet`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REARM_K = 1.0


@dataclass
class FaultRecord:
    id: str
    kind: str
    target: str
    onset_ms: int
    end_ms: int | None
    magnitude: float | None
    racks: list[str]
    params: dict
    # A worn pump's protection trip: an abrupt worsening inside a slow fault. Nothing in the
    # telemetry announces it, so a breach soon after it is scored from the trip, not the onset.
    trip_ms: int | None = None


@dataclass
class Breach:
    rack: str
    cdu: str
    ts_ms: int
    return_c: float
    limit_c: float
    causes: list[str]


@dataclass
class GroundTruth:
    site: str
    start_ms: int
    seed: int
    scenario: str
    faults: list[FaultRecord] = field(default_factory=list)
    breaches: list[Breach] = field(default_factory=list)

    def first_breach_ms(self, rack: str) -> int | None:
        times = [b.ts_ms for b in self.breaches if b.rack == rack]
        return min(times) if times else None

    @property
    def breached_racks(self) -> list[str]:
        return sorted({b.rack for b in self.breaches})

    def to_dict(self) -> dict:
        return {"site": self.site, "start_ms": self.start_ms, "seed": self.seed, "scenario": self.scenario,
                "faults": [asdict(f) for f in self.faults], "breaches": [asdict(b) for b in self.breaches]}

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def read_json(cls, path: str | Path) -> "GroundTruth":
        d = json.loads(Path(path).read_text())
        return cls(site=d["site"], start_ms=d["start_ms"], seed=d["seed"], scenario=d["scenario"],
                   faults=[FaultRecord(**f) for f in d["faults"]], breaches=[Breach(**b) for b in d["breaches"]])

    def write_parquet(self, out_dir: str | Path) -> tuple[Path, Path]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ts = pa.timestamp("ms", tz="UTC")
        faults = pa.table({
            "fault_id": pa.array([f.id for f in self.faults], pa.string()),
            "kind": pa.array([f.kind for f in self.faults], pa.string()),
            "target": pa.array([f.target for f in self.faults], pa.string()),
            "onset": pa.array([f.onset_ms for f in self.faults], ts),
            "end": pa.array([f.end_ms for f in self.faults], ts),
            "magnitude": pa.array([f.magnitude for f in self.faults], pa.float64()),
            "racks": pa.array([f.racks for f in self.faults], pa.list_(pa.string())),
            "params": pa.array([json.dumps(f.params) for f in self.faults], pa.string()),
        })
        breaches = pa.table({
            "rack": pa.array([b.rack for b in self.breaches], pa.string()),
            "cdu": pa.array([b.cdu for b in self.breaches], pa.string()),
            "ts": pa.array([b.ts_ms for b in self.breaches], ts),
            "return_c": pa.array([b.return_c for b in self.breaches], pa.float64()),
            "limit_c": pa.array([b.limit_c for b in self.breaches], pa.float64()),
            "causes": pa.array([b.causes for b in self.breaches], pa.list_(pa.string())),
        })
        fp, bp = out / "truth_faults.parquet", out / "truth_breaches.parquet"
        pq.write_table(faults, fp)
        pq.write_table(breaches, bp)
        return fp, bp


class BreachTracker:
    """Watches rack return temperatures step by step and records breaches into a GroundTruth."""

    def __init__(self, truth: GroundTruth, rack_ids: list[str], rack_cdus: list[str], limits: np.ndarray,
                 fault_racks: list[tuple[FaultRecord, set[str]]]) -> None:
        self.truth = truth
        self.rack_ids, self.rack_cdus = rack_ids, rack_cdus
        self.limits = limits
        self.armed = np.ones(len(rack_ids), dtype=bool)
        self.prev_t: float | None = None
        self.prev_ret: np.ndarray | None = None
        self.fault_racks = fault_racks

    def update(self, t_s: float, return_c: np.ndarray) -> list[Breach]:
        over = return_c > self.limits
        new = over & self.armed
        found = []
        if new.any():
            for i in np.flatnonzero(new):
                when = t_s
                if self.prev_t is not None and self.prev_ret is not None and return_c[i] > self.prev_ret[i]:
                    frac = (self.limits[i] - self.prev_ret[i]) / (return_c[i] - self.prev_ret[i])
                    when = self.prev_t + float(np.clip(frac, 0.0, 1.0)) * (t_s - self.prev_t)
                ts_ms = self.truth.start_ms + int(round(when * 1000.0))
                rack = self.rack_ids[i]
                causes = [f.id for f, racks in self.fault_racks
                          if rack in racks and f.onset_ms <= ts_ms and (f.end_ms is None or ts_ms < f.end_ms)]
                b = Breach(rack, self.rack_cdus[i], ts_ms, float(return_c[i]), float(self.limits[i]), causes)
                self.truth.breaches.append(b)
                found.append(b)
        self.armed = np.where(new, False, self.armed | (return_c < self.limits - REARM_K))
        self.prev_t, self.prev_ret = t_s, return_c.copy()
        return found
