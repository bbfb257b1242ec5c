"""Cause attribution on a real DuckDB file: while a CDU's cause alert (pump redundancy lost, ...)
is pending or firing, the symptom alerts of the racks it cools carry `probable_cause` (label, fixed
once they fire; annotation, kept current) and the CDU alert lists the affected racks; not after
the cause resolved, never for racks on another CDU, never for a rack's own leak."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from podwatch.analytics.alerting.engine import AlertEngine
from podwatch.analytics.alerting.model import AlertState, Observation, alert_id
from podwatch.analytics.alerting.receivers import AlertmanagerReceiver, WebhookReceiver
from podwatch.analytics.alerting.rules import load_rules
from podwatch.analytics.alerting.settings import AlertmanagerReceiverSettings, WebhookReceiverSettings
from podwatch.analytics.alerting.store import list_alerts
from podwatch.errors import ConfigError

T0 = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
# Hold times off, so each observation moves an alert at once (the defaults' are tested elsewhere).
OVERRIDES = """
rules:
  - {id: pump_redundancy_lost, for: 0s, clear_for: 0s}
  - {id: cdu_supply_temp_high, for: 0s, clear_for: 0s}
  - {id: flow_per_kw_low, for: 0s, clear_for: 0s}
  - {id: delta_t_high, for: 0s, clear_for: 0s}
  - {id: leak_detected, for: 0s, clear_for: 0s}
"""
RACKS = {"cdu-m1": ["m1-r01", "m1-r02", "m1-r03"], "cdu-m2": ["m2-r01"]}
PUMP_REASONS = ["1 of 2 pumps running, 2 needed for full flow, 0 standby left (N+1); pump(s) 2 down"]


def target_labels(target: str) -> dict[str, str]:
    for cdu, racks in RACKS.items():
        module = cdu.removeprefix("cdu-")
        if target == cdu:
            return {"site": "demo", "module": module, "cdu": cdu}
        if target in racks:
            return {"site": "demo", "module": module, "rack": target, "cdu": cdu}
    return {"site": "demo"}


@pytest.fixture
def con(tmp_path):
    c = duckdb.connect(str(tmp_path / "alerts.duckdb"))
    yield c
    c.close()


def make_engine(con):
    hook = WebhookReceiver(WebhookReceiverSettings(type="webhook", name="hook", url="http://127.0.0.1:9/x"))
    am = AlertmanagerReceiver(AlertmanagerReceiverSettings(type="alertmanager", name="am", url="http://127.0.0.1:9"))
    return AlertEngine(con, load_rules(text=OVERRIDES), receivers=[hook, am], target_labels=target_labels, cdu_racks=RACKS)


def pump(active: bool, at_s: float, cdu: str = "cdu-m1") -> Observation:
    return Observation("pump_redundancy_lost", cdu, active, T0 + timedelta(seconds=at_s), 1.0, reasons=PUMP_REASONS)


def flow(rack: str, active: bool, at_s: float) -> Observation:
    return Observation("flow_per_kw_low", rack, active, T0 + timedelta(seconds=at_s), 0.6,
                       reasons=["flow 0.60 L/min/kW (design 1.20) at 80 kW"])


def outbox(con, receiver: str) -> list[dict]:
    return [json.loads(ev) for (ev,) in con.execute(
        "SELECT event FROM alert_outbox WHERE receiver = ? ORDER BY seq", [receiver]).fetchall()]


def stored(con, rule: str, target: str) -> dict:
    return next(r for r in list_alerts(con) if r["alert_id"] == alert_id(rule, target))


def test_rack_alert_carries_the_cause_while_the_cdu_alert_fires_and_the_cdu_alert_lists_it(con):
    engine = make_engine(con)
    engine.observe([pump(True, 0)])
    events = engine.observe([flow("m1-r01", True, 5), flow("m1-r02", True, 5), flow("m2-r01", True, 5)])
    by_target = {e["target"]: e for e in events if e["state"] == "firing"}

    on_m1 = by_target["m1-r01"]
    assert on_m1["labels"]["probable_cause"] == "cdu-m1:pump_redundancy_lost"
    assert on_m1["labels"]["cascade"] == "symptom" and on_m1["labels"]["cdu"] == "cdu-m1"
    assert on_m1["annotations"]["probable_cause"] == (
        "Probably caused by CDU cdu-m1: pump redundancy lost (pump_redundancy_lost, firing since 03:00:00 UTC): "
        + PUMP_REASONS[0])
    assert on_m1["annotations"]["probable_cause_ref"] == "cdu-m1:pump_redundancy_lost"
    # A rack on another CDU: a symptom too, but nothing explains it.
    other = by_target["m2-r01"]
    assert other["labels"]["cascade"] == "symptom"
    assert "probable_cause" not in other["labels"] and "probable_cause" not in other["annotations"]

    cdu_alert = stored(con, "pump_redundancy_lost", "cdu-m1")
    assert cdu_alert["labels"]["cascade"] == "cause" and "probable_cause" not in cdu_alert["labels"]
    assert cdu_alert["annotations"]["affected_racks"] == (
        "2 of 3 rack(s) on cdu-m1 alerting: m1-r01 (flow_per_kw_low), m1-r02 (flow_per_kw_low)")
    assert cdu_alert["annotations"]["racks"] == "cdu-m1 cools 3 rack(s): m1-r01, m1-r02, m1-r03"
    # Alertmanager (keeps state by labels) gets the CDU alert again with the racks listed; the
    # webhook only ever gets transitions.
    am_cdu = [e for e in outbox(con, "am") if e["target"] == "cdu-m1"]
    assert [e["previous_state"] for e in am_cdu] == ["pending", "firing"]
    assert "affected_racks" not in am_cdu[0]["annotations"] and "m1-r02" in am_cdu[1]["annotations"]["affected_racks"]
    assert [e["target"] for e in outbox(con, "hook")].count("cdu-m1") == 1
    assert [c.target for c in engine.causes_of(engine.get("flow_per_kw_low", "m1-r01"))] == ["cdu-m1"]
    assert [s.target for s in engine.symptoms_of(engine.get("pump_redundancy_lost", "cdu-m1"))] == ["m1-r01", "m1-r02"]


def test_no_cause_after_the_cdu_alert_resolved_and_a_firing_label_never_changes(con):
    engine = make_engine(con)
    engine.observe([pump(True, 0), flow("m1-r01", True, 1)])
    assert engine.get("flow_per_kw_low", "m1-r01").labels["probable_cause"] == "cdu-m1:pump_redundancy_lost"
    events = engine.observe([pump(False, 60)])
    assert [(e["target"], e["state"]) for e in events] == [("cdu-m1", "resolved")]

    # m1-r01 still fires: same labels (Alertmanager identity), the annotation says the cause is gone.
    still = engine.get("flow_per_kw_low", "m1-r01")
    assert still.state is AlertState.FIRING and still.labels["probable_cause"] == "cdu-m1:pump_redundancy_lost"
    assert still.annotations["probable_cause"] == ("Fired while cdu-m1:pump_redundancy_lost was active; that alert "
                                                   "resolved at 03:01:00 UTC but this rack still alerts: check the rack itself")
    assert stored(con, "flow_per_kw_low", "m1-r01")["annotations"] == still.annotations
    update = outbox(con, "am")[-1]
    assert (update["target"], update["state"], update["previous_state"]) == ("m1-r01", "firing", "firing")
    assert update["labels"] == still.labels

    # A rack alert that starts after the cause resolved has no cause.
    events = engine.observe([flow("m1-r03", True, 70)])
    assert [e["state"] for e in events] == ["pending", "firing"]
    assert "probable_cause" not in events[-1]["labels"] and "probable_cause" not in events[-1]["annotations"]
    assert engine.causes_of(engine.get("flow_per_kw_low", "m1-r03")) == []


def test_a_cause_after_the_rack_fired_is_an_annotation_not_a_label(con):
    engine = make_engine(con)
    engine.observe([flow("m1-r01", True, 0)])
    fired_labels = dict(engine.get("flow_per_kw_low", "m1-r01").labels)
    assert "probable_cause" not in fired_labels
    engine.observe([pump(True, 10)])
    rack = engine.get("flow_per_kw_low", "m1-r01")
    assert rack.labels == fired_labels  # a new label now would be a second alert at Alertmanager
    assert rack.annotations["probable_cause_ref"] == "cdu-m1:pump_redundancy_lost"
    assert rack.annotations["probable_cause"].startswith("Probably caused by CDU cdu-m1: pump redundancy lost")
    assert "m1-r01 (flow_per_kw_low)" in engine.get("pump_redundancy_lost", "cdu-m1").annotations["affected_racks"]


def test_same_moment_cause_first_and_the_most_probable_cause_named(con):
    engine = make_engine(con)
    # The checks emit the racks' observations before the CDU's: at one sample time the cause is still seen first.
    supply = Observation("cdu_supply_temp_high", "cdu-m1", True, T0, 36.2, reasons=["supply 36.2 °C, setpoint 32.0 °C"])
    events = engine.observe([flow("m1-r01", True, 0), supply, pump(True, 0)])
    rack = next(e for e in events if e["target"] == "m1-r01" and e["state"] == "firing")
    # Both causes fire and are critical; at the same start the rule id decides, the rest is named too.
    assert rack["labels"]["probable_cause"] == "cdu-m1:cdu_supply_temp_high"
    assert rack["annotations"]["probable_cause"].endswith("Also active on cdu-m1: pump_redundancy_lost")


def test_a_rack_leak_and_sensors_are_never_explained_and_a_cdu_leak_is_a_cause(con):
    engine = make_engine(con)
    events = engine.observe([pump(True, 0),
                             Observation("leak_detected", "m1-r01", True, T0 + timedelta(seconds=1), 1.0),
                             Observation("leak_detected", "cdu-m2", True, T0 + timedelta(seconds=1), 1.0),
                             flow("m2-r01", True, 2)])
    firing = {(e["rule"], e["target"]): e for e in events if e["state"] == "firing"}
    rack_leak = firing[("leak_detected", "m1-r01")]
    assert "cascade" not in rack_leak["labels"] and "probable_cause" not in rack_leak["labels"]
    assert firing[("leak_detected", "cdu-m2")]["labels"]["cascade"] == "cause"
    assert firing[("flow_per_kw_low", "m2-r01")]["labels"]["probable_cause"] == "cdu-m2:leak_detected"


def test_attribution_survives_a_restart(con):
    make_engine(con).observe([pump(True, 0), flow("m1-r01", True, 1)])
    engine = make_engine(con)  # reloads pending/firing alerts from the alerts table
    events = engine.observe([flow("m1-r02", True, 5)])
    assert events[-1]["labels"]["probable_cause"] == "cdu-m1:pump_redundancy_lost"
    assert "m1-r01 (flow_per_kw_low), m1-r02 (flow_per_kw_low)" in stored(con, "pump_redundancy_lost", "cdu-m1")["annotations"]["affected_racks"]


def test_rules_may_not_set_the_attribution_labels():
    with pytest.raises(ConfigError) as err:
        load_rules(text="rules:\n  - {id: flow_per_kw_low, labels: {probable_cause: cdu-x}}\n  - {id: delta_t_high, cascade: root}\n")
    text = str(err.value)
    assert "labels: probable_cause set by the engine" in text
    assert "rules[1] (delta_t_high).cascade" in text


def test_alerts_list_and_email_show_the_cause(tmp_path):
    from typer.testing import CliRunner

    from podwatch.analytics.alerting.receivers import format_email
    from podwatch.analytics.alerting.settings import EmailReceiverSettings
    from podwatch.cli import app

    db = tmp_path / "site.duckdb"
    con = duckdb.connect(str(db))
    events = make_engine(con).observe([pump(True, 0), flow("m1-r01", True, 1), flow("m1-r02", True, 1), flow("m2-r01", True, 1)])
    con.close()

    result = CliRunner().invoke(app, ["alerts", "list", "--db", str(db), "--state", "firing"])
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[5].strip(): line for line in result.output.splitlines() if line.count("│") > 8}
    assert "cdu-m1:pump_redundancy_lost" in lines["m1-r01"]
    assert "explains 2 rack(s)" in lines["cdu-m1"]
    assert "│ - " in lines["m2-r01"] and "cdu-m" not in lines["m2-r01"].split("│")[8]

    mail_settings = EmailReceiverSettings(type="email", name="mail", host="127.0.0.1", sender="p@x", to=["f@x"])
    rack_mail = format_email(next(e for e in events if e["target"] == "m1-r01" and e["state"] == "firing"), mail_settings)
    assert "Probable cause:\n  Probably caused by CDU cdu-m1: pump redundancy lost" in rack_mail.get_content()
    cdu_mail = format_email(next(e for e in events if e["target"] == "cdu-m1" and e["state"] == "firing"), mail_settings)
    assert "Affected racks:\n  2 of 3 rack(s) on cdu-m1 alerting: m1-r01 (flow_per_kw_low), m1-r02" in cdu_mail.get_content()
    assert "Cooling loop:\n  cdu-m1 cools 3 rack(s)" in cdu_mail.get_content()


def test_a_direct_receiver_can_skip_explained_rack_alerts(con):
    quiet = WebhookReceiver(WebhookReceiverSettings(type="webhook", name="quiet", url="http://127.0.0.1:9/x",
                                                    skip_explained=True))
    engine = AlertEngine(con, load_rules(text=OVERRIDES), receivers=[quiet], target_labels=target_labels, cdu_racks=RACKS)
    engine.observe([flow("m1-r03", True, 0)])  # fires before the cause: no label, so it is sent
    engine.observe([pump(True, 1), flow("m1-r01", True, 2), flow("m2-r01", True, 2)])
    engine.observe([flow("m1-r01", False, 3), flow("m1-r03", False, 3), flow("m2-r01", False, 3), pump(False, 4)])
    sent = [(e["target"], e["state"]) for e in outbox(con, "quiet")]
    assert sent == [("m1-r03", "firing"), ("cdu-m1", "firing"), ("m2-r01", "firing"),
                    ("m1-r03", "resolved"), ("m2-r01", "resolved"), ("cdu-m1", "resolved")]
    assert engine.get("flow_per_kw_low", "m1-r01").fired_at is not None  # it fired, the receiver skipped it
