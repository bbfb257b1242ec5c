"""`podwatch demo` end to end, as CI runs it: a short accelerated run without the live view.

The demo starts real child processes (Tansu, an MQTT broker, the simulator's Modbus servers and
MQTT publisher, the collectors, `serve` with ingest, analytics, alerting and the API), injects a
pump failure at t=60 s simulated and repairs it at t=300 s. Afterwards the DuckDB file is closed,
so the test reads it directly and checks the story against the simulator's ground truth.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from podwatch.site import load_site

ROOT = Path(__file__).parents[2]
SPEED = 6.0
DURATION_S = 420.0  # simulated: 60 s healthy, 240 s pump failure, 120 s after the repair

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    data = tmp_path_factory.mktemp("demo")
    argv = [sys.executable, "-m", "podwatch", "demo", "--no-ui", "--duration", str(DURATION_S), "--speed", str(SPEED),
            "--data-dir", str(data), "--api-port", "0", "--train-hours", "0.5", "--train-runs", "1"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=840)
    summary = json.loads((data / "demo-summary.json").read_text())
    return result, summary, data


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie that nobody reaped is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_demo_exits_cleanly_and_leaves_no_child_process(demo_run):
    result, summary, data = demo_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert summary["ok"], summary["error"]
    assert len(summary["child_pids"]) >= 4  # kafka, mqtt, serve, simulate, collect
    assert [pid for pid in summary["child_pids"] if _alive(pid)] == []
    assert "Traceback" not in result.stdout
    assert "podwatch sql" in result.stdout and "dashboards export" in result.stdout


def test_the_api_answered_during_the_run(demo_run):
    _, summary, _ = demo_run
    assert summary["api_answers"] > 10
    pipeline = summary["last"]["pipeline"][0]
    assert pipeline["running"] and pipeline["points_total"] > 0


def test_samples_are_stored_for_every_configured_device(demo_run):
    _, summary, _ = demo_run
    site = load_site(ROOT / "examples/sites/demo.yaml")
    with duckdb.connect(summary["db"], read_only=True) as con:
        stored = {d for (d,) in con.sql("SELECT DISTINCT device FROM samples").fetchall()}
        duplicates = con.execute("SELECT count(*) FROM (SELECT device, seq FROM readings GROUP BY ALL "
                                 "HAVING count(*) > 1)").fetchone()[0]
        # every stored point belongs to a stored reading, once (an MQTT redelivery is a new reading
        # with a new seq at the same device time, so compare per (device, ts))
        unaccounted = con.execute("""
            SELECT count(*) FROM (SELECT device, ts, sum(n_points) AS n FROM readings GROUP BY ALL) r
            FULL JOIN (SELECT device, ts, count(*) AS n FROM samples GROUP BY ALL) s USING (device, ts)
            WHERE r.n IS DISTINCT FROM s.n""").fetchone()[0]
    assert {d.id for d in site.devices} <= stored
    assert duplicates == 0 and unaccounted == 0


def test_risk_rises_before_the_ground_truth_breach(demo_run):
    _, summary, _ = demo_run
    truth = json.loads(Path(summary["truth"]).read_text())
    onset_ms = truth["faults"][0]["onset_ms"]
    first_breach: dict[str, int] = {}
    for b in truth["breaches"]:
        first_breach[b["rack"]] = min(first_breach.get(b["rack"], b["ts_ms"]), b["ts_ms"])
    assert first_breach, "the demo's pump failure must breach at least one rack"
    with duckdb.connect(summary["db"], read_only=True) as con:
        for rack, breach_ms in first_breach.items():
            before_onset = con.execute("SELECT coalesce(max(probability), 0) FROM risk_scores WHERE rack = ? "
                                       "AND epoch_ms(ts) < ?", [rack, onset_ms]).fetchone()[0]
            first_warning = con.execute("SELECT min(epoch_ms(ts)) FROM risk_scores WHERE rack = ? "
                                        "AND level IN ('warning', 'critical') AND epoch_ms(ts) >= ?", [rack, onset_ms]).fetchone()[0]
            assert before_onset < 0.5, f"{rack}: risk {before_onset:.2f} before the fault"
            assert first_warning is not None and first_warning < breach_ms, (
                f"{rack}: first warning {first_warning} not before the breach at {breach_ms}")
        reasons = con.execute("SELECT reasons FROM risk_scores WHERE level = 'critical' LIMIT 1").fetchone()[0]
    assert json.loads(reasons), "a critical risk comes with reasons"


def test_an_alert_fired_and_resolved(demo_run):
    _, summary, _ = demo_run
    with duckdb.connect(summary["db"], read_only=True) as con:
        fired_and_resolved = con.sql("SELECT rule, target FROM alerts WHERE fired_at IS NOT NULL AND resolved_at IS NOT NULL "
                                     "AND target LIKE '%m1%'").fetchall()
    assert fired_and_resolved, "an alert on module 1 fired and resolved after the repair"
    events = "\n".join(summary["events"])
    assert "injecting pump failure on cdu-m1" in events
