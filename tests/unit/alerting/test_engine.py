"""The lifecycle engine on a real DuckDB file: hold time, hysteresis, clear hold, flap damping,
restart, observations, staleness, and what reaches the outbox."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import duckdb
import polars as pl
import pytest

from podwatch.analytics.alerting.engine import AlertEngine
from podwatch.analytics.alerting.model import Observation, alert_id
from podwatch.analytics.alerting.receivers import WebhookReceiver
from podwatch.analytics.alerting.rules import load_rules
from podwatch.analytics.alerting.settings import WebhookReceiverSettings
from podwatch.analytics.alerting.store import list_alerts

T0 = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)

RULES = """
labels: {site: demo}
rules:
  - id: supply_hot
    source: metric
    metric: cdu.supply_temp_c
    op: ">"
    threshold: 40
    clear_threshold: 39
    for: 2m
    clear_for: 30s
    flap: {window: 10m, max_transitions: 4, stable_clear: 3m}
    severity: critical
    labels: {team: cooling}
    annotations: {summary: "{target} supply {value:.1f} > {threshold:g}", runbook: "check pumps"}
  - id: fast
    source: metric
    metric: rack.liquid_return_temp_c
    op: ">="
    threshold: 50
    for: 0s
    annotations: {summary: "{target} return {value:.1f}"}
  - id: silent
    source: metric
    metric: cdu.flow_lpm
    stale_after: 30s
    annotations: {summary: "{target} flow silent"}
  - id: flow_low
    source: check:flow_per_kw_low
    for: 1m
    annotations: {summary: "{target}: {reasons}"}
  - id: risk_high
    source: risk
    op: ">="
    threshold: 0.5
    clear_threshold: 0.3
    annotations: {summary: "{target} p={value:.2f}"}
"""


@pytest.fixture
def con(tmp_path):
    c = duckdb.connect(str(tmp_path / "alerts.duckdb"))
    yield c
    c.close()


def receiver(states=("firing", "resolved")):
    return WebhookReceiver(WebhookReceiverSettings(type="webhook", name="hook", url="http://127.0.0.1:9/x", states=list(states)))


def make_engine(con, **kw):
    return AlertEngine(con, load_rules(text=RULES, include_defaults=False), receivers=[receiver()], **kw)


def rows(device, metric, values, start=T0, step_s=1.0, quality=0):
    n = len(values)
    return pl.DataFrame({
        "ts": [start + timedelta(seconds=i * step_s) for i in range(n)],
        "device": [device] * n, "metric": [metric] * n, "value": values, "quality": [quality] * n})


def outbox(con, receiver_name="hook"):
    return [(state, json.loads(ev)) for state, ev in con.execute(
        "SELECT state, event FROM alert_outbox WHERE receiver = ? ORDER BY seq", [receiver_name]).fetchall()]


def test_crossing_within_hold_time_raises_nothing(con):
    engine = make_engine(con)
    # 90 s above 40 °C, then back below the clear threshold: shorter than the 2 min hold.
    events = engine.evaluate_samples(rows("cdu-1", "cdu.supply_temp_c", [41.0] * 90 + [38.0] * 30))
    assert [e["state"] for e in events] == ["pending", "resolved"]
    assert events[1]["firedAt"] is None
    assert outbox(con) == []  # nobody is told about an alert that never fired
    (row,) = list_alerts(con)
    assert row["state"] == "resolved" and row["fired_at"] is None


def test_hold_time_then_hysteresis_then_clear_hold(con):
    engine = make_engine(con)
    events = engine.evaluate_samples(rows("cdu-1", "cdu.supply_temp_c", [41.0] * 121))
    assert [e["state"] for e in events] == ["pending", "firing"]
    assert events[1]["firedAt"] == (T0 + timedelta(seconds=120)).isoformat()
    assert events[1]["labels"] == {"site": "demo", "device": "cdu-1", "team": "cooling", "alertname": "supply_hot",
                                   "severity": "critical", "target": "cdu-1"}
    assert events[1]["annotations"]["summary"] == "cdu-1 supply 41.0 > 40"
    # Between clear (39) and threshold (40): hysteresis keeps it firing, however long.
    t1 = T0 + timedelta(seconds=121)
    assert engine.evaluate_samples(rows("cdu-1", "cdu.supply_temp_c", [39.5] * 300, start=t1)) == []
    # Below 39 for 20 s (< clear_for 30 s), back up: still the same alert, no event.
    t2 = t1 + timedelta(seconds=300)
    assert engine.evaluate_samples(rows("cdu-1", "cdu.supply_temp_c", [38.0] * 20 + [40.5] * 5, start=t2)) == []
    # Clear for 31 s: resolved, once.
    t3 = t2 + timedelta(seconds=25)
    events = engine.evaluate_samples(rows("cdu-1", "cdu.supply_temp_c", [38.0] * 32, start=t3))
    assert [e["state"] for e in events] == ["resolved"]
    assert events[0]["endsAt"] == (t3 + timedelta(seconds=30)).isoformat()
    assert [s for s, _ in outbox(con)] == ["firing", "resolved"]
    assert events[0]["alert_id"] == alert_id("supply_hot", "cdu-1")


def test_bad_quality_and_other_metrics_are_ignored(con):
    engine = make_engine(con)
    frame = pl.concat([rows("cdu-1", "cdu.supply_temp_c", [99.0] * 200, quality=2),
                       rows("cdu-1", "cdu.return_temp_c", [99.0] * 200)])
    assert engine.evaluate_samples(frame) == []


def test_flapping_yields_one_alert_until_stably_clear(con):
    engine = make_engine(con)
    # Above 40 for 3 min (fires), then it flaps: 20 s below / 20 s above, for 10 minutes.
    values = [41.0] * 180 + ([38.0] * 20 + [41.0] * 20) * 15
    events = engine.evaluate_samples(rows("cdu-1", "cdu.supply_temp_c", values))
    assert [e["state"] for e in events] == ["pending", "firing"]
    # Now clear gaps of 60 s (> clear_for 30 s) with short excursions: flapping keeps it firing.
    t1 = T0 + timedelta(seconds=len(values))
    more = ([38.0] * 60 + [41.0] * 5) * 4
    assert engine.evaluate_samples(rows("cdu-1", "cdu.supply_temp_c", more, start=t1)) == []
    rec = engine.get("supply_hot", "cdu-1")
    assert rec.state == "firing" and rec.flapping
    # Stably clear for the 3 min stable_clear: resolved, once.
    t2 = t1 + timedelta(seconds=len(more))
    events = engine.evaluate_samples(rows("cdu-1", "cdu.supply_temp_c", [38.0] * 200, start=t2))
    assert [(e["state"], e["flapping"]) for e in events] == [("resolved", True)]
    assert [s for s, _ in outbox(con)] == ["firing", "resolved"]


def test_slow_flapping_is_bounded(con):
    engine = make_engine(con)
    # Every excursion outlasts the hold (2 min) and every gap outlasts clear_for (30 s) -
    # without damping that is one alert per cycle (12 here); damped: max_transitions/2 + 1 = 3,
    # and the last one stays firing through the remaining 9 cycles.
    cycle = [41.0] * 130 + [38.0] * 35
    events = engine.evaluate_samples(rows("cdu-1", "cdu.supply_temp_c", cycle * 12))
    assert sum(e["state"] == "firing" for e in events) == 3
    assert events[-1]["state"] == "firing" and events[-1]["flapping"]


def test_state_survives_restart(con, tmp_path):
    engine = make_engine(con)
    engine.evaluate_samples(rows("cdu-1", "cdu.supply_temp_c", [41.0] * 121))
    started = engine.get("supply_hot", "cdu-1").started_at
    con.close()
    con2 = duckdb.connect(str(tmp_path / "alerts.duckdb"))
    try:
        engine2 = make_engine(con2)
        rec = engine2.get("supply_hot", "cdu-1")
        assert rec.state == "firing" and rec.started_at == started
        # Still above: no second firing after the restart.
        t1 = T0 + timedelta(seconds=121)
        assert engine2.evaluate_samples(rows("cdu-1", "cdu.supply_temp_c", [41.0] * 10, start=t1)) == []
        events = engine2.evaluate_samples(rows("cdu-1", "cdu.supply_temp_c", [38.0] * 40, start=t1 + timedelta(seconds=10)))
        assert [e["state"] for e in events] == ["resolved"]
        assert events[0]["startsAt"] == started.isoformat()
        assert [s for s, _ in outbox(con2)] == ["firing", "resolved"]
    finally:
        con2.close()


def test_vectorised_batch_many_devices(con):
    engine = make_engine(con)
    frames = [rows(f"rack-{i:03d}", "rack.liquid_return_temp_c", [45.0] * 60) for i in range(200)]
    frames.append(rows("rack-hot", "rack.liquid_return_temp_c", [45.0] * 30 + [50.0] * 30))
    events = engine.evaluate_samples(pl.concat(frames).sample(fraction=1.0, shuffle=True, seed=1))
    assert [(e["target"], e["state"]) for e in events] == [("rack-hot", "pending"), ("rack-hot", "firing")]
    assert events[1]["ts"] == (T0 + timedelta(seconds=30)).isoformat()


def test_check_and_risk_observations(con):
    engine = make_engine(con)
    obs = [Observation("flow_per_kw_low", "rack-7", True, T0 + timedelta(seconds=s), 0.71,
                       {"rack": "rack-7"}, ["flow 0.71 L/min/kW"]) for s in (0, 30, 60)]
    events = engine.observe(obs)
    assert [e["state"] for e in events] == ["pending", "firing"]
    assert events[1]["annotations"]["summary"] == "rack-7: flow 0.71 L/min/kW"
    assert events[1]["labels"]["rack"] == "rack-7"
    # Risk: threshold 0.5, clear below 0.3; 0.4 is inside the band and keeps it firing.
    probs = [0.2, 0.55, 0.4, 0.35, 0.25]
    events = engine.observe(Observation("thermal_risk", "rack-9", False, T0 + timedelta(seconds=i), p) for i, p in enumerate(probs))
    assert [(e["state"], e["value"]) for e in events] == [("pending", 0.55), ("firing", 0.55), ("resolved", 0.25)]
    # A check without a rule is counted, not silently dropped.
    before = engine.health.counters["dropped"]
    engine.observe([Observation("no_such_check", "x", True, T0)])
    assert engine.health.counters["dropped"] == before + 1


def test_stale_after(con):
    engine = make_engine(con)
    engine.evaluate_samples(pl.concat([rows("cdu-1", "cdu.flow_lpm", [500.0] * 10), rows("cdu-2", "cdu.flow_lpm", [500.0] * 10)]))
    # cdu-2 goes silent; cdu-1 keeps reporting for a minute.
    events = engine.evaluate_samples(rows("cdu-1", "cdu.flow_lpm", [500.0] * 60, start=T0 + timedelta(seconds=10)))
    assert [(e["target"], e["state"]) for e in events] == [("cdu-2", "pending"), ("cdu-2", "firing")]
    assert "no good sample of cdu.flow_lpm from cdu-2" in events[1]["reasons"][0]
    events = engine.evaluate_samples(rows("cdu-2", "cdu.flow_lpm", [500.0], start=T0 + timedelta(seconds=71)))
    assert [(e["target"], e["state"]) for e in events] == [("cdu-2", "resolved")]


def test_epoch_ms_and_string_quality_accepted(con):
    engine = make_engine(con)
    ms = int(T0.timestamp() * 1000)
    frame = pl.DataFrame({"ts": [ms, ms + 1000], "device": ["r1", "r1"], "metric": ["rack.liquid_return_temp_c"] * 2,
                          "value": [51.0, 52.0], "quality": ["good", "good"]})
    assert [e["state"] for e in engine.evaluate_samples(frame)] == ["pending", "firing"]
    with pytest.raises(ValueError, match="lack column"):
        engine.evaluate_samples(pl.DataFrame({"ts": [ms], "value": [1.0]}))


def test_entity_target_uses_the_site_mapping(tmp_path):
    con = duckdb.connect(str(tmp_path / "e.duckdb"))
    try:
        rules = load_rules(text="""
rules:
  - {id: breach, source: metric, metric: rack.liquid_return_temp_c, target: entity, op: ">=", threshold: 55,
     annotations: {summary: "{target} at {value:.1f}"}}
""", include_defaults=False)
        engine = AlertEngine(con, rules, device_entities={"bms-m1-r01": "m1-r01"},
                             target_labels=lambda t: {"rack": t} if t.startswith("m1-") else {})
        frame = pl.concat([rows("bms-m1-r01", "rack.liquid_return_temp_c", [50.0, 56.0]),
                           rows("bms-unknown", "rack.liquid_return_temp_c", [57.0])])
        events = engine.evaluate_samples(frame)
        firing = {e["target"]: e for e in events if e["state"] == "firing"}
        assert set(firing) == {"m1-r01", "bms-unknown"}  # unknown devices stay their own target
        assert firing["m1-r01"]["labels"]["rack"] == "m1-r01" and firing["m1-r01"]["labels"]["device"] == "bms-m1-r01"
        assert firing["m1-r01"]["reasons"] == ["rack.liquid_return_temp_c 56 >= 55 on bms-m1-r01"]
    finally:
        con.close()


def test_target_only_for_metric_rules():
    from podwatch.errors import ConfigError

    with pytest.raises(ConfigError, match="apply only to `source: metric`"):
        load_rules(text="rules: [{id: x, source: 'check:x', target: entity, annotations: {summary: s}}]", include_defaults=False)


def test_breach_rule_uses_each_racks_return_limit_from_the_site(tmp_path):
    # edge-5mw.yaml: thermal.rack_return_limit_c 57. The shipped breach rule paged at 55 °C there,
    # "at/above the 55 °C limit", while the site's limit (and the analytics checks) say 57 °C.
    from pathlib import Path

    from podwatch.analytics.alerting import build_runtime
    from podwatch.analytics.alerting.settings import settings_from_dict
    from podwatch.site import load_site

    examples = Path(__file__).parents[3] / "examples/sites"
    for site_file, limit in (("edge-5mw.yaml", 57.0), ("demo.yaml", 55.0)):
        site = load_site(examples / site_file)
        assert {r.return_limit_c for r in site.racks} == {limit}
        con = duckdb.connect(str(tmp_path / f"{site_file}.duckdb"))
        try:
            runtime = build_runtime(con, settings_from_dict({}), rules=load_rules(), site=site)
            engine = runtime.engine
            events = engine.evaluate_samples(rows("bms-m1-r01", "rack.liquid_return_temp_c", [50.0, 55.5, 56.5]))
            fired = [e for e in events if e["rule"] == "rack_return_temp_breach" and e["state"] == "firing"]
            assert bool(fired) == (limit < 55.5), site_file
            events = engine.evaluate_samples(rows("bms-m1-r01", "rack.liquid_return_temp_c", [57.2], start=T0 + timedelta(seconds=10)))
            fired += [e for e in events if e["rule"] == "rack_return_temp_breach" and e["state"] == "firing"]
            assert len(fired) == 1 and fired[0]["target"] == "m1-r01"
            assert fired[0]["annotations"]["summary"].endswith(f"at/above the {limit:.0f} °C limit"), fired[0]["annotations"]
            assert fired[0]["reasons"][0].endswith(f">= {limit:g} on bms-m1-r01")
            # hysteresis keeps its width (2 K) below the rack's limit: at limit - 1 still firing, at limit - 2.5 clear
            t = T0 + timedelta(seconds=20)
            engine.evaluate_samples(rows("bms-m1-r01", "rack.liquid_return_temp_c", [limit - 1.0] * 40, start=t))
            assert list_alerts(con, state="firing") and list_alerts(con, state="firing")[0]["rule"] == "rack_return_temp_breach"
            events = engine.evaluate_samples(rows("bms-m1-r01", "rack.liquid_return_temp_c", [limit - 2.5] * 40,
                                                  start=t + timedelta(seconds=40)))
            assert [e["state"] for e in events if e["rule"] == "rack_return_temp_breach"] == ["resolved"]
        finally:
            con.close()
