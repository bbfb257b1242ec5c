"""Streaming checks on hand-made frames: each fires on its condition and stays quiet on healthy data."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from podwatch.analytics.checks import CHECK_NAMES, CheckSettings, StreamingChecks, coolant_heat_kw
from podwatch.site import load_site

from .frames import healthy_rows

SITE = load_site(Path(__file__).parents[3] / "examples/sites/demo.yaml")
RACK = "m1-r03"
CDU = "cdu-m1"


def run(override=None, seconds=200, batch_s=10, settings=None, drop=None, pump_faults=False):
    checks = StreamingChecks(SITE, settings)
    obs = []
    for start in range(0, seconds, batch_s):
        rows = healthy_rows(SITE, start, batch_s, override=override, pump_faults=pump_faults)
        if drop is not None:
            rows = rows.filter(~drop(rows))
        obs.extend(checks.process(rows))
    return obs


def active_pairs(obs, since_batch=None):
    return {(o.rule, o.target) for o in obs if o.active}


def test_healthy_site_is_quiet_and_every_check_reports():
    obs = run()
    assert active_pairs(obs) == set()
    reported = {o.rule for o in obs}
    # every check produced observations (inactive) on a healthy site, except the trend ones
    # which need history: all of them are present here after 200 s
    assert set(CHECK_NAMES) - reported == set(), set(CHECK_NAMES) - reported
    flows = [o for o in obs if o.rule == "flow_per_kw_low" and o.target == RACK]
    assert flows and flows[-1].value == pytest.approx(1.2 / 0.9, rel=0.02)  # design flow at 90 % load
    assert flows[-1].labels == {"site": "demo", "module": "m1", "rack": RACK, "cdu": CDU}


def _rack(metric, fn):
    def override(t, kind, entity, m, value):
        return fn(t, value) if entity == RACK and m == metric else value
    return override


def _cdu(metric, fn):
    def override(t, kind, entity, m, value):
        return fn(t, value) if entity == CDU and m == metric else value
    return override


@pytest.mark.parametrize(("rule", "target", "override"), [
    ("rack_return_temp_high", RACK, _rack("rack.liquid_return_temp_c", lambda t, v: 53.0 + 0.001 * t)),
    ("return_temp_rising", RACK, _rack("rack.liquid_return_temp_c", lambda t, v: v + (0.15 * (t - 120) if t > 120 else 0))),
    ("flow_per_kw_low", RACK, _rack("rack.liquid_flow_lpm", lambda t, v: v * 0.6)),
    ("delta_t_high", RACK, _rack("rack.liquid_return_temp_c", lambda t, v: v + 5.0)),
    ("heat_balance_mismatch", RACK, _rack("rack.liquid_flow_lpm", lambda t, v: v * 1.5)),
    ("leak_detected", RACK, _rack("rack.leak_state", lambda t, v: 1.0)),
    ("leak_detected", CDU, _cdu("cdu.leak_state", lambda t, v: 2.0)),
    ("cdu_supply_temp_high", CDU, _cdu("cdu.supply_temp_c", lambda t, v: v + 3.0)),
    ("approach_rising", CDU, _cdu("cdu.supply_temp_c", lambda t, v: v + 2.0)),
    ("approach_rising", CDU, _cdu("cdu.supply_temp_c", lambda t, v: v + 0.004 * t)),  # 14 K/h trend, small level
    ("dew_point_margin_low", CDU, _cdu("cdu.dew_point_c", lambda t, v: 30.0)),
    ("pump_redundancy_lost", CDU, _cdu("cdu.pump1.running", lambda t, v: 0.0)),
    # pump 1 fails at 100 s and the standby (pump 3) takes over: flow is fine, redundancy is gone
    ("pump_redundancy_lost", CDU, lambda t, k, e, m, v: (0.0 if t >= 100 else v) if (e, m) == (CDU, "cdu.pump1.running")
     else (1.0 if t >= 100 else v) if (e, m) == (CDU, "cdu.pump3.running") else v),
    ("heat_balance_mismatch", CDU, _cdu("cdu.flow_lpm", lambda t, v: v * 0.5)),
    ("sensor_stuck", "bms-m1-r03", _rack("rack.liquid_return_temp_c", lambda t, v: 42.0)),
])
def test_check_fires_on_its_condition(rule, target, override):
    obs = run(override)
    fired = active_pairs(obs)
    assert (rule, target) in fired
    # the last observation of the pair is active and carries a value and a reason
    last = [o for o in obs if o.rule == rule and o.target == target][-1]
    assert last.active and last.value is not None and last.reasons


def _pump1_trips_then_is_repaired(t, kind, entity, metric, value):
    """Pump 1 of cdu-m1 trips at 100 s (the standby, pump 3, takes over) and is repaired at 200 s
    (it runs again, the standby goes back to standby)."""
    if entity != CDU:
        return value
    tripped = 100 <= t < 200
    if metric == "cdu.pump1.running":
        return 0.0 if tripped else value
    if metric == "cdu.pump1.fault":
        return 1.0 if tripped else value
    if metric == "cdu.pump3.running":
        return 1.0 if tripped else value
    return value


def test_pump_fault_registers_tell_a_repaired_pump_from_a_failed_one():
    """With the CDU's pump fault registers the redundancy alarm clears at the repair; without them
    the standby that ran and stopped again counts as down (documented), so it stays active."""
    def redundancy(obs):
        return [(o.ts, o.active, o.reasons[0]) for o in obs if o.rule == "pump_redundancy_lost" and o.target == CDU]

    with_faults = redundancy(run(_pump1_trips_then_is_repaired, seconds=300, pump_faults=True))
    assert any(active for _, active, _ in with_faults)
    assert "pump(s) 1 down" in next(r for _, a, r in with_faults if a)
    assert with_faults[-1][1] is False and "no pump down" in with_faults[-1][2]
    without = redundancy(run(_pump1_trips_then_is_repaired, seconds=300))
    assert any(active for _, active, _ in without) and without[-1][1] is True


def test_a_true_zero_is_not_a_stuck_sensor():
    """An empty rack's PDU at 0 kW and a loop without flow while its pumps are down read an exact 0
    again and again; that must not warn 'stuck' for as long as it lasts (a frozen non-zero value does)."""
    zero = lambda t, k, e, m, v: 0.0 if (e, m) in ((RACK, "pdu.power_kw"), (RACK, "rack.liquid_flow_lpm")) else v  # noqa: E731
    obs = run(zero, seconds=300)
    assert not [o for o in obs if o.rule == "sensor_stuck" and o.active]
    frozen = run(_rack("pdu.power_kw", lambda t, v: 61.3), seconds=300)
    assert {o.target for o in frozen if o.rule == "sensor_stuck" and o.active} == {"pdu-m1-r03-a", "pdu-m1-r03-b"}


def test_sensor_stale_when_a_device_stops_reporting():
    obs = run(drop=lambda rows: (rows["device"] == "pdu-m1-r03-a") & (rows["ts"].dt.second() >= 0)
              & (pl.Series([True] * len(rows))))
    # never reported at all: stale once 10 s (5 x 1 s poll, min 10 s) have passed since start
    stale = [o for o in obs if o.rule == "sensor_stale" and o.target == "pdu-m1-r03-a"]
    assert stale[0].active is False and stale[-1].active is True
    assert stale[-1].value > 10
    # others fine
    assert {o.target for o in obs if o.rule == "sensor_stale" and o.active} == {"pdu-m1-r03-a"}


def test_sensor_stale_after_reporting_then_silence():
    checks = StreamingChecks(SITE)
    checks.process(healthy_rows(SITE, 0, 20))
    rows = healthy_rows(SITE, 20, 30)
    obs = checks.process(rows.filter(pl.col("device") != "bms-m1-r03"))
    stale = next(o for o in obs if o.rule == "sensor_stale" and o.target == "bms-m1-r03")
    assert stale.active and stale.value == pytest.approx(30.0)


def test_bad_quality_rows_do_not_refresh_state():
    checks = StreamingChecks(SITE, CheckSettings(stale_after_s=5))
    checks.process(healthy_rows(SITE, 0, 10))
    bad = healthy_rows(SITE, 10, 10).with_columns(
        pl.when(pl.col("device") == "cdu-m1").then(2).otherwise(pl.col("quality")).cast(pl.UInt8).alias("quality"),
        pl.when(pl.col("device") == "cdu-m1").then(None).otherwise(pl.col("value")).alias("value"))
    obs = checks.process(bad)
    assert any(o.rule == "sensor_stale" and o.target == "cdu-m1" and o.active for o in obs)


def test_missing_column_is_a_clear_error():
    with pytest.raises(ValueError, match="metric"):
        StreamingChecks(SITE).process(pl.DataFrame({"ts": [1], "device": ["x"], "value": [1.0]}))


def test_coolant_heat_formula():
    # 1.2 L/min/kW at 132 kW carries ~116 kW with ΔT 11 K
    assert coolant_heat_kw(158.4, 10.5) == pytest.approx(158.4 / 60 * 4.18 * 10.5)


def test_a_signal_that_drops_out_of_a_reporting_device_is_stale_not_stuck():
    """bms-m1-r03 keeps reporting, but its return temperature stops arriving at 100 s (one register
    or topic failing). It showed as `sensor_stuck` 'unchanged at 42.1 for 120 s' - its last value
    frozen in place - and never as stale. Now: stale, the signal named; not stuck."""
    checks = StreamingChecks(SITE)
    obs = []
    for start in range(0, 300, 10):
        rows = healthy_rows(SITE, start, 10)
        if start >= 100:
            rows = rows.filter(~((pl.col("device") == "bms-m1-r03") & (pl.col("metric") == "rack.liquid_return_temp_c")))
        obs.extend(checks.process(rows))
    stale = [o for o in obs if o.rule == "sensor_stale" and o.target == "bms-m1-r03"]
    assert not any(o.active for o in stale[:10])
    assert stale[-1].active
    assert stale[-1].reasons[0].startswith("rack.liquid_return_temp_c: no good sample for ")
    assert "while the device reports" in stale[-1].reasons[0]
    assert not [o for o in obs if o.rule == "sensor_stuck" and o.target == "bms-m1-r03" and o.active]
    assert {o.target for o in obs if o.active and o.rule in ("sensor_stale", "sensor_stuck")} == {"bms-m1-r03"}
