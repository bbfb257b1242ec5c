"""Window features per rack for the thermal-risk model: pure polars functions over the long
sample rows (ts, device, metric, value, quality) and the site model.

`build_features(rows, site)` returns one row per (rack, ts) on a regular grid (`step_s`,
default 10 s; each signal is averaged over its bucket (ts − step, ts], so a row at ts uses
samples up to ts only, and a sample taken at ts counts at ts) with:

- levels of the rack (power from A + B PDUs, falling back on the BMS figure; supply, return,
  flow) and of its CDU (supply, facility water, flow, pumps running, reservoir); a rack without
  liquid sensors of its own gets its design share of the CDU's flow and the return the heat
  balance implies (`return_estimated`);
- physics: flow per kW against design, ΔT against the design ΔT at the present load, the
  steady-state ΔT the present flow and power lead to (ΔT_ss = P·f_liquid / (ṁ·c_p)), the return
  temperature that implies and its margin to the rack's limit, CDU approach against design;
- slopes (K/min, per minute) over 30 s, 2 min and 5 min of the return temperature, and over
  2 and 5 min of supply, steady-state margin, flow per kW, approach, facility water, reservoir;
- projections to the risk horizon: the return margin extrapolated linearly and the
  steady-state margin moved by the supply trend, the worst-case margin (the higher of the
  supply's 10-minute peak and its trend — or, on a saturated CDU, where its supply settles at the
  heat its racks' recent peaks and ongoing ramps lead to, with its exchanger's steady fouling
  trend (approach per kW of heat) carried on — plus the load's 10-minute peak or its
  ramp, held for a minute, at the present flow), the
  settled margin carried along its 5-minute trend, the time to the limit at the present rate, and the
  time until a falling reservoir reaches the level where the pumps draw air.

Model inputs are the relative columns in `MODEL_FEATURES` (margins, ratios, slopes), not
absolute temperatures, so a model trained on one site carries to sites with other setpoints and
limits. Gaps up to `fill_limit_steps` are carried forward; longer gaps stay null (the
gradient-boosting model handles nulls).
"""

from __future__ import annotations

from datetime import timedelta

import polars as pl

from podwatch.analytics.checks import CP_WATER_KJ_PER_KG_K, DENSITY_KG_PER_L, normalise_rows
from podwatch.site import Site

DEFAULT_STEP_S = 10
SLOPE_WINDOWS_S = {"30s": 30, "2m": 120, "5m": 300}
SUPPLY_PIPE_TOLERANCE_K = 1.0
PEAK_WINDOW_S = 600  # recent peaks of load and supply that the worst case assumes can recur
SUSTAINED_WINDOW_S = 300  # a trend counts as sustained when it holds over both halves of this
LOAD_SUSTAINED_WINDOW_S = 60  # ... for the load (ramps of a surge), a shorter window
RAMP_HOLD_S = 60  # a load ramp seen within this long is still credible (the workload's swings hide it at times)
SUPPLY_LAG_WINDOW_S = 120  # the CDU supply follows its heat load with ~60 s lag: compare against this mean
APPROACH_TREND_MIN_PER_MIN = 0.005  # a fouling trend: approach per kW up >= 0.5 % of itself per minute
SATURATED_OVER_SETPOINT_K = 0.5  # CDU supply this far above setpoint = control saturated
RACK_PEAK_OVER_RATED = 1.17  # GB300-class racks peak ~155 kW on 132 kW nominal (DOMAIN.md)
RESERVOIR_LOW_PCT = 20.0  # below this CDU pumps start drawing air (flow falls)

_RACK_METRICS = {"rack.liquid_supply_temp_c": "supply_c", "rack.liquid_return_temp_c": "return_c",
                 "rack.liquid_flow_lpm": "flow_lpm", "rack.power_kw": "bms_power_kw"}
_CDU_METRICS = {"cdu.supply_temp_c": "cdu_supply_c", "cdu.return_temp_c": "cdu_return_c",
                "cdu.flow_lpm": "cdu_flow_lpm", "cdu.facility_supply_temp_c": "facility_c",
                "cdu.reservoir_level_pct": "reservoir_pct", "cdu.dew_point_c": "dew_point_c"}

# Columns the model sees (relative quantities; see the module docstring).
MODEL_FEATURES = [
    "margin_c", "margin_ss_c", "power_frac", "flow_ratio", "dt_ratio", "dt_ss_ratio",
    "return_slope_30s", "return_slope_2m", "return_slope_5m",
    "supply_slope_2m", "supply_slope_5m", "margin_ss_slope_2m", "margin_ss_slope_5m",
    "flow_ratio_slope_2m", "power_frac_slope_2m",
    "supply_over_setpoint_c", "approach_excess_c", "approach_slope_5m", "facility_slope_5m",
    "pump_deficit", "cdu_flow_ratio", "reservoir_pct", "reservoir_slope_5m", "reservoir_time_to_low_s",
    "proj_margin_c", "proj_margin_ss_c", "worst_margin_c", "trend_margin_c", "time_to_limit_s",
]


def site_frames(site: Site) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(devices, racks, cdus) lookup frames from the site model."""
    devices = pl.DataFrame(
        [(d.id, d.kind, d.entity, d.side) for d in site.devices if d.enabled],
        schema={"device": pl.String, "kind": pl.String, "entity": pl.String, "side": pl.String}, orient="row")
    cdus = {c.id: c for c in site.cdus}
    sensed = {d.entity for d in site.devices if d.enabled and d.kind == "rack"}
    racks = pl.DataFrame(
        [(r.id, r.cdu, r.rated_kw, r.design_flow_lpm, r.return_limit_c, cdus[r.cdu].heat_to_liquid, r.id in sensed)
         for r in site.racks],
        schema={"rack": pl.String, "cdu": pl.String, "rated_kw": pl.Float64, "design_flow_lpm": pl.Float64,
                "limit_c": pl.Float64, "heat_to_liquid": pl.Float64, "rack_sensed": pl.Boolean}, orient="row")
    cdu_frame = pl.DataFrame(
        [(c.id, c.supply_setpoint_c, c.approach_c, float(c.working_pumps), float(c.pumps),
          sum(r.design_flow_lpm for r in site.racks if r.cdu == c.id)) for c in site.cdus],
        schema={"cdu": pl.String, "setpoint_c": pl.Float64, "design_approach_c": pl.Float64,
                "working_pumps": pl.Float64, "pumps": pl.Float64, "cdu_design_flow_lpm": pl.Float64}, orient="row")
    return devices, racks, cdu_frame


def _bucketed(rows: pl.DataFrame, devices: pl.DataFrame, step_s: int) -> pl.DataFrame:
    wanted = [*_RACK_METRICS, *_CDU_METRICS, "pdu.power_kw", *(f"cdu.pump{n}.running" for n in range(1, 5))]
    rows = rows.filter(pl.col("metric").cast(pl.String).is_in(wanted))
    good = normalise_rows(rows).filter(pl.col("value").is_not_null() & (pl.col("quality") == 0))
    return (good.join(devices, on="device", how="inner")
            # bucket (t - step, t] stamped t: a row at t holds the samples up to t, and a sample
            # taken exactly at t counts at t (not a step later)
            .with_columns(((pl.col("ts") - timedelta(microseconds=1)).dt.truncate(f"{step_s}s")
                           + timedelta(seconds=step_s)).alias("ts"))
            .group_by("ts", "device", "kind", "entity", "side", "metric")
            .agg(pl.col("value").mean()))


def _slope(col: str, steps: int, step_s: int, over: str) -> pl.Expr:
    """Per-minute slope of `col` over `steps` grid steps (difference quotient)."""
    return (pl.col(col) - pl.col(col).shift(steps).over(over)) / (steps * step_s / 60.0)


def _sustained(col: str, half_steps: int, step_s: int, over: str, *, rising: bool) -> pl.Expr:
    """Per-minute slope of `col` that held over both halves of the last 2 x `half_steps` grid
    steps: the slower half's slope when both rise (`rising`) or both fall, else 0."""
    minutes = half_steps * step_s / 60.0
    recent = (pl.col(col) - pl.col(col).shift(half_steps).over(over)) / minutes
    before = (pl.col(col).shift(half_steps).over(over) - pl.col(col).shift(2 * half_steps).over(over)) / minutes
    both = pl.min_horizontal(recent, before) if rising else pl.max_horizontal(recent, before)
    both = both.clip(lower_bound=0.0) if rising else both.clip(upper_bound=0.0)
    # min/max_horizontal skip nulls: without both halves there is no sustained trend
    return pl.when(recent.is_not_null() & before.is_not_null()).then(both).otherwise(None)


def _steady_rise(col: str, third_steps: int, step_s: int, over: str) -> pl.Expr:
    """Per-minute rise of `col` over the last 3 x `third_steps` grid steps, from the means of
    its three thirds: when they rise one after the other, the smaller of the two steps between
    them per third's length, else 0. Means, not end points: a one-row swing (a load dip the lag
    model of the heat misfits for a minute) moves a third's mean by a fraction only."""
    minutes = third_steps * step_s / 60.0
    mean = pl.col(col).rolling_mean(third_steps, min_samples=third_steps).over(over)
    m3, m2, m1 = (mean.shift(k * third_steps).over(over) if k else mean for k in range(3))
    rise = pl.min_horizontal(m3 - m2, m2 - m1) / minutes
    return pl.when(m1.is_not_null() & m2.is_not_null() & m3.is_not_null()).then(rise.clip(lower_bound=0.0)) \
        .otherwise(None)


def _held(slope: pl.Expr, step_s: int, over: str) -> pl.Expr:
    """The highest of a sustained load ramp's slopes over the last `RAMP_HOLD_S`, once the ramp
    showed in at least two rows of it: a surge being rolled out stays a ramp while the workload's
    own swings make one half-window of it flat for a sample or two. (A step shows as a "ramp" in
    one row at most, where the bucket it fell in sits on the halves' boundary: not held.) The
    projection starts from the present load, so a load that has since fallen back projects lower."""
    window = max(1, round(RAMP_HOLD_S / step_s)) + 1
    seen = (slope.fill_null(0.0) > 0).cast(pl.Int32).rolling_sum(window, min_samples=1).over(over)
    return pl.when(seen >= 2).then(slope.rolling_max(window, min_samples=1).over(over)).otherwise(slope)


def _with_saturated_supply(f: pl.DataFrame, step_s: int, horizon_s: int) -> pl.DataFrame:
    """Add `supply_settle_c`: where a saturated CDU's supply settles at its present heat load.

    While the CDU holds its setpoint the supply says nothing about its heat exchanger. Once it
    cannot (supply above setpoint: valve wide open, fouled, warm facility water) the approach
    (supply − facility water) grows with the heat it moves, ~ Q/UA. The supply follows the heat
    with the facility loop's lag (about a minute), so the approach per kW is taken against the
    heat of the last `SUPPLY_LAG_WINDOW_S`, and the supply settles at facility + that × the present
    heat: a load surge on a saturated CDU shows before its supply has moved. The heat is the
    worst of the present heat, its sustained ramp carried to the horizon, the sum of its racks'
    own sustained ramps carried to the horizon, and its 10-minute peak — the same "what happened
    lately can happen again" as the racks' load peaks: a CDU whose racks peaked together minutes
    ago can see that heat again within the horizon. Ramps are held for `RAMP_HOLD_S` (`_held`).
    On top, a fouling exchanger's approach per kW rising steadily (`_steady_rise`, >= 0.5 % of
    itself per minute) and a facility-water rise are carried to the horizon. Null otherwise."""
    horizon_min = horizon_s / 60.0
    # each rack's own sustained ramp carried to the horizon (to its peak power at most), summed
    # over the CDU: racks ramping together (a surge rolled out over a module) show in their own
    # loads a minute before the CDU's summed heat, where the other racks' swings hide the ramp
    rack_ramp_kw = (pl.min_horizontal(pl.col("power_kw") + pl.col("power_trend_2m").fill_null(0.0) * horizon_min,
                                      pl.max_horizontal(pl.col("power_kw"), pl.col("rated_kw") * RACK_PEAK_OVER_RATED))
                    * pl.col("heat_to_liquid"))
    heat = (f.group_by("cdu", "ts").agg((pl.col("power_kw") * pl.col("heat_to_liquid")).sum().alias("cdu_heat_kw"),
                                          (pl.col("rated_kw") * pl.col("heat_to_liquid")).sum().alias("_peak_kw"),
                                          rack_ramp_kw.sum().alias("cdu_heat_ramps_kw"),
                                          pl.col("power_kw").null_count().alias("_missing"))
            .sort("cdu", "ts"))
    lag_steps = max(1, round(SUPPLY_LAG_WINDOW_S / step_s))
    ramp_half = max(1, round(LOAD_SUSTAINED_WINDOW_S / 2 / step_s))
    heat = heat.with_columns(
        pl.when(pl.col("_missing") == 0).then(pl.col("cdu_heat_kw")).otherwise(None).alias("cdu_heat_kw"),
        pl.when(pl.col("_missing") == 0).then(pl.col("cdu_heat_ramps_kw")).otherwise(None).alias("cdu_heat_ramps_kw"),
    ).with_columns(
        pl.col("cdu_heat_kw").rolling_mean(lag_steps, min_samples=lag_steps).over("cdu").alias("cdu_heat_lag_kw"),
        # a surge being rolled out over the CDU's racks goes on (to the racks' peak power at most)
        pl.min_horizontal(pl.col("cdu_heat_kw") + _held(_sustained("cdu_heat_kw", ramp_half, step_s, "cdu", rising=True),
                                                        step_s, "cdu").fill_null(0.0) * horizon_s / 60.0,
                          pl.col("_peak_kw") * RACK_PEAK_OVER_RATED)
        .alias("cdu_heat_worst_kw"),
    ).with_columns(pl.max_horizontal("cdu_heat_kw", "cdu_heat_worst_kw", "cdu_heat_ramps_kw",
                                     # the CDU's recent peak heat, like the racks' recent peak load
                                     pl.col("cdu_heat_kw").rolling_max(max(1, round(PEAK_WINDOW_S / step_s)), min_samples=1)
                                     .over("cdu")).alias("cdu_heat_worst_kw")
                   ).drop("_missing", "_peak_kw", "cdu_heat_ramps_kw")
    # The exchanger itself, load taken out: its approach per kW of heat (~1/UA). Fouling grows it,
    # a load swing does not — so a fouling trend is judged here, where the CDU's own supply slows
    # down or even stalls whenever its racks' load dips. Carried to the horizon (a sustained rise
    # only, like every trend here) together with a sustained facility-water rise, at the worst heat.
    cdu_levels = (f.group_by("cdu", "ts")
                  .agg(pl.col("cdu_supply_c").first(), pl.col("facility_c").first(), pl.col("setpoint_c").first())
                  .join(heat.select("cdu", "ts", "cdu_heat_lag_kw", "cdu_heat_worst_kw"), on=["cdu", "ts"], how="left")
                  .sort("cdu", "ts"))
    half = max(1, round(SUSTAINED_WINDOW_S / 2 / step_s))
    saturated = pl.col("cdu_supply_c") > pl.col("setpoint_c") + SATURATED_OVER_SETPOINT_K
    approach_now = (pl.col("cdu_supply_c") - pl.col("facility_c")).clip(lower_bound=0.0)
    cdu_levels = cdu_levels.with_columns(
        pl.when(saturated & (pl.col("cdu_heat_lag_kw") > 0))
        .then(approach_now / pl.col("cdu_heat_lag_kw")).otherwise(None).alias("_approach_per_kw"),
    ).with_columns(
        _steady_rise("_approach_per_kw", max(1, round(SUSTAINED_WINDOW_S / 3 / step_s)), step_s, "cdu")
        .alias("_apk_trend"),
        _sustained("facility_c", half, step_s, "cdu", rising=True).alias("_facility_trend"),
    ).with_columns(
        # below APPROACH_TREND_MIN_PER_MIN of itself per minute it is the 2-min lag model's misfit
        # after a load change, not fouling
        pl.when(pl.col("_apk_trend") >= APPROACH_TREND_MIN_PER_MIN * pl.col("_approach_per_kw"))
        .then(pl.col("_apk_trend")).otherwise(0.0).alias("_apk_trend"),
    ).with_columns(
        (pl.col("facility_c") + pl.col("_facility_trend").fill_null(0.0) * horizon_min
         + (pl.col("_approach_per_kw") + pl.col("_apk_trend").fill_null(0.0) * horizon_min)
         * pl.col("cdu_heat_worst_kw")).alias("_settle_trend_cdu"))
    f = f.join(heat, on=["cdu", "ts"], how="left").join(cdu_levels.select("cdu", "ts", "_settle_trend_cdu"),
                                                        on=["cdu", "ts"], how="left")
    ratio = (pl.col("cdu_heat_worst_kw") / pl.col("cdu_heat_lag_kw").clip(lower_bound=1.0)).clip(upper_bound=3.0)
    settle_cdu = pl.max_horizontal(pl.col("facility_c") + approach_now * ratio, pl.col("_settle_trend_cdu"))
    return f.with_columns(
        pl.when(saturated & (pl.col("cdu_heat_lag_kw") > 0))
        .then(pl.col("supply_c") + settle_cdu - pl.col("cdu_supply_c")).otherwise(None).alias("supply_settle_c")
    ).drop("_settle_trend_cdu")


def build_features(rows: pl.DataFrame, site: Site, *, step_s: int = DEFAULT_STEP_S,
                   horizon_s: int | None = None, fill_limit_steps: int = 3) -> pl.DataFrame:
    """Feature rows per (rack, ts); see the module docstring. Empty input -> empty frame."""
    horizon_s = horizon_s or site.spec.thermal.risk_horizon_s
    devices, racks, cdus = site_frames(site)
    b = _bucketed(rows, devices, step_s)
    if b.is_empty():
        return pl.DataFrame(schema={"rack": pl.String, "ts": pl.Datetime("us"),
                                    **{c: pl.Float64 for c in MODEL_FEATURES}})
    t_min, t_max = b["ts"].min(), b["ts"].max()
    grid_ts = pl.datetime_range(t_min, t_max, timedelta(seconds=step_s), time_unit="us", eager=True).alias("ts")
    grid = racks.select("rack").join(grid_ts.to_frame(), how="cross")

    rack_vals = (b.filter(pl.col("kind") == "rack").filter(pl.col("metric").is_in(list(_RACK_METRICS)))
                 .with_columns(pl.col("metric").replace_strict(_RACK_METRICS))
                 .pivot(on="metric", index=["entity", "ts"], values="value", aggregate_function="mean")
                 .rename({"entity": "rack"}))
    for name in _RACK_METRICS.values():
        if name not in rack_vals.columns:
            rack_vals = rack_vals.with_columns(pl.lit(None, pl.Float64).alias(name))
    pdu = (b.filter((pl.col("kind") == "pdu") & (pl.col("metric") == "pdu.power_kw"))
           .group_by("entity", "ts").agg(pl.col("value").sum().alias("pdu_power_kw"), pl.len().alias("pdu_n"))
           .rename({"entity": "rack"}))
    cdu_vals = (b.filter(pl.col("kind") == "cdu").filter(pl.col("metric").is_in(list(_CDU_METRICS)))
                .with_columns(pl.col("metric").replace_strict(_CDU_METRICS))
                .pivot(on="metric", index=["entity", "ts"], values="value", aggregate_function="mean")
                .rename({"entity": "cdu"}))
    for name in _CDU_METRICS.values():
        if name not in cdu_vals.columns:
            cdu_vals = cdu_vals.with_columns(pl.lit(None, pl.Float64).alias(name))
    pumps = (b.filter((pl.col("kind") == "cdu") & pl.col("metric").str.contains(r"^cdu\.pump\d\.running$"))
             .group_by("entity", "ts").agg((pl.col("value") >= 0.5).sum().cast(pl.Float64).alias("pumps_running"))
             .rename({"entity": "cdu"}))
    cdu_grid = cdus.select("cdu").join(grid_ts.to_frame(), how="cross")
    cdu_all = (cdu_grid.join(cdu_vals, on=["cdu", "ts"], how="left").join(pumps, on=["cdu", "ts"], how="left")
               .sort("cdu", "ts"))
    cdu_fill = [c for c in cdu_all.columns if c not in ("cdu", "ts")]
    cdu_all = cdu_all.with_columns(pl.col(cdu_fill).forward_fill(fill_limit_steps).over("cdu"))

    f = (grid.join(rack_vals, on=["rack", "ts"], how="left").join(pdu, on=["rack", "ts"], how="left")
         .join(racks, on="rack", how="left").sort("rack", "ts"))
    fill = ["supply_c", "return_c", "flow_lpm", "bms_power_kw", "pdu_power_kw", "pdu_n"]
    f = f.with_columns(pl.col(fill).forward_fill(fill_limit_steps).over("rack"))
    f = (f.join(cdu_all, on=["cdu", "ts"], how="left").join(cdus, on="cdu", how="left").sort("rack", "ts"))

    cp_per_lpm = DENSITY_KG_PER_L * CP_WATER_KJ_PER_KG_K / 60.0  # kW per (L/min · K)
    f = f.with_columns(
        pl.when(pl.col("pdu_n") >= 2).then(pl.col("pdu_power_kw")).otherwise(pl.col("bms_power_kw")).alias("power_kw"),
        # The CDU supply stands in when the rack manifold supply sensor is missing, and caps it:
        # the manifold sits a fraction of a kelvin above the CDU, so a manifold reading far above
        # the CDU's is a drifting sensor, not a hotter loop (a warmer loop shows at both).
        pl.when(pl.col("supply_c").is_not_null() & pl.col("cdu_supply_c").is_not_null())
        .then(pl.min_horizontal("supply_c", pl.col("cdu_supply_c") + SUPPLY_PIPE_TOLERANCE_K))
        .otherwise(pl.coalesce("supply_c", "cdu_supply_c")).alias("supply_c"),
    ).with_columns(
        # A rack without liquid sensors of its own (a retrofit hall: PDUs on the rack, temperatures
        # and flow only at the CDU), or whose sensors sent no return reading in this window at all:
        # its flow is its design share of the CDU's measured flow and its return is where the heat
        # balance puts it (supply + P·f_liquid / (ṁ·c_p)). CDU-wide faults (facility water, fouling,
        # pumps, leaks, load) show through these; a restriction on that one rack cannot.
        (~pl.col("rack_sensed") | pl.col("return_c").is_null().all().over("rack")).alias("return_estimated"),
    ).with_columns(
        pl.when("return_estimated")
        .then(pl.col("cdu_flow_lpm") * pl.col("design_flow_lpm") / pl.col("cdu_design_flow_lpm"))
        .otherwise(pl.col("flow_lpm")).alias("flow_lpm"),
    ).with_columns(
        pl.when("return_estimated")
        .then(pl.col("supply_c") + (pl.col("power_kw") * pl.col("heat_to_liquid")
                                    / (pl.col("flow_lpm").clip(lower_bound=1.0) * cp_per_lpm)).clip(upper_bound=200.0))
        .otherwise(pl.col("return_c")).alias("return_c"),
    ).with_columns(
        (pl.col("power_kw") / pl.col("rated_kw")).alias("power_frac"),
        (pl.col("limit_c") - pl.col("return_c")).alias("margin_c"),
        (pl.col("return_c") - pl.col("supply_c")).alias("delta_t_c"),
        (pl.col("flow_lpm") / pl.col("power_kw").clip(lower_bound=1.0)).alias("flow_per_kw"),
        (pl.col("design_flow_lpm") / pl.col("rated_kw")).alias("design_flow_per_kw"),
        # design ΔT at the present load, and the ΔT the present flow settles at
        (pl.col("power_kw") * pl.col("heat_to_liquid") / (pl.col("design_flow_lpm") * cp_per_lpm)).alias("dt_design_c"),
        (pl.col("power_kw") * pl.col("heat_to_liquid")
         / (pl.col("flow_lpm").clip(lower_bound=1.0) * cp_per_lpm)).clip(upper_bound=200.0).alias("dt_ss_c"),
    ).with_columns(
        (pl.col("flow_per_kw") / pl.col("design_flow_per_kw")).alias("flow_ratio"),
        (pl.col("delta_t_c") / pl.col("dt_design_c").clip(lower_bound=0.5)).alias("dt_ratio"),
        (pl.col("dt_ss_c") / pl.col("dt_design_c").clip(lower_bound=0.5)).alias("dt_ss_ratio"),
        (pl.col("limit_c") - pl.col("supply_c") - pl.col("dt_ss_c")).alias("margin_ss_c"),
        # measured return minus where the heat balance puts it: large and lasting = a lying sensor
        # (the return lags the balance by its ~30 s time constant after a flow change)
        (pl.col("return_c") - pl.col("supply_c") - pl.col("dt_ss_c")).alias("balance_error_c"),
        (pl.col("cdu_supply_c") - pl.col("setpoint_c")).alias("supply_over_setpoint_c"),
        (pl.col("cdu_supply_c") - pl.col("facility_c")).alias("approach_c"),
        (pl.col("working_pumps") - pl.col("pumps_running")).alias("pump_deficit"),
        (pl.col("cdu_flow_lpm") / pl.col("cdu_design_flow_lpm")).alias("cdu_flow_ratio"),
    ).with_columns(
        (pl.col("approach_c") - pl.col("design_approach_c")).alias("approach_excess_c"),
    )
    slopes = []
    for name, window_s in SLOPE_WINDOWS_S.items():
        steps = max(1, round(window_s / step_s))
        slopes.append(_slope("return_c", steps, step_s, "rack").alias(f"return_slope_{name}"))
        if name != "30s":
            slopes += [_slope("supply_c", steps, step_s, "rack").alias(f"supply_slope_{name}"),
                       _slope("margin_ss_c", steps, step_s, "rack").alias(f"margin_ss_slope_{name}")]
    slopes += [
        _slope("flow_ratio", round(120 / step_s), step_s, "rack").alias("flow_ratio_slope_2m"),
        _slope("power_frac", round(120 / step_s), step_s, "rack").alias("power_frac_slope_2m"),
        _slope("approach_c", round(300 / step_s), step_s, "rack").alias("approach_slope_5m"),
        _slope("facility_c", round(300 / step_s), step_s, "rack").alias("facility_slope_5m"),
        _slope("reservoir_pct", round(300 / step_s), step_s, "rack").alias("reservoir_slope_5m"),
    ]
    f = f.with_columns(slopes)
    # Sustained trends: the slower of the slopes over the two halves of the last 5 minutes, and
    # only when both point the same way. A ramp (fouling, a choking strainer, warming facility
    # water) shows in both halves; a step (a pump trip, a load change) shows in one half only and
    # must not be extrapolated as if it went on (it is already in the present level).
    half = max(1, round(SUSTAINED_WINDOW_S / 2 / step_s))
    f = f.with_columns(
        _sustained("supply_c", half, step_s, "rack", rising=True).alias("supply_trend_5m"),
        _sustained("flow_lpm", half, step_s, "rack", rising=False).alias("flow_trend_5m"),
        _sustained("margin_ss_c", half, step_s, "rack", rising=False).alias("margin_ss_trend_5m"),
        # load ramps (a surge being rolled out) are judged over a shorter window: the load can
        # reach its peak within minutes, and a ramp is bounded anyway by the rack's peak power
        _held(_sustained("power_kw", max(1, round(LOAD_SUSTAINED_WINDOW_S / 2 / step_s)), step_s, "rack", rising=True),
              step_s, "rack").alias("power_trend_2m"),
    )
    horizon_min = horizon_s / 60.0
    # the highest load and supply of the last 10 minutes: what happened lately can happen again
    # within the horizon (workload peaks, CDU supply control swings)
    peak_steps = max(1, round(PEAK_WINDOW_S / step_s))
    f = f.with_columns(pl.col("power_kw").rolling_max(peak_steps, min_samples=1).over("rack").alias("power_peak_kw"),
                       pl.col("supply_c").rolling_max(peak_steps, min_samples=1).over("rack").alias("supply_peak_c"))
    f = _with_saturated_supply(f, step_s, horizon_s)
    f = f.with_columns(
        # the flow at the horizon if a sustained fall goes on (a step is already in the level)
        (pl.col("flow_lpm") + pl.col("flow_trend_5m").fill_null(0.0) * horizon_min)
        .clip(lower_bound=1.0).alias("flow_proj_lpm"),
        # the supply at the horizon: its recent peak, or further on a sustained rise
        pl.max_horizontal(pl.col("supply_peak_c"),
                          pl.col("supply_c") + pl.col("supply_trend_5m").fill_null(0.0) * horizon_min,
                          pl.col("supply_settle_c"))
        .alias("supply_worst_c"),
        # the load at the horizon: its recent peak, or further on a sustained ramp, never above
        # the rack's peak power
        pl.max_horizontal(pl.col("power_peak_kw"),
                          pl.min_horizontal(pl.col("power_kw") + pl.col("power_trend_2m").fill_null(0.0) * horizon_min,
                                            pl.col("rated_kw") * RACK_PEAK_OVER_RATED)).alias("power_worst_kw"),
    ).with_columns(
        (pl.col("power_worst_kw") * pl.col("heat_to_liquid")
         / (pl.col("flow_proj_lpm") * cp_per_lpm)).clip(upper_bound=200.0).alias("dt_ss_peak_c"))
    f = f.with_columns(
        # linear extrapolation of the return to the horizon (2-min trend, rises only)
        (pl.col("margin_c") - pl.col("return_slope_2m").clip(lower_bound=0.0) * horizon_min).alias("proj_margin_c"),
        # where the loop settles, moved by the supply trend over the horizon
        (pl.col("margin_ss_c") - pl.col("supply_slope_5m").clip(lower_bound=0.0) * horizon_min).alias("proj_margin_ss_c"),
        # a leaking loop: when the reservoir reaches the level where pumps start drawing air
        pl.when(pl.col("reservoir_slope_5m") < -0.01)
        .then(((pl.col("reservoir_pct") - RESERVOIR_LOW_PCT).clip(lower_bound=0.0)
               / -pl.col("reservoir_slope_5m") * 60.0).clip(upper_bound=3600.0))
        .otherwise(3600.0).alias("reservoir_time_to_low_s"),
        # worst case within the horizon: supply at its recent peak or on its sustained rise, the
        # load back at its recent peak, the flow on its sustained fall — where the return would
        # settle, against the limit
        (pl.col("limit_c") - pl.col("supply_worst_c") - pl.col("dt_ss_peak_c")).alias("worst_margin_c"),
        # the settled margin carried along its sustained 5-minute fall to the horizon
        (pl.col("margin_ss_c") + pl.col("margin_ss_trend_5m").fill_null(0.0) * horizon_min)
        .alias("trend_margin_c"),
        pl.when(pl.col("return_slope_2m") > 0.01)
        .then((pl.col("margin_c").clip(lower_bound=0.0) / pl.col("return_slope_2m") * 60.0).clip(upper_bound=3600.0))
        .otherwise(3600.0).alias("time_to_limit_s"),
    )
    keep = ["rack", "ts", "cdu", "power_kw", "supply_c", "return_c", "return_estimated", "flow_lpm", "design_flow_lpm",
            "limit_c",
            "delta_t_c",
            "balance_error_c",
            "flow_per_kw", "design_flow_per_kw", "dt_design_c", "dt_ss_c", "cdu_supply_c", "facility_c",
            "setpoint_c", "approach_c", "design_approach_c", "pumps_running", "working_pumps", "reservoir_pct",
            "supply_worst_c", "supply_settle_c", "cdu_heat_kw", "power_worst_kw", "flow_proj_lpm", "flow_trend_5m",
            "supply_trend_5m", "power_trend_2m", *MODEL_FEATURES]
    seen: set[str] = set()
    keep = [c for c in keep if not (c in seen or seen.add(c))]
    # each row is stamped with the END of its bucket: the features use data up to that time only
    return f.select(keep)


def latest_features(rows: pl.DataFrame, site: Site, **kwargs) -> pl.DataFrame:
    """The newest feature row per rack (for online scoring over a recent window of rows)."""
    feats = build_features(rows, site, **kwargs)
    if feats.is_empty():  # no reading of the site's racks in the window yet (a service just started)
        return feats
    return feats.filter(pl.col("return_c").is_not_null()).group_by("rack").agg(pl.all().sort_by("ts").last()) \
        .sort("rack")
