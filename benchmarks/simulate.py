"""Simulator benchmarks (not tests): run `python benchmarks/simulate.py`.

1. Live mode, reference-10mw site (72 racks, 153 Modbus devices, 72 MQTT devices) at 1 Hz: CPU per
   simulated second for the physics step alone, and for physics + observation + encoding every
   served register + pymodbus `async_setValues` (servers listening on loopback, no clients), printed
   as a share of one core at real time. Reference measured in the same run: a bare numpy loop of the
   same number of small-array operations.
2. History mode: 90 days of 1-minute data for the demo site to Parquet (goal: < 60 s), next to the
   time pyarrow alone needs to write the same rows (the floor for any generator).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

import sys

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cpu() -> float:
    return time.process_time()


async def live(seconds: int) -> dict:
    from podwatch import procs
    from podwatch.simulators.engine import Simulator
    from podwatch.site import load_site

    offset = procs.free_port() - 16000  # put the 7 gateways somewhere free-ish
    site = load_site(ROOT / "examples/sites/reference-10mw.yaml", port_offset=max(1000, min(offset, 40000)))
    sim = Simulator(site, seed=1, speed=1e-9, start_time=1_763_000_000_000)  # we drive time ourselves
    sim.step(5.0)
    c0 = cpu()
    for _ in range(seconds):
        sim.step(1.0)
    physics_s = (cpu() - c0) / seconds
    await sim.start()
    try:
        c0 = cpu()
        for _ in range(seconds):
            sim.step(1.0)
            await sim._publish()
        full_s = (cpu() - c0) / seconds
    finally:
        await sim.stop()
    n_modbus = sum(1 for d in site.devices if d.protocol != "mqtt")
    # reference: the same count of small numpy operations, nothing else
    a = np.random.default_rng(0).random(72)
    c0 = cpu()
    for _ in range(seconds):
        x = a
        for _ in range(150):
            x = x * 1.0000001
    ref_s = (cpu() - c0) / seconds
    return {"racks": len(site.racks), "modbus_devices": n_modbus, "physics_ms": physics_s * 1e3,
            "full_ms": full_s * 1e3, "ref_ms": ref_s * 1e3}


def history(days: float) -> dict:
    import pyarrow.parquet as pq

    from podwatch.simulators.history import generate_history
    from podwatch.site import load_site

    site = load_site(ROOT / "examples/sites/demo.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = generate_history(site, days, 60, seed=1, out_dir=tmp, start_ms=1_760_000_000_000,
                                  random_episodes_per_day=2)
        gen_s = time.perf_counter() - t0
        table = pq.read_table(result.samples_path)
        t0 = time.perf_counter()
        pq.write_table(table, os.path.join(tmp, "copy.parquet"), compression="zstd", use_dictionary=["device", "metric"])
        write_s = time.perf_counter() - t0
        size = os.path.getsize(result.samples_path)
    return {"days": days, "rows": result.rows, "seconds": gen_s, "write_only_s": write_s, "bytes": size,
            "faults": len(result.truth.faults), "breaches": len(result.truth.breaches)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--live-seconds", type=int, default=300)
    ap.add_argument("--days", type=float, default=90)
    args = ap.parse_args()
    print(f"machine: {platform.machine()} {os.cpu_count()} cpu(s), python {platform.python_version()}")
    r = asyncio.run(live(args.live_seconds))
    print(f"live, reference-10mw ({r['racks']} racks, {r['modbus_devices']} Modbus devices), per simulated second:")
    print(f"  physics step only:                 {r['physics_ms']:7.2f} ms CPU  ({r['physics_ms'] / 10:.2f} % of a core at 1x)")
    print(f"  physics + all registers updated:   {r['full_ms']:7.2f} ms CPU  ({r['full_ms'] / 10:.2f} % of a core at 1x)")
    print(f"  reference: 150 numpy ops on 72 values: {r['ref_ms']:5.2f} ms CPU")
    h = history(args.days)
    print(f"history, demo site, {h['days']:g} days at 60 s: {h['rows']:,} rows in {h['seconds']:.1f} s "
          f"({h['rows'] / h['seconds'] / 1e6:.2f} M rows/s, goal < 60 s), {h['bytes'] / h['rows']:.2f} bytes/row, "
          f"{h['faults']} fault episodes, {h['breaches']} breaches")
    print(f"  reference: pyarrow writing the same rows alone: {h['write_only_s']:.1f} s")
    record("reference-10mw live simulation CPU per simulated second (physics + all registers)", r["full_ms"], "ms",
           reference=r["physics_ms"], reference_label="physics step only", goal="well under 1000 ms (real time on < 1 core)",
           higher_is_better=False)
    record(f"demo-site history, {h['days']:g} days at 1 min ({h['rows']:,} rows)", h["seconds"], "s",
           reference=h["write_only_s"], reference_label="pyarrow writing the same rows alone", goal="< 60 s",
           higher_is_better=False)


if __name__ == "__main__":
    main()
