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


def test_abrupt_change_finder_marks_steps_holding_an_onset_end_or_takeover(demo):
    from podwatch.simulators.history import abrupt_change_finder

    scenario = Scenario.parse({"name": "x", "faults": [
        {"kind": "pump_failure", "target": "cdu-m1", "pumps": [1], "onset_s": 603.0, "takeover_delay_s": 12.0},
        {"kind": "load_surge", "target": "m1-r01", "magnitude": 1.3, "onset_s": 900.0, "duration_s": 60.0},
        {"kind": "sensor_fault", "target": "pdu-m1-r01-a", "metric": "pdu.power_kw", "mode": "stuck",
         "onset_s": 1234.0}]}, "x", demo)
    inside = abrupt_change_finder(scenario, 10)
    assert inside(600.0, 610.0) and inside(610.0, 620.0)  # the trip at 603, the standby's takeover at 615
    assert inside(890.0, 900.0) and inside(950.0, 960.0)  # the surge's onset (a step's end) and end
    assert not inside(900.0, 910.0) and not inside(620.0, 630.0)
    assert not inside(1230.0, 1240.0)  # a sensor fault does not change the physics
    assert abrupt_change_finder(scenario, 1) is None


@pytest.mark.parametrize("onset_s", [120.0, 127.5])
def test_a_pump_trip_breaches_at_10_s_steps_when_it_does_at_1_s(demo, tmp_path, onset_s):
    """Without sub-steps a 10 s history applied the trip from the start of its step and breached
    4-12 s before the 1 s history did; with them the two agree within ~2 s."""
    scenario = Scenario.parse({"name": "trip", "faults": [
        {"kind": "pump_failure", "target": "cdu-m1", "pumps": [1, 2], "standby_takeover": False,
         "onset_s": onset_s}]}, "trip", demo)
    first = {}
    for res in (1, 10):
        result = generate_history(demo, days=240 / 86400, resolution_s=res, scenarios=[scenario], seed=5,
                                  out_dir=tmp_path / str(res), start_ms=START_MS)
        assert result.truth.breaches, f"no breach at {res} s steps"
        first[res] = min(b.ts_ms for b in result.truth.breaches)
    assert abs(first[10] - first[1]) <= 2500, first
