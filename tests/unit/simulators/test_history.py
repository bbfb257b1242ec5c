"""History mode writes the storage's long format plus ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from podwatch.simulators.history import generate_history
from podwatch.simulators.scenario import Scenario
from podwatch.site import load_site

ROOT = Path(__file__).resolve().parents[3]
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@pytest.fixture(scope="module")
def demo():
    return load_site(ROOT / "examples/sites/demo.yaml")


def test_history_span_columns_and_truth(demo, tmp_path):
    scenarios = [Scenario.load(ROOT / "examples/scenarios/pump-failure.yaml", demo),
                 Scenario.load(ROOT / "examples/scenarios/device-faults.yaml", demo)]
    result = generate_history(demo, days=0.25, resolution_s=60, scenarios=scenarios, seed=3, out_dir=tmp_path,
                              start_ms=START_MS)
    table = pq.read_table(result.samples_path)
    assert table.column_names == ["ts", "device", "metric", "value", "quality"]
    assert table.schema.field("ts").type == pa.timestamp("ms", tz="UTC")
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    assert ts.min() == START_MS + 60_000 and ts.max() == START_MS + 6 * 3600_000
    assert table.num_rows == result.rows
    devices = set(table.column("device").to_pylist())
    # pdu-m1-r01-a answers exception 0x0B from t=10 s on: a collector would store nothing from it
    assert devices == {d.id for d in demo.devices} - {"pdu-m1-r01-a"}
    # a PDU serves exactly its profile's metrics, one row per minute
    pdu = table.filter(pa.compute.equal(table.column("device"), "pdu-m2-r01-a"))
    assert len(set(pdu.column("metric").to_pylist())) == 14
    assert pdu.num_rows == 14 * 360
    # a device fault removes the device's rows while it lasts (pdu-m1-r02-a silent from 30 s for 120 s)
    silent = table.filter(pa.compute.equal(table.column("device"), "pdu-m1-r02-a"))
    silent_ts = set(silent.column("ts").cast(pa.int64()).to_pylist())
    assert START_MS + 60_000 not in silent_ts and START_MS + 180_000 in silent_ts
    # ground truth: the pump failure's onset and the module-1 racks that breached
    truth = json.loads((tmp_path / "truth.json").read_text())
    pf = next(f for f in truth["faults"] if f["kind"] == "pump_failure")
    assert pf["onset_ms"] == START_MS + 60_000
    assert {b["rack"] for b in truth["breaches"]} and all(b["rack"].startswith("m1-") for b in truth["breaches"])
    assert pq.read_table(tmp_path / "truth_breaches.parquet").num_rows == len(truth["breaches"])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["rows"] == result.rows and manifest["resolution_s"] == 60


def test_random_episodes_are_labelled(demo, tmp_path):
    result = generate_history(demo, days=1, resolution_s=300, seed=9, out_dir=tmp_path, start_ms=START_MS,
                              random_episodes_per_day=6)
    assert len(result.truth.faults) >= 2
    for b in result.truth.breaches:
        assert START_MS <= b.ts_ms <= result.end_ms
