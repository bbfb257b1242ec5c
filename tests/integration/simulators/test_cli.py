"""`podwatch simulate` and `podwatch simulate history` as a user runs them (real subprocesses)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from podwatch.simulators.truth import GroundTruth

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.timeout(60)


def podwatch(*args: str, timeout: float = 45) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "podwatch", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.mark.slow
def test_simulate_serves_runs_a_scenario_and_writes_truth(small_site, tmp_path):
    truth = tmp_path / "truth.json"
    r = podwatch("simulate", "--site", str(small_site.source), "--speed", "100", "--duration", "400", "--no-mqtt",
                 "--seed", "3", "--truth-out", str(truth), "--scenario", str(tmp_path / "pf.yaml"))
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr  # missing scenario file
    (tmp_path / "pf.yaml").write_text("name: pf\nfaults:\n  - {kind: pump_failure, target: cdu-1, onset_s: 20, "
                                      "pumps: [1], standby_takeover: false}\n")
    r = podwatch("simulate", "--site", str(small_site.source), "--speed", "100", "--duration", "400", "--no-mqtt",
                 "--seed", "3", "--truth-out", str(truth), "--scenario", str(tmp_path / "pf.yaml"))
    assert r.returncode == 0, r.stderr
    gw = next(g for g in small_site.spec.gateways if g.id == "gw")
    assert re.search(rf"modbus-tcp +127.0.0.1:{gw.port} ", r.stdout) and "units 1-2,50,101-102,200" in r.stdout
    assert "modbus-rtu-over-tcp" in r.stdout
    t = GroundTruth.read_json(truth)
    assert t.faults[0].kind == "pump_failure" and t.breached_racks == ["r1", "r2"]


def test_simulate_bad_scenario_is_an_error_with_its_path(small_site, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("faults:\n  - {kind: leak, target: nowhere, onset_s: 5, magnitude: 1}\n")
    r = podwatch("simulate", "--site", str(small_site.source), "--scenario", str(bad), "--no-mqtt")
    assert r.returncode == 2
    assert "faults[0].target: 'nowhere'" in r.stderr and "Traceback" not in r.stderr


def test_simulate_history_writes_parquet_and_truth(tmp_path):
    out = tmp_path / "hist"
    r = podwatch("simulate", "history", "--site", str(ROOT / "examples/sites/demo.yaml"), "--days", "0.1",
                 "--resolution", "60", "--out", str(out), "--episodes-per-day", "10", "--start", "2026-01-01")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows"] == pq.ParquetFile(out / "samples.parquet").metadata.num_rows > 0
    assert manifest["start_ms"] == 1_767_225_600_000
    assert (out / "truth.json").exists() and (out / "truth_faults.parquet").exists()
