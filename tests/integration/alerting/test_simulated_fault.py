"""End to end with the simulator's physics: the demo site's pump failure (both duty pumps of
cdu-m1 trip, no standby takeover, cleared after 2 minutes) runs through the analytics streaming
checks and the alert engine (default rules) to a real Alertmanager and its webhook: the
notification carries the reasons, the racks' breach alerts fire, and the pump alert resolves
after the fault clears."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import polars as pl
import pytest

from podwatch.analytics.alerting import build_runtime, load_rules
from podwatch.analytics.alerting.settings import settings_from_dict
from podwatch.site import load_site
from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[3]
BATCH_S = 5


def for_alert(notifications: list[dict], alertname: str, target: str) -> list[dict]:
    return [n for n in notifications
            if n["commonLabels"].get("alertname") == alertname and n["commonLabels"].get("target") == target]


async def test_pump_failure_reaches_alertmanager_with_reasons_and_resolves(am_with_sink, tmp_path):
    import podwatch.simulators.history as history
    import podwatch.simulators.scenario as scenario_mod
    import podwatch.analytics.checks as checks_mod
    am_url, sink = am_with_sink
    site = load_site(ROOT / "examples/sites/demo.yaml")
    scenario = scenario_mod.Scenario.parse({"name": "pump-failure-cleared", "faults": [
        {"kind": "pump_failure", "target": "cdu-m1", "onset_s": 60, "duration_s": 120, "pumps": [1, 2],
         "standby_takeover": False}]}, site=site)
    # Recent sample times, so Alertmanager sees plausible startsAt/endsAt.
    start_ms = int(time.time() * 1000) - 400_000
    result = history.generate_history(site, days=360 / 86400, resolution_s=1, scenarios=[scenario], seed=7,
                                      out_dir=tmp_path / "history", start_ms=start_ms)
    samples = pl.read_parquet(result.samples_path).sort("ts")

    settings = settings_from_dict({"receivers": [{"type": "alertmanager", "name": "am", "url": am_url}]})
    con = duckdb.connect(str(tmp_path / "site.duckdb"))
    runtime = build_runtime(con, settings, rules=load_rules(), site=site)
    checks = checks_mod.StreamingChecks(site)
    try:
        first = samples["ts"].min()
        batches = samples.with_columns(((pl.col("ts") - first).dt.total_seconds() // BATCH_S).alias("batch"))
        for _, rows in batches.group_by("batch", maintain_order=True):
            rows = rows.drop("batch")
            await runtime.on_batch(rows)
            await runtime.observe(checks.process(rows))
        await runtime.deliver()

        pump = await wait_until(lambda: for_alert(sink.am_notifications("firing"), "pump_redundancy_lost", "cdu-m1"),
                                timeout=15, what="pump_redundancy_lost for cdu-m1 at the webhook via Alertmanager")
        alert = pump[0]["alerts"][0]
        assert alert["labels"]["severity"] == "critical" and alert["labels"]["module"] == "m1"
        assert "pump" in alert["annotations"]["reasons"].lower()
        assert alert["annotations"]["runbook"].startswith("Restore or replace the failed pump")
        # The racks of cdu-m1 breach (ground truth) and say so.
        breached = {b.rack for b in result.truth.breaches}
        assert breached, "the scenario should breach"
        rack_alerts = await wait_until(
            lambda: {n["commonLabels"]["target"] for n in sink.am_notifications("firing")
                     if n["commonLabels"].get("alertname") in ("rack_return_temp_high", "thermal_risk_high",
                                                                "flow_per_kw_low", "return_temp_rising")},
            timeout=15, what="rack alerts for the racks of cdu-m1")
        assert rack_alerts & breached
        # The engine's own breach threshold names the racks (target: entity), as the checks do.
        breach_targets = {n["commonLabels"]["target"] for n in sink.am_notifications("firing")
                          if n["commonLabels"].get("alertname") == "rack_return_temp_breach"}
        assert breach_targets & breached
        # The pumps are back at 180 s; 3 minutes later the pump alert has resolved.
        await wait_until(lambda: for_alert(sink.am_notifications("resolved"), "pump_redundancy_lost", "cdu-m1"),
                         timeout=15, what="pump_redundancy_lost resolved at the webhook")
        assert runtime.dispatcher.pending_count() == 0
        fired = sorted({(n["commonLabels"]["alertname"], n["commonLabels"]["target"]) for n in sink.am_notifications("firing")})
        print("fired:", fired)
    finally:
        await runtime.aclose()
        con.close()
