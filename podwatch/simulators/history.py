"""History mode: N days of simulated samples written straight to Parquet, for model training.

`generate_history(site, days, resolution_s, scenarios, seed, out_dir)` writes

* `samples.parquet` — the storage's long format, one row per (time, device, metric):
  `ts` (timestamp ms, UTC), `device` (string, dictionary-encoded), `metric` (canonical name),
  `value` (float64, null when the sensor gave no value), `quality` (uint8: 0 good, 2 bad — the
  codes of `podwatch.samples.Quality`). One row group per simulated day, rows sorted by metric,
  device, time within a day. Only the metrics each device's profile serves are written; while a
  device fault is active the device has no rows (a collector would have read nothing).
* `truth.json`, `truth_faults.parquet`, `truth_breaches.parquet` — ground truth (`truth.py`).
* `manifest.json` — site, seed, start, days, resolution, scenario names, row count.

How it stays fast (90 days of 1-minute data for the demo site in well under a minute): the load
(Azure trace + diurnal envelope), the fault modifiers, the electrical detail, the sensor noise and
the Parquet columns are computed for a whole day at once with numpy; only the thermal/hydraulic
core — which has memory (temperatures, throttling, pumps, reservoir) — steps row by row, on
arrays over racks and CDUs. The physics step is the output resolution: lags shorter than a step
are integrated exactly by the first-order solution; throttling and standby takeover resolve to
one step.

Randomised fault episodes (`random_episodes_per_day`, see `scenario.random_scenario`) make
training sets with many labelled failures; given scenarios are added on top (their onsets are
seconds from the history's start).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from podwatch.collectors.profiles import load_profile
from podwatch.site import Site
from podwatch.simulators.engine import fault_records
from podwatch.simulators.observe import Observer
from podwatch.simulators.physics import SNAPSHOT_FIELDS, SitePhysics, Snapshot
from podwatch.simulators.scenario import Scenario, SensorFaultState, apply_sensor_faults, merge, random_scenario
from podwatch.simulators.truth import BreachTracker, GroundTruth
from podwatch.simulators.workload import demand_fraction

QUALITY_GOOD, QUALITY_BAD = 0, 2


@dataclass
class HistoryResult:
    out_dir: Path
    samples_path: Path
    rows: int
    start_ms: int
    end_ms: int
    truth: GroundTruth
    seconds: float


def default_start_ms(days: float, resolution_s: int) -> int:
    """Midnight UTC today minus `days`: the history ends where a live run would begin."""
    now = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return int(now.timestamp() * 1000) - int(days * 86400 * 1000)


SUBSTEP_S = 1.0  # physics step inside an output step where a fault starts or ends abruptly


def abrupt_change_finder(scenario: Scenario, resolution_s: float) -> Callable[[float, float], bool] | None:
    """A test `(t0, t1) -> bool`: does a fault change the physics abruptly inside the step (t0, t1]?

    The physics takes each step's modifiers at its end and holds them over the whole step, so at
    coarse steps a pump trip, a load step or a stepped restriction would act up to one step early
    and a breach come up to one step (plus the flow lag) before it does at 1 s. The steps holding
    such an instant (`abrupt_instants_s` of each fault: onset, end, a pump's trip, the standby's
    takeover) are run in 1 s sub-steps instead (a handful per fault, so history mode stays fast).
    Ramps change continuously and need none. None when the resolution is already that fine."""
    if resolution_s <= SUBSTEP_S:
        return None
    instants: list[float] = []
    for f in scenario.faults:
        if f.kind not in ("sensor_fault", "device_fault"):  # those change what devices report, not the physics
            instants += f.abrupt_instants_s()
    if not instants:
        return None
    marks = np.sort(np.asarray(instants))

    def inside(t0: float, t1: float) -> bool:
        # (t0, t1]: an instant in the previous step's last sub-step belongs to that step
        i = int(np.searchsorted(marks, t0, side="right"))
        return i < marks.size and marks[i] <= t1

    return inside


def _substeps(physics: SitePhysics, tracker: BreachTracker, scenario: Scenario, site: Site, t0: float,
              resolution_s: float, start_ms: int, tz: str) -> Snapshot:
    """Advance one output step (t0, t0 + resolution_s] in `SUBSTEP_S` physics steps, each with the
    load and fault modifiers of its own time; returns the state at the step's end."""
    n = max(1, int(round(resolution_s / SUBSTEP_S)))
    dt = resolution_s / n
    t_sub = t0 + dt * (np.arange(n) + 1.0)
    demand = demand_fraction(t_sub, t_sub + start_ms / 1000.0, physics.load, tz) * physics.topo.rated_kw
    mods = scenario.modifiers(t_sub, site)
    snap = None
    for k in range(n):
        snap = physics.step(dt, float(t_sub[k]), demand[k], mods, k)
        tracker.update(float(t_sub[k]), snap.rack_return_c[0])
    assert snap is not None
    return snap


def generate_history(site: Site, days: float, resolution_s: int = 60, scenarios: list[Scenario] | None = None,
                     seed: int = 0, out_dir: str | Path = "history", start_ms: int | None = None,
                     random_episodes_per_day: float = 0.0,
                     progress: Callable[[float, float], None] | None = None) -> HistoryResult:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if days <= 0:
        raise ValueError("days must be > 0")
    if resolution_s <= 0:
        raise ValueError("resolution_s must be > 0")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total_s = days * 86400.0
    start_ms = default_start_ms(days, resolution_s) if start_ms is None else int(start_ms)
    parts = list(scenarios or [])
    if random_episodes_per_day > 0:
        parts.append(random_scenario(site, total_s, random_episodes_per_day, seed))
    for s in parts:
        errors = s.check(site)
        if errors:
            from podwatch.errors import ConfigError

            raise ConfigError(f"scenario {s.name}", errors)
    scenario = merge(parts) if parts else Scenario(name="none")

    physics = SitePhysics(site, seed)
    observer = Observer(site, physics.topo, seed)
    sensor_state = SensorFaultState(seed)
    truth = GroundTruth(site=site.id, start_ms=start_ms, seed=seed, scenario=scenario.name,
                        faults=fault_records(scenario, site, start_ms))
    topo = physics.topo
    tracker = BreachTracker(truth, topo.rack_ids, [site.rack(r).cdu for r in topo.rack_ids], topo.return_limit_c,
                            [(f, set(f.racks)) for f in truth.faults])
    tz = site.spec.site.timezone

    # which metrics each device serves (its profile), as column masks per observation group
    served = {d.id: {p.metric for p in load_profile(d.profile, site.profiles_dir).points}
              for d in site.devices if d.enabled}
    device_names = [d.id for g in observer.devices.values() for d in g]
    device_code = {name: i for i, name in enumerate(device_names)}
    metric_names: list[str] = []
    metric_code: dict[str, int] = {}

    schema = pa.schema([("ts", pa.timestamp("ms", tz="UTC")), ("device", pa.dictionary(pa.int32(), pa.string())),
                        ("metric", pa.dictionary(pa.int32(), pa.string())), ("value", pa.float64()),
                        ("quality", pa.uint8())])
    samples_path = out / "samples.parquet"
    writer = pq.ParquetWriter(samples_path, schema, compression="zstd", use_dictionary=["device", "metric"])
    def emit(buffers: dict[str, np.ndarray], t: np.ndarray, steps: int) -> int:
        """Observation, sensor/device faults, long-format columns and the Parquet write for one
        chunk. Runs in the writer thread (one at a time, in order) while the physics steps on."""
        obs = observer.observe(Snapshot(**buffers), start_ms)
        apply_sensor_faults(scenario, obs, sensor_state)

        ts_parts, dev_parts, met_parts, val_parts = [], [], [], []
        for group in obs.groups.values():
            if not group.devices:
                continue
            keep_rows = np.ones((steps, len(group.devices)), dtype=bool)
            for f in dev_faults:
                for j, d in enumerate(group.devices):
                    if d.id == f.target:
                        keep_rows[:, j] &= ~f.active(t)
            codes = np.array([device_code[d.id] for d in group.devices], dtype=np.int32)
            for metric, values in group.values.items():
                cols = np.array([metric in served[d.id] for d in group.devices])
                if not cols.any():
                    continue
                if metric not in metric_code:
                    metric_code[metric] = len(metric_names)
                    metric_names.append(metric)
                v = values[:, cols].T  # device-major: each device's series is contiguous
                keep = keep_rows[:, cols].T
                n_dev = v.shape[0]
                ts_block = np.broadcast_to(obs.ts_ms, (n_dev, steps))
                dev_block = np.broadcast_to(codes[cols][:, None], (n_dev, steps))
                if keep.all():
                    ts_parts.append(ts_block.ravel())
                    dev_parts.append(dev_block.ravel())
                    val_parts.append(v.ravel())
                else:
                    ts_parts.append(ts_block[keep])
                    dev_parts.append(dev_block[keep])
                    val_parts.append(v[keep])
                met_parts.append(np.full(val_parts[-1].size, metric_code[metric], dtype=np.int32))
        values = np.concatenate(val_parts)
        bad = np.isnan(values)
        table = pa.Table.from_arrays([
            pa.array(np.concatenate(ts_parts), pa.timestamp("ms", tz="UTC")),
            pa.DictionaryArray.from_arrays(pa.array(np.concatenate(dev_parts), pa.int32()),
                                           pa.array(device_names, pa.string())),
            pa.DictionaryArray.from_arrays(pa.array(np.concatenate(met_parts), pa.int32()),
                                           pa.array(metric_names, pa.string())),
            pa.array(values, pa.float64(), mask=bad),
            pa.array(np.where(bad, QUALITY_BAD, QUALITY_GOOD).astype(np.uint8), pa.uint8()),
        ], schema=schema)
        writer.write_table(table)
        return table.num_rows

    # numpy and Parquet encoding release the GIL: emit day k in a thread while the physics steps day k+1
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history-writer")
    pending: Future | None = None
    n_steps = int(round(total_s / resolution_s))
    chunk = max(1, int(86400 // resolution_s))
    rows_total = 0
    dev_faults = scenario.device_faults
    substeps_at = abrupt_change_finder(scenario, resolution_s)
    try:
        for c0 in range(0, n_steps, chunk):
            steps = min(chunk, n_steps - c0)
            t = (np.arange(c0, c0 + steps) + 1) * float(resolution_s)
            demand = demand_fraction(t, t + start_ms / 1000.0, physics.load, tz) * topo.rated_kw
            mods = scenario.modifiers(t, site)
            buffers: dict[str, np.ndarray] | None = None
            for i in range(steps):
                if substeps_at is not None and substeps_at(float(t[i]) - resolution_s, float(t[i])):
                    snap = _substeps(physics, tracker, scenario, site, float(t[i]) - resolution_s,
                                     float(resolution_s), start_ms, tz)
                else:
                    snap = physics.step(float(resolution_s), float(t[i]), demand[i], mods, i)
                    tracker.update(float(t[i]), snap.rack_return_c[0])
                if buffers is None:
                    buffers = {name: np.empty((steps,) + getattr(snap, name).shape[1:],
                                              dtype=getattr(snap, name).dtype) for name in SNAPSHOT_FIELDS}
                for name in SNAPSHOT_FIELDS:
                    buffers[name][i] = getattr(snap, name)[0]
            if pending is not None:
                rows_total += pending.result()
            pending = pool.submit(emit, buffers, t, steps)
            if progress is not None:
                progress(min(days, (c0 + steps) * resolution_s / 86400.0), days)
        if pending is not None:
            rows_total += pending.result()
    finally:
        pool.shutdown(wait=True)
        writer.close()

    end_ms = start_ms + int(n_steps * resolution_s * 1000)
    truth.write_json(out / "truth.json")
    truth.write_parquet(out)
    (out / "manifest.json").write_text(json.dumps({
        "site": site.id, "seed": seed, "start_ms": start_ms, "end_ms": end_ms, "days": days,
        "resolution_s": resolution_s, "scenarios": [s.name for s in parts], "rows": rows_total,
        "faults": len(truth.faults), "breaches": len(truth.breaches),
        "columns": ["ts", "device", "metric", "value", "quality"]}, indent=1) + "\n")
    return HistoryResult(out, samples_path, rows_total, start_ms, end_ms, truth, time.perf_counter() - started)
