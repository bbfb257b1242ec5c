"""A real Alertmanager (Debian package) on a loopback port, routing to a webhook sink run by the
test: a fault that crosses a threshold past its hold time reaches the sink through
Alertmanager, with its reasons; clearing it resolves it there too."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import duckdb
import httpx
import polars as pl
import pytest

from podwatch.analytics.alerting import Observation, build_runtime, load_rules
from podwatch.analytics.alerting.receivers import AlertmanagerReceiver
from podwatch.analytics.alerting.settings import settings_from_dict
from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

OVERRIDES = """
rules:
  - {id: rack_return_temp_breach, for: 2s, clear_for: 0s}
  - {id: pump_redundancy_lost, for: 0s, clear_for: 0s}
"""


def return_rows(device: str, start: datetime, values: list[float]) -> pl.DataFrame:
    return pl.DataFrame({"ts": [start + timedelta(seconds=i) for i in range(len(values))], "device": [device] * len(values),
                         "metric": ["rack.liquid_return_temp_c"] * len(values), "value": values, "quality": [0] * len(values)})


def for_target(notifications: list[dict], target: str) -> list[dict]:
    return [n for n in notifications if n["commonLabels"].get("target") == target]


async def test_fault_notifies_through_alertmanager_and_resolves(am_with_sink, tmp_path):
    am_url, sink = am_with_sink
    settings = settings_from_dict({"receivers": [{"type": "alertmanager", "name": "am", "url": am_url, "resend_interval": "1s"}],
                                   "generator_url": "http://podwatch.test:8080"})
    con = duckdb.connect(str(tmp_path / "alerts.duckdb"))
    runtime = build_runtime(con, settings, rules=load_rules(text=OVERRIDES))
    device = f"bms-{uuid.uuid4().hex[:6]}"
    try:
        start = datetime.now(UTC) - timedelta(seconds=5)
        # At/above 55 °C from +1 s, hold 2 s: fires on the sample at +3 s (56.0 °C).
        events = await runtime.on_batch(return_rows(device, start, [50.0, 55.0, 55.5, 56.0, 56.2]))
        assert [e["state"] for e in events] == ["pending", "firing"]
        firing = await wait_until(lambda: for_target(sink.am_notifications("firing"), device), timeout=10,
                                  what="firing notification at the webhook via Alertmanager")
        alert = firing[0]["alerts"][0]
        assert alert["labels"]["alertname"] == "rack_return_temp_breach"
        assert alert["labels"]["severity"] == "critical" and alert["labels"]["team"] == "facilities"
        assert alert["annotations"]["summary"] == f"Rack {device}: coolant return 56.0 °C at/above the 55 °C limit"
        assert "rack.liquid_return_temp_c 56 >= 55" in alert["annotations"]["reasons"]
        assert alert["generatorURL"].startswith("http://podwatch.test:8080/api/alerts?alert_id=")
        assert datetime.fromisoformat(alert["startsAt"].replace("Z", "+00:00")) == start + timedelta(seconds=1)

        # Firing alerts are resent to Alertmanager (resend_interval 1 s here).
        am_receiver = next(r for r in runtime.dispatcher.receivers.values() if isinstance(r, AlertmanagerReceiver))

        async def resent():
            await runtime.deliver()
            return am_receiver.resends >= 1
        await wait_until(resent, timeout=10, what="a resend of the firing alert")
        listed = httpx.get(f"{am_url}/api/v2/alerts", params={"filter": f'target="{device}"'}).json()
        assert [a["status"]["state"] for a in listed] == ["active"]

        # Clear: back below 53 °C (clear_for 0): resolved at Alertmanager and at the webhook.
        events = await runtime.on_batch(return_rows(device, start + timedelta(seconds=5), [52.0]))
        assert [e["state"] for e in events] == ["resolved"]
        resolved = await wait_until(lambda: for_target(sink.am_notifications("resolved"), device), timeout=10,
                                    what="resolved notification at the webhook")
        assert resolved[0]["alerts"][0]["labels"]["alertname"] == "rack_return_temp_breach"
        assert runtime.dispatcher.pending_count() == 0
    finally:
        await runtime.aclose()
        con.close()


async def test_check_observation_with_reasons_reaches_alertmanager(am_with_sink, tmp_path):
    am_url, sink = am_with_sink
    settings = settings_from_dict({"receivers": [{"type": "alertmanager", "name": "am", "url": am_url}]})
    con = duckdb.connect(str(tmp_path / "alerts.duckdb"))
    runtime = build_runtime(con, settings, rules=load_rules(text=OVERRIDES))
    cdu = f"cdu-{uuid.uuid4().hex[:6]}"
    try:
        now = datetime.now(UTC)
        reasons = ["pump 2 stopped (running=0)", "1 of 2 pumps running, N+1 needs 2"]
        await runtime.observe([Observation("pump_redundancy_lost", cdu, True, now, 1.0, {"module": "m1"}, reasons)])
        firing = await wait_until(lambda: for_target(sink.am_notifications("firing"), cdu), timeout=10,
                                  what="pump redundancy alert at the webhook")
        alert = firing[0]["alerts"][0]
        assert alert["labels"]["module"] == "m1"
        assert alert["annotations"]["reasons"] == "; ".join(reasons)
        assert "pump 2 stopped" in alert["annotations"]["description"]
        await runtime.observe([Observation("pump_redundancy_lost", cdu, False, now + timedelta(seconds=1), 0.0)])
        await wait_until(lambda: for_target(sink.am_notifications("resolved"), cdu), timeout=10, what="resolved")
    finally:
        await runtime.aclose()
        con.close()


async def test_one_alert_alertmanager_rejects_does_not_take_its_batch_down(am_with_sink, tmp_path):
    """Alertmanager answers 400 for a whole POST when one alert in it is invalid (it still keeps
    the valid ones). The batch is retried one alert at a time: the valid alerts are delivered,
    only the rejected one is dead, with Alertmanager's reason."""
    from podwatch.analytics.alerting.outbox import OutboxDispatcher, enqueue
    from podwatch.analytics.alerting.settings import AlertmanagerReceiverSettings

    am_url, _ = am_with_sink
    con = duckdb.connect(str(tmp_path / "outbox.duckdb"))
    receiver = AlertmanagerReceiver(AlertmanagerReceiverSettings(type="alertmanager", name="am", url=am_url))
    dispatcher = OutboxDispatcher(con, [receiver])
    now = datetime.now(UTC)
    tag = uuid.uuid4().hex[:6]

    def event(n: int, labels: dict) -> dict:
        return {"alert_id": f"{tag}-{n}", "rule": "r", "state": "firing", "severity": "critical", "value": 1.0,
                "startsAt": now.isoformat(), "firedAt": now.isoformat(), "annotations": {"summary": "s"},
                "labels": {"alertname": f"batch_{tag}", "target": f"t{n}", **labels}}

    try:
        enqueue(con, ["am"], [event(1, {}), event(2, {"bad-label": "x"}), event(3, {})])
        assert await dispatcher.tick() == 2
        rows = con.execute("SELECT seq, status, last_error FROM alert_outbox ORDER BY seq").fetchall()
        assert [(seq, status) for seq, status, _ in rows] == [(1, "delivered"), (2, "dead"), (3, "delivered")]
        assert "bad-label" in rows[1][2] and "400" in rows[1][2]
        assert dispatcher.health["am"].counters["errors"] == 1
        held = httpx.get(f"{am_url}/api/v2/alerts", params={"filter": f'alertname="batch_{tag}"'}).json()
        assert sorted(a["labels"]["target"] for a in held) == ["t1", "t3"]
    finally:
        await dispatcher.aclose()
        con.close()
