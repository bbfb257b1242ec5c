"""Feature pipeline correctness on hand-made frames."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from podwatch.analytics.features import MODEL_FEATURES, build_features, latest_features
from podwatch.site import load_site

from .frames import T0, healthy_rows

SITE = load_site(Path(__file__).parents[3] / "examples/sites/demo.yaml")
RACK = "m1-r03"


def _rack_override(metric, fn):
    def override(t, kind, entity, m, value):
        return fn(t, value) if entity == RACK and m == metric else value
    return override


def test_levels_and_physics_on_a_healthy_site():
    f = build_features(healthy_rows(SITE, 0, 140, load=0.9, noise=False), SITE)
    assert set(MODEL_FEATURES) <= set(f.columns)
    row = f.filter(pl.col("rack") == RACK).row(-1, named=True)
    rack = SITE.rack(RACK)
    assert row["power_kw"] == pytest.approx(rack.rated_kw * 0.9)  # A + B PDUs
    assert row["power_frac"] == pytest.approx(0.9)
    assert row["flow_ratio"] == pytest.approx(1 / 0.9)  # design flow at 90 % load
    assert row["dt_ratio"] == pytest.approx(1.0)  # ΔT exactly the design ΔT at this load
    assert row["dt_ss_ratio"] == pytest.approx(1.0)
    # steady-state return equals the measured return on a settled loop
    assert row["margin_ss_c"] == pytest.approx(row["margin_c"])
    assert row["margin_c"] == pytest.approx(rack.return_limit_c - row["return_c"])
    assert row["approach_excess_c"] == pytest.approx(32 - 26 - 4)
    assert row["pump_deficit"] == 0
    assert row["return_slope_2m"] == pytest.approx(0.0)
    assert row["time_to_limit_s"] == 3600.0


def test_rows_are_stamped_with_the_end_of_their_bucket():
    # a row at ts averages the samples in (ts - 10 s, ts]: samples at 0..29 s make rows at 0, 10, 20, 30 s
    f = build_features(healthy_rows(SITE, 0, 30, noise=False), SITE, step_s=10)
    assert f["ts"].min() == T0
    assert f.filter(pl.col("rack") == RACK).height == 4
    # a step taken exactly at t = 10 s counts in the row at 10 s (1 of its 10 samples), never earlier
    stepped = build_features(healthy_rows(SITE, 0, 30, noise=False, override=_rack_override(
        "rack.liquid_return_temp_c", lambda t, v: v + 10.0 if t >= 10 else v)), SITE, step_s=10)
    ret = dict(stepped.filter(pl.col("rack") == RACK).select("ts", "return_c").iter_rows())
    base = dict(f.filter(pl.col("rack") == RACK).select("ts", "return_c").iter_rows())
    assert ret[T0] == pytest.approx(base[T0])
    assert ret[T0 + timedelta(seconds=10)] == pytest.approx(base[T0 + timedelta(seconds=10)] + 1.0)
    assert ret[T0 + timedelta(seconds=20)] == pytest.approx(base[T0 + timedelta(seconds=20)] + 10.0)


def test_slopes_and_projection_of_a_rising_return():
    # return rises 0.5 K/min (1/120 K per s) from t = 0; samples 0..420 s so the last bucket is full
    rows = healthy_rows(SITE, 0, 421, noise=False,
                        override=_rack_override("rack.liquid_return_temp_c", lambda t, v: v + t / 120.0))
    row = build_features(rows, SITE, horizon_s=300).filter(pl.col("rack") == RACK).row(-1, named=True)
    for name in ("return_slope_30s", "return_slope_2m", "return_slope_5m"):
        assert row[name] == pytest.approx(0.5, rel=1e-6), name
    assert row["proj_margin_c"] == pytest.approx(row["margin_c"] - 0.5 * 5)
    assert row["time_to_limit_s"] == pytest.approx(row["margin_c"] / 0.5 * 60)


def test_low_flow_moves_the_steady_state_margin():
    rows = healthy_rows(SITE, 0, 60, noise=False, load=1.0,
                        override=_rack_override("rack.liquid_flow_lpm", lambda t, v: v / 2))
    row = build_features(rows, SITE).filter(pl.col("rack") == RACK).row(-1, named=True)
    assert row["flow_ratio"] == pytest.approx(0.5)
    assert row["dt_ss_ratio"] == pytest.approx(2.0)
    # ΔT_ss doubles: the settled return is one design ΔT above the measured one
    assert row["margin_ss_c"] == pytest.approx(row["margin_c"] - row["dt_design_c"])


def test_pumps_running_and_bms_power_fallback():
    def override(t, kind, entity, m, value):
        if entity == "cdu-m1" and m == "cdu.pump2.running":
            return 0.0
        return value

    rows = healthy_rows(SITE, 0, 60, noise=False, override=override)
    rows = rows.filter(pl.col("device") != "pdu-m1-r03-b")  # one PDU silent: use the BMS figure
    f = build_features(rows, SITE)
    row = f.filter(pl.col("rack") == RACK).row(-1, named=True)
    assert row["pump_deficit"] == 1
    assert row["power_kw"] == pytest.approx(SITE.rack(RACK).rated_kw * 0.9)


def test_short_gaps_are_carried_forward_long_ones_stay_null():
    rows = healthy_rows(SITE, 0, 200, noise=False)
    gap = (pl.col("device") == "bms-m1-r03") & (pl.col("ts") >= T0 + timedelta(seconds=60))
    short = rows.filter(~(gap & (pl.col("ts") < T0 + timedelta(seconds=80))))
    long = rows.filter(~gap)
    fs = build_features(short, SITE, fill_limit_steps=3).filter(pl.col("rack") == RACK)
    fl = build_features(long, SITE, fill_limit_steps=3).filter(pl.col("rack") == RACK)
    assert fs["return_c"].null_count() == 0
    assert fl["return_c"].null_count() > 0
    assert latest_features(long, SITE).filter(pl.col("rack") == RACK)["ts"][0] < fl["ts"].max()


def test_empty_input_gives_an_empty_frame_with_the_model_columns():
    empty = healthy_rows(SITE, 0, 1).clear()
    f = build_features(empty, SITE)
    assert f.is_empty() and set(MODEL_FEATURES) <= set(f.columns)


def test_latest_features_of_a_window_without_the_sites_devices_is_empty():
    """A service that just started can hold rows of devices the site file does not list (or
    none of its racks yet): scoring finds nothing to score instead of failing."""
    rows = healthy_rows(SITE, 0, 30).with_columns(pl.lit("meter-elsewhere").alias("device"))
    assert latest_features(rows, SITE).is_empty()
    assert latest_features(healthy_rows(SITE, 0, 1).clear(), SITE).is_empty()


def _flow(rows_override, seconds=661):
    rows = healthy_rows(SITE, 0, seconds, load=0.9, noise=False, override=_rack_override("rack.liquid_flow_lpm", rows_override))
    return build_features(rows, SITE, horizon_s=300).filter(pl.col("rack") == RACK).row(-1, named=True)


def test_a_flow_step_is_not_extrapolated_but_a_sustained_fall_is():
    # a step to 70 % at 500 s (a pump trip): already in the level, nothing more is projected
    step = _flow(lambda t, v: v * 0.7 if t >= 500 else v)
    assert step["flow_trend_5m"] == 0.0
    assert step["flow_proj_lpm"] == pytest.approx(step["flow_lpm"])
    # a fall of 3 L/min per minute over the last 8 min (a choking strainer) goes on to the horizon
    ramp = _flow(lambda t, v: v - 3.0 * max(0, t - 180) / 60.0)
    assert ramp["flow_trend_5m"] == pytest.approx(-3.0, rel=1e-3)
    assert ramp["flow_proj_lpm"] == pytest.approx(ramp["flow_lpm"] - 15.0, rel=1e-3)
    assert ramp["worst_margin_c"] < ramp["margin_ss_c"]


def test_a_saturated_cdu_supply_follows_its_heat_load():
    cdu = SITE.cdu(SITE.rack(RACK).cdu)

    def override(t, kind, entity, metric, value):
        if metric in ("rack.power_kw", "pdu.power_kw") and t >= 600:
            return value * 1.3  # a module-wide load step 60 s ago, the supply has not moved yet
        if metric in ("cdu.supply_temp_c", "rack.liquid_supply_temp_c") and saturated:
            return value + 6.0  # supply 6 K above setpoint: the CDU cannot hold it
        return value

    saturated = True
    row = build_features(healthy_rows(SITE, 0, 661, load=0.7, noise=False, override=override), SITE) \
        .filter(pl.col("rack") == RACK).row(-1, named=True)
    approach = cdu.supply_setpoint_c + 6.0 - cdu.facility_supply_c
    # the heat of the last 2 min is half old (0.7) and half new (0.91) load: ratio 0.91 / 0.805
    assert row["supply_settle_c"] == pytest.approx(row["supply_c"] + approach * (0.91 / 0.805 - 1.0), rel=1e-3)
    assert row["supply_worst_c"] >= row["supply_settle_c"]
    saturated = False
    held = build_features(healthy_rows(SITE, 0, 661, load=0.7, noise=False, override=override), SITE) \
        .filter(pl.col("rack") == RACK).row(-1, named=True)
    assert held["supply_settle_c"] is None  # supply at setpoint: the exchanger has headroom, nothing to infer


def test_a_saturated_cdu_supply_settles_at_its_recent_peak_heat():
    # like the rack's load, the CDU's heat of the last 10 minutes can come back within the horizon:
    # a saturated CDU's supply settles at the approach of that peak heat, not only of the present one
    cdu = SITE.cdu(SITE.rack(RACK).cdu)

    def burst(t):
        return 1.3 if 200 <= t < 400 else 1.0  # a module-wide burst 5-8 min ago, over now

    def override(t, kind, entity, metric, value):
        if metric in ("rack.power_kw", "pdu.power_kw"):
            return value * burst(t)
        if metric in ("cdu.supply_temp_c", "rack.liquid_supply_temp_c"):
            # 6 K above setpoint at the base load: the CDU cannot hold it; its approach follows
            # the heat of the last 2 minutes (approach ~ Q/UA, the facility loop's lag)
            window = range(max(0, t - 119), t + 1)
            return cdu.facility_supply_c + approach * sum(burst(u) for u in window) / len(window)
        return value

    approach = cdu.supply_setpoint_c + 6.0 - cdu.facility_supply_c
    row = build_features(healthy_rows(SITE, 0, 661, load=0.7, noise=False, override=override), SITE) \
        .filter(pl.col("rack") == RACK).row(-1, named=True)
    # the present heat equals the heat of the last 2 minutes (ratio 1); the burst's was 1.3x
    assert row["supply_settle_c"] == pytest.approx(row["supply_c"] + approach * 0.3, rel=1e-3)
    # 11 minutes after the burst it is out of the window and the supply settles where it is
    late = build_features(healthy_rows(SITE, 0, 1061, load=0.7, noise=False, override=override), SITE) \
        .filter(pl.col("rack") == RACK).row(-1, named=True)
    assert late["supply_settle_c"] == pytest.approx(late["supply_c"], abs=1e-6)


def test_a_load_step_on_a_restricted_rack_is_in_the_worst_case_at_the_next_row():
    # a step is not extrapolated as a ramp, but the new load is in the settled and worst-case
    # margins at once: the return settles at supply + P·f/(ṁ·c_p) of the load now measured
    def override(t, kind, entity, metric, value):
        if entity != RACK:
            return value
        if metric == "rack.liquid_flow_lpm":
            return value * 0.5  # a half-clogged strainer for the whole history
        if metric in ("rack.power_kw", "pdu.power_kw") and t >= 600:
            return value * 1.6  # the load steps up at 600 s
        return value

    f = build_features(healthy_rows(SITE, 0, 621, load=0.7, noise=False, override=override), SITE) \
        .filter(pl.col("rack") == RACK).sort("ts")
    before = f.filter(pl.col("ts") == T0 + timedelta(seconds=590)).row(0, named=True)
    after = f.filter(pl.col("ts") == T0 + timedelta(seconds=610)).row(0, named=True)
    assert before["worst_margin_c"] > 1.0
    assert after["power_trend_2m"] == 0.0  # not a sustained ramp ...
    assert after["margin_ss_c"] < 0.0  # ... but the present load already settles above the limit
    assert after["worst_margin_c"] <= after["margin_ss_c"]


def test_a_load_ramp_seen_within_the_last_minute_is_still_projected():
    # a surge rolled out at 1 %/10 s of rated from 300 s, with one flat sample at 420 s (the
    # workload's own swing): the sustained ramp of the halves around it is held for RAMP_HOLD_S
    rated = SITE.rack(RACK).rated_kw

    def load(t, value):
        ramp = 0.001 * rated * max(0, min(t, 410) - 300) + (0.001 * rated * max(0, t - 430) if t >= 430 else 0.0)
        return value + ramp / 2 if value < rated else value + ramp  # PDUs carry half each

    f = build_features(healthy_rows(SITE, 0, 461, load=0.6, noise=False,
                                    override=lambda t, kind, entity, m, value: load(t, value)
                                    if entity == RACK and m in ("rack.power_kw", "pdu.power_kw") else value),
                       SITE).filter(pl.col("rack") == RACK).sort("ts")
    at = {int((r["ts"] - T0).total_seconds()): r for r in f.iter_rows(named=True)}
    assert at[400]["power_trend_2m"] == pytest.approx(0.06 * rated, rel=1e-6)  # 6 %/min of rated
    # at 450 s the last 30 s held a 20 s flat spell: no sustained ramp in the window itself, but
    # the one seen 30-40 s ago is still projected from the present load
    assert at[450]["power_trend_2m"] == pytest.approx(0.06 * rated, rel=1e-6)
    assert at[450]["power_worst_kw"] == pytest.approx(min(at[450]["power_kw"] + 0.3 * rated, 1.17 * rated), rel=1e-6)
    # a minute without a ramp: nothing is projected beyond the recent peak
    flat = build_features(healthy_rows(SITE, 0, 601, load=0.6, noise=False,
                                       override=lambda t, kind, entity, m, value: load(min(t, 410), value)
                                       if entity == RACK and m in ("rack.power_kw", "pdu.power_kw") else value),
                          SITE).filter(pl.col("rack") == RACK).row(-1, named=True)
    assert flat["power_trend_2m"] == 0.0
    assert flat["power_worst_kw"] == pytest.approx(flat["power_kw"], rel=1e-6)


def test_racks_ramping_together_raise_a_saturated_cdus_settled_supply():
    # every rack of the CDU ramps (a surge rolled out over the module) while other racks' swings
    # would hide it in the CDU's summed heat; their own ramps, carried to the horizon and summed,
    # set the heat where the saturated CDU's supply settles
    cdu = SITE.rack(RACK).cdu
    racks = {r.id for r in SITE.racks_of_cdu(cdu)}

    def override(t, kind, entity, metric, value):
        if metric in ("cdu.supply_temp_c", "rack.liquid_supply_temp_c"):
            return value + 6.0  # saturated: 6 K above setpoint
        if entity in racks and metric in ("rack.power_kw", "pdu.power_kw") and t >= 560:
            return value * (1.0 + 0.004 * (t - 560))  # +2.4 %/10 s for the last 60 s
        return value

    row = build_features(healthy_rows(SITE, 0, 621, load=0.6, noise=False, override=override), SITE) \
        .filter(pl.col("rack") == RACK).row(-1, named=True)
    still = build_features(healthy_rows(SITE, 0, 621, load=0.6, noise=False,
                                        override=lambda t, k, e, m, v: v + 6.0 if m in (
                                            "cdu.supply_temp_c", "rack.liquid_supply_temp_c") else v), SITE) \
        .filter(pl.col("rack") == RACK).row(-1, named=True)
    assert row["power_trend_2m"] > 0
    # the racks head for their peak power (1.17 x rated): far more heat than now
    assert row["supply_settle_c"] > still["supply_settle_c"] + 3.0
    assert row["worst_margin_c"] < still["worst_margin_c"] - 3.0


RETROFIT = load_site(Path(__file__).parents[3] / "examples/sites/rtu-gateways.yaml")  # PDUs only on the racks


def test_a_rack_without_liquid_sensors_gets_its_flow_share_and_the_heat_balance_return():
    assert not any(d.kind == "rack" for d in RETROFIT.devices)
    cp_per_lpm = 4.18 / 60.0  # kW per (L/min · K) of water

    def half_flow_after_60s(t, kind, entity, m, value):
        return value / 2 if entity == "CDU_1" and m == "cdu.flow_lpm" and t >= 60 else value

    f = build_features(healthy_rows(RETROFIT, 0, 120, load=0.8, noise=False, override=half_flow_after_60s), RETROFIT)
    assert f["return_estimated"].all() and f["return_c"].null_count() == 0
    for rack_id, flow_share in (("R1.01", 0.5), ("R2.02", 1.0)):
        rack = RETROFIT.rack(rack_id)
        cdu = RETROFIT.cdu(rack.cdu)
        row = f.filter(pl.col("rack") == rack_id).row(-1, named=True)
        flow = rack.design_flow_lpm * flow_share  # its design share of the CDU's measured flow
        assert row["flow_lpm"] == pytest.approx(flow)
        expected_return = cdu.supply_setpoint_c + rack.rated_kw * 0.8 * cdu.heat_to_liquid / (flow * cp_per_lpm)
        assert row["return_c"] == pytest.approx(expected_return, rel=2e-3)
        assert row["margin_c"] == pytest.approx(rack.return_limit_c - row["return_c"])
    # every rack is scored online, not skipped for want of a measured return
    assert latest_features(healthy_rows(RETROFIT, 0, 30), RETROFIT).height == len(RETROFIT.racks)


def test_a_rack_whose_sensors_sent_nothing_is_estimated_the_others_stay_measured():
    rows = healthy_rows(SITE, 0, 90, noise=False).filter(pl.col("device") != "bms-m1-r03")
    f = build_features(rows, SITE)
    assert f.filter(pl.col("rack") == RACK)["return_estimated"].all()
    assert not f.filter(pl.col("rack") != RACK)["return_estimated"].any()
    row = f.filter(pl.col("rack") == RACK).row(-1, named=True)
    measured = f.filter(pl.col("rack") == "m1-r04").row(-1, named=True)
    # a healthy loop at design flow: the estimate lands where the sensor of a twin rack reads
    assert SITE.rack(RACK).rated_kw == SITE.rack("m1-r04").rated_kw
    assert row["return_c"] == pytest.approx(measured["return_c"], abs=0.01)
    assert row["flow_lpm"] == pytest.approx(measured["flow_lpm"], abs=0.01)


def test_a_fouling_exchangers_trend_is_judged_per_kw_of_heat_so_a_load_dip_does_not_hide_it():
    """A saturated CDU whose exchanger fouls (approach per kW of heat up 3 %/min) while its racks'
    load dips to 70 % for a minute: the supply's own trend is lost in the dip, the approach per kW
    keeps most of it, and where the supply settles within the horizon carries the fouling on at
    the recent peak heat."""
    cdu = SITE.cdu(SITE.rack(RACK).cdu)
    racks = SITE.racks_of_cdu(cdu.id)
    load, rate = 0.8, 0.03

    def load_at(t):
        return load * (0.7 if 450 <= t < 510 else 1.0)

    def heat_kw(t):
        return sum(r.rated_kw * load_at(t) for r in racks) * cdu.heat_to_liquid

    apk0 = (cdu.supply_setpoint_c + 4.0 - cdu.facility_supply_c) / heat_kw(0)  # saturated from the start

    def apk(t):
        return apk0 * (1 + rate * t / 60)

    def supply(t):  # the supply follows its heat with the facility loop's lag (2-min mean)
        window = range(max(0, t - 119), t + 1)
        return cdu.facility_supply_c + apk(t) * sum(heat_kw(u) for u in window) / len(window)

    def override(t, kind, entity, metric, value):
        if metric in ("rack.power_kw", "pdu.power_kw"):
            return value * load_at(t) / load
        if metric in ("cdu.supply_temp_c", "rack.liquid_supply_temp_c") and (kind == "rack" or entity == cdu.id):
            return supply(t)
        return value

    row = build_features(healthy_rows(SITE, 0, 661, load=load, noise=False, override=override), SITE, horizon_s=300) \
        .filter(pl.col("rack") == RACK).row(-1, named=True)
    settled_now = cdu.facility_supply_c + apk(660) * heat_kw(0)
    with_trend = cdu.facility_supply_c + (apk(660) + 5 * apk0 * rate) * heat_kw(0)
    assert row["supply_trend_5m"] == 0.0  # the supply's own 5-min trend: hidden by the dip
    # the exchanger's trend: most of the fouling's next 5 minutes (1.5 K), never more
    assert settled_now + 0.5 * (with_trend - settled_now) < row["supply_settle_c"] <= with_trend + 0.05
    assert row["supply_worst_c"] >= row["supply_settle_c"]
