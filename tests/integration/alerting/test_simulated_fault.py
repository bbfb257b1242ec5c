"""End to end with the simulator's physics: the demo site's pump failure (both duty pumps of
cdu-m1 trip, no standby takeover, cleared after 2 minutes) runs through the analytics streaming
checks and the alert engine (default rules) to a real Alertmanager and its webhook: the
notification carries the reasons, the racks' breach alerts fire, and the pump alert resolves
after the fault clears."""

from __future__ import annotations

import duckdb
import pytest

from podwatch.analytics.alerting import build_runtime, load_rules
from podwatch.analytics.alerting.settings import settings_from_dict
from tests.conftest import wait_until
from tests.integration.alerting.conftest import pump_failure_history, replay

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(90)]


def for_alert(notifications: list[dict], alertname: str, target: str) -> list[dict]:
    return [n for n in notifications
            if n["commonLabels"].get("alertname") == alertname and n["commonLabels"].get("target") == target]


async def test_pump_failure_reaches_alertmanager_with_reasons_and_resolves(am_with_sink, tmp_path):
    am_url, sink = am_with_sink
    site, samples, result = pump_failure_history(tmp_path)
    settings = settings_from_dict({"receivers": [{"type": "alertmanager", "name": "am", "url": am_url}]})
    con = duckdb.connect(str(tmp_path / "site.duckdb"))
    runtime = build_runtime(con, settings, rules=load_rules(), site=site)
    try:
        await replay(runtime, site, samples)

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
        # Every rack alert of the fault came after the pump alert and names it as the probable
        # cause; with this test's Alertmanager (one group per alert, no inhibition) each one is a
        # notification of its own: the N pages the shipped config (test_cdu_fault_paging) avoids.
        rack_notes = [a for n in sink.am_notifications("firing") for a in n["alerts"] if a["labels"].get("rack")]
        assert rack_notes and all(a["labels"]["probable_cause"] == "cdu-m1:pump_redundancy_lost" for a in rack_notes)
        assert all(a["annotations"]["probable_cause"].startswith("Probably caused by CDU cdu-m1: pump redundancy lost")
                   for a in rack_notes)
        fired = sorted({(n["commonLabels"]["alertname"], n["commonLabels"]["target"]) for n in sink.am_notifications("firing")})
        print(f"{len(sink.am_notifications('firing'))} firing notifications for {len(fired)} alerts:", fired)
    finally:
        await runtime.aclose()
        con.close()
