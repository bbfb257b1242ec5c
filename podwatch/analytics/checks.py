"""Streaming checks: the fast path that runs on every ingested batch of sample rows.

`StreamingChecks(site).process(rows)` takes the rows the sink just stored (a polars frame with
columns ts, device, metric, value, quality) and returns `Observation`s for the alert engine —
one per check per target touched by the batch (plus `sensor_stale` for every known device).
The checks only *evaluate* conditions and report values; hold times, hysteresis and severities
live in the alert rules (`podwatch/analytics/alerting/`).

Checks (names are the `rule` of the observations and the `check:<name>` sources of alert rules):

| check | target | active when |
| --- | --- | --- |
| cdu_supply_temp_high | CDU | supply > setpoint + `supply_over_setpoint_c` |
| rack_return_temp_high | rack | return >= limit − `return_warn_margin_c` |
| return_temp_rising | rack | return rises faster than `return_rate_k_per_min` (6 K/min over 60 s) |
| flow_per_kw_low | rack | flow / power < `flow_per_kw_min_ratio` × design L/min/kW (loaded racks) |
| heat_balance_mismatch | rack, CDU | coolant heat ṁ·c_p·ΔT differs from power × heat-to-liquid by > tolerance (2-min means) |
| delta_t_high | rack | ΔT > `delta_t_max_ratio` × design ΔT at the load (and > 2 K above it; 2-min means) |
| approach_rising | CDU | approach (supply − facility water) > design + margin with supply above setpoint, or rising > K/h |
| dew_point_margin_low | CDU | supply − dew point < site `thermal.dew_point_margin_c` |
| pump_redundancy_lost | CDU | fewer pumps running than full flow needs, or a pump down and no standby left |
| leak_detected | rack, CDU | leak state >= 1 (Warning) |
| sensor_stale | device | no good sample for `stale_after_s` (default 5 × poll interval, >= 10 s), of the device or of one of its analog signals |
| sensor_stuck | device | an analog signal other than an exact 0 has not changed at all for `stuck_after_s` |

State kept between batches is small: the newest good value of each (device, metric) with the
time it last changed, the newest sample time per device, and a short history (`history_s`) of
a few derived series (rack return, power, ΔT, coolant heat; CDU approach, loop heat) for rates,
trends and means.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from podwatch.analytics.alerting.model import Observation
from podwatch.site import Site

log = logging.getLogger(__name__)

CP_WATER_KJ_PER_KG_K = 4.18
DENSITY_KG_PER_L = 1.0

CHECK_NAMES = (
    "cdu_supply_temp_high", "rack_return_temp_high", "return_temp_rising", "flow_per_kw_low",
    "heat_balance_mismatch", "delta_t_high", "approach_rising", "dew_point_margin_low",
    "pump_redundancy_lost", "leak_detected", "sensor_stale", "sensor_stuck",
)

# Metrics the checks read; everything else in a batch is ignored (cheaper state).
RACK_METRICS = ("rack.liquid_supply_temp_c", "rack.liquid_return_temp_c", "rack.liquid_flow_lpm",
                "rack.power_kw", "rack.leak_state")
PDU_METRICS = ("pdu.power_kw",)
CDU_METRICS = ("cdu.supply_temp_c", "cdu.return_temp_c", "cdu.flow_lpm", "cdu.facility_supply_temp_c",
               "cdu.dew_point_c", "cdu.leak_state", "cdu.supply_setpoint_c", "cdu.heat_removed_kw",
               *(f"cdu.pump{n}.running" for n in range(1, 5)), *(f"cdu.pump{n}.fault" for n in range(1, 5)))
WATCHED_METRICS = frozenset(RACK_METRICS + PDU_METRICS + CDU_METRICS)


class CheckSettings(BaseModel):
    """Limits of the streaming checks. Defaults follow docs/analytics.md (Streaming checks)."""

    model_config = ConfigDict(extra="forbid")

    supply_over_setpoint_c: float = Field(2.0, gt=0, description="CDU supply this far above setpoint is high (CDU manual: ±2 °C)")
    return_warn_margin_c: float = Field(3.0, ge=0, description="rack_return_temp_high is active this close to the rack's return limit")
    return_rate_k_per_min: float = Field(6.0, gt=0, description="Return temperature rise that counts as fast "
                                         "(workload swings reach ~5 K/min; a lost pump ~30 K/min)")
    rate_window_s: float = Field(60.0, gt=0, description="Window of the return-temperature rate")
    balance_window_s: float = Field(120.0, gt=0, description="Heat balance and ΔT compare means over this window "
                                    "(the return lags load steps by ~25 s)")
    flow_per_kw_min_ratio: float = Field(0.8, gt=0, le=1, description="Share of the design L/min per kW below which flow is low")
    min_load_fraction: float = Field(0.2, ge=0, le=1, description="Physics checks per rack only above this share of rated power")
    heat_balance_tolerance: float = Field(0.25, gt=0, description="Relative mismatch of coolant heat vs electrical heat")
    delta_t_max_ratio: float = Field(1.25, gt=1, description="ΔT above this multiple of the design ΔT at the present load is high")
    approach_margin_c: float = Field(1.5, gt=0, description="Approach above design + this margin is high")
    approach_slope_k_per_h: float = Field(3.0, gt=0, description="Approach rising faster than this (over approach_window_s) is active")
    approach_window_s: float = Field(600.0, gt=0, description="Window of the approach trend")
    stale_after_s: float | None = Field(None, gt=0, description="Default: 5 × the device's poll interval, at least 10 s")
    stuck_after_s: float = Field(120.0, gt=0, description="An analog signal unchanged this long is stuck")
    stuck_metric_suffixes: tuple[str, ...] = Field(("_temp_c", "_flow_lpm", "power_kw"), description="Metrics checked for stuck values")
    history_s: float = Field(900.0, gt=0, description="History of derived series kept for rates and trends")


@dataclass(frozen=True, slots=True)
class _DeviceInfo:
    device: str
    kind: str
    entity: str
    module: str | None
    side: str | None
    poll_interval_s: float


def coolant_heat_kw(flow_lpm: float, delta_t_k: float) -> float:
    """Q = ṁ·c_p·ΔT with ṁ = flow × density (kg/s)."""
    return flow_lpm / 60.0 * DENSITY_KG_PER_L * CP_WATER_KJ_PER_KG_K * delta_t_k


def normalise_rows(rows: pl.DataFrame) -> pl.DataFrame:
    """Rows with ts as naive UTC microseconds and value as Float64 (storage may hand TIMESTAMP
    or TIMESTAMPTZ columns); raises ValueError naming a missing column."""
    missing = [c for c in ("ts", "device", "metric", "value") if c not in rows.columns]
    if missing:
        raise ValueError(f"sample rows lack column(s) {missing}; expected ts, device, metric, value[, quality]")
    ts_dtype = rows.schema["ts"]
    ts = pl.col("ts")
    if isinstance(ts_dtype, pl.Datetime) and ts_dtype.time_zone is not None:
        ts = ts.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    out = rows.with_columns(ts.cast(pl.Datetime("us")).alias("ts"), pl.col("value").cast(pl.Float64),
                            pl.col("device").cast(pl.String), pl.col("metric").cast(pl.String))
    if "quality" not in out.columns:
        out = out.with_columns(pl.lit(0, pl.UInt8).alias("quality"))
    return out.select("ts", "device", "metric", "value", pl.col("quality").cast(pl.UInt8))


def _to_dt(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class StreamingChecks:
    """Evaluates the checks on each batch. Not thread-safe: call `process` from one task."""

    def __init__(self, site: Site, settings: CheckSettings | None = None):
        self.site = site
        self.settings = settings or CheckSettings()
        self.devices: dict[str, _DeviceInfo] = {
            d.id: _DeviceInfo(d.id, d.kind, d.entity, d.module, d.side, d.poll_interval_s)
            for d in site.devices if d.enabled
        }
        self._device_frame = pl.DataFrame(
            {"device": [d.device for d in self.devices.values()],
             "kind": [d.kind for d in self.devices.values()],
             "entity": [d.entity for d in self.devices.values()],
             "side": [d.side for d in self.devices.values()]},
            schema={"device": pl.String, "kind": pl.String, "entity": pl.String, "side": pl.String},
        )
        self._racks = {r.id: r for r in site.racks}
        self._cdus = {c.id: c for c in site.cdus}
        self._cdu_module = {c.id: site.module_of_cdu(c.id) for c in site.cdus}
        # newest good value per (device, metric) and when it last changed
        self._last = pl.DataFrame(schema={"device": pl.String, "metric": pl.String, "ts": pl.Datetime("us"),
                                          "value": pl.Float64, "changed_ts": pl.Datetime("us")})
        self._last_seen: dict[str, datetime] = {}  # newest good sample time per device
        self._started: datetime | None = None
        # derived series: name -> (target, ts, value), appended per batch, trimmed now and then
        self._series: dict[str, pl.DataFrame] = {}
        self._touched: set[str] = set()
        self._pumps_seen_running: dict[str, set[int]] = {}
        self.batches = 0

    # ------------------------------------------------------------------ state

    def _update_state(self, rows: pl.DataFrame) -> pl.DataFrame:
        all_good = rows.filter(pl.col("value").is_not_null() & (pl.col("quality") == 0))
        for device, ts in all_good.group_by("device").agg(pl.col("ts").max()).iter_rows():
            if device not in self._last_seen or ts > self._last_seen[device]:
                self._last_seen[device] = ts
        good = all_good.filter(pl.col("metric").is_in(list(WATCHED_METRICS)))
        if good.is_empty():
            return good
        prev = self._last.join(good.select("device", "metric").unique(), on=["device", "metric"], how="semi")
        combined = pl.concat([
            prev.with_columns(pl.lit(True).alias("is_prev")),
            good.select("device", "metric", "ts", "value",
                        pl.lit(None, pl.Datetime("us")).alias("changed_ts"), pl.lit(False).alias("is_prev")),
        ]).sort("device", "metric", "is_prev", "ts", descending=[False, False, True, False])
        changed = pl.col("value").ne_missing(pl.col("value").shift(1).over("device", "metric"))
        combined = combined.with_columns(
            pl.when(pl.col("is_prev")).then(pl.col("changed_ts"))
            .when(changed).then(pl.col("ts"))
            .otherwise(None).forward_fill().over("device", "metric").alias("changed_ts"))
        newest = combined.group_by("device", "metric").agg(
            pl.col("ts").last(), pl.col("value").last(), pl.col("changed_ts").last())
        self._last = pl.concat([
            self._last.join(newest.select("device", "metric"), on=["device", "metric"], how="anti"),
            newest.select(self._last.columns)])
        return good

    def _entity_values(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Newest values per rack and per CDU, one wide row each."""
        joined = self._last.join(self._device_frame, on="device", how="inner")

        def val(metric: str, kind: str, agg: str = "last") -> pl.Expr:
            expr = pl.col("value").filter((pl.col("metric") == metric) & (pl.col("kind") == kind))
            return getattr(expr, agg)()

        racks = joined.filter(pl.col("kind").is_in(["rack", "pdu"])).group_by("entity").agg(
            pl.col("ts").max().alias("ts"),
            val("rack.liquid_supply_temp_c", "rack").alias("supply_c"),
            val("rack.liquid_return_temp_c", "rack").alias("return_c"),
            val("rack.liquid_flow_lpm", "rack").alias("flow_lpm"),
            val("rack.power_kw", "rack").alias("bms_power_kw"),
            val("rack.leak_state", "rack").alias("leak_state"),
            val("pdu.power_kw", "pdu", "sum").alias("pdu_power_kw"),
            val("pdu.power_kw", "pdu", "count").alias("pdu_count"),
        ).rename({"entity": "rack"})
        pump_cols = [*(val(f"cdu.pump{n}.running", "cdu").alias(f"pump{n}") for n in range(1, 5)),
                     *(val(f"cdu.pump{n}.fault", "cdu").alias(f"pump{n}_fault") for n in range(1, 5))]
        cdus = joined.filter(pl.col("kind") == "cdu").group_by("entity").agg(
            pl.col("ts").max().alias("ts"),
            val("cdu.supply_temp_c", "cdu").alias("supply_c"),
            val("cdu.return_temp_c", "cdu").alias("return_c"),
            val("cdu.flow_lpm", "cdu").alias("flow_lpm"),
            val("cdu.facility_supply_temp_c", "cdu").alias("facility_c"),
            val("cdu.dew_point_c", "cdu").alias("dew_point_c"),
            val("cdu.leak_state", "cdu").alias("leak_state"),
            val("cdu.supply_setpoint_c", "cdu").alias("setpoint_c"),
            *pump_cols,
        ).rename({"entity": "cdu"})
        return racks, cdus

    def _record_history(self, series: str, frame: pl.DataFrame, target_col: str, value_col: str, now: datetime) -> None:
        # only targets with new samples in this batch: an untouched target would repeat its last
        # point and weigh it twice in means and slopes
        new = frame.filter(pl.col(value_col).is_not_null() & pl.col(target_col).is_in(list(self._touched))).select(
            pl.col(target_col).alias("target"), pl.col("ts"), pl.col(value_col).cast(pl.Float64).alias("value"))
        old = self._series.get(series)
        frame_out = new if old is None else old.vstack(new)
        # appends are cheap (no copy); trimming and rechunking every 30 batches keeps it so
        if self.batches % 30 == 0:
            cutoff = now.replace(tzinfo=None) - _seconds(self.settings.history_s)
            frame_out = frame_out.filter(pl.col("ts") >= cutoff).rechunk()
        self._series[series] = frame_out

    def _window(self, series: str, window_s: float, now: datetime) -> pl.DataFrame:
        part = self._series.get(series)
        if part is None:
            return pl.DataFrame(schema={"target": pl.String, "ts": pl.Datetime("us"), "value": pl.Float64})
        return part.filter(pl.col("ts") >= now.replace(tzinfo=None) - _seconds(window_s))

    def _means(self, series: str, window_s: float, now: datetime) -> dict[str, float]:
        """Mean of a derived series over the last window, per target."""
        part = self._window(series, window_s, now)
        return dict(part.group_by("target").agg(pl.col("value").mean()).iter_rows())

    def _slopes_per_min(self, series: str, window_s: float, now: datetime) -> dict[str, float]:
        """Least-squares slope (per minute) of a derived series over the last window, per target."""
        part = self._window(series, window_s, now)
        if part.is_empty():
            return {}
        t = (pl.col("ts") - pl.col("ts").min()).dt.total_milliseconds().over("target") / 60000.0
        agg = part.with_columns(t.alias("t_min")).group_by("target").agg(
            pl.len().alias("n"),
            (pl.col("t_min").max() - pl.col("t_min").min()).alias("span_min"),
            pl.cov("t_min", "value").alias("cov"), pl.col("t_min").var().alias("var"))
        out = {}
        for target, n, span_min, cov, var in agg.iter_rows():
            # a trend needs at least a third of the window to be meaningful
            if n >= 3 and var and span_min * 60.0 >= window_s / 3:
                out[target] = cov / var
        return out

    # ------------------------------------------------------------------ checks

    def process(self, rows: pl.DataFrame) -> list[Observation]:
        """Update the state with a batch of sample rows and evaluate every check."""
        if rows.is_empty():
            return []
        rows = normalise_rows(rows)
        self.batches += 1
        now = _to_dt(rows["ts"].max())
        if self._started is None:
            self._started = now
        touched_devices = set(rows["device"].unique().to_list())
        self._update_state(rows)
        touched_entities = {self.devices[d].entity for d in touched_devices if d in self.devices}
        self._touched = touched_entities
        obs: list[Observation] = []
        racks, cdus = self._entity_values()
        # both PDUs reporting: A + B is the rack power; otherwise the BMS figure
        racks = racks.with_columns(
            pl.when(pl.col("pdu_count") >= 2).then(pl.col("pdu_power_kw")).otherwise(pl.col("bms_power_kw"))
            .alias("power_kw"),
            (pl.col("return_c") - pl.col("supply_c")).alias("delta_t_c"),
        ).with_columns((pl.col("flow_lpm") / 60.0 * DENSITY_KG_PER_L * CP_WATER_KJ_PER_KG_K * pl.col("delta_t_c"))
                       .alias("coolant_kw"))
        self._record_history("rack_return_c", racks, "rack", "return_c", now)
        for col in ("power_kw", "delta_t_c", "coolant_kw"):
            self._record_history(f"rack_{col}", racks, "rack", col, now)
        cdus = cdus.with_columns((pl.col("supply_c") - pl.col("facility_c")).alias("approach_c"))
        self._record_history("cdu_approach_c", cdus, "cdu", "approach_c", now)
        cdus = cdus.with_columns((pl.col("flow_lpm") / 60.0 * DENSITY_KG_PER_L * CP_WATER_KJ_PER_KG_K
                                  * (pl.col("return_c") - pl.col("supply_c"))).alias("coolant_kw"))
        self._record_history("cdu_coolant_kw", cdus, "cdu", "coolant_kw", now)
        obs += self._rack_checks(racks.filter(pl.col("rack").is_in(list(touched_entities))), now)
        obs += self._cdu_checks(cdus.filter(pl.col("cdu").is_in(list(touched_entities))), racks, now)
        obs += self._sensor_checks(now, touched_devices)
        return obs

    def _rack_labels(self, rack_id: str) -> dict[str, str]:
        rack = self._racks[rack_id]
        return {"site": self.site.id, "module": rack.module, "rack": rack.id, "cdu": rack.cdu}

    def _rack_checks(self, racks: pl.DataFrame, now: datetime) -> list[Observation]:
        s = self.settings
        out: list[Observation] = []
        rates = self._slopes_per_min("rack_return_c", s.rate_window_s, now)
        # The return lags a load step by the loop's time constant (~25 s at design flow): the
        # balance and ΔT checks compare means over `balance_window_s`, so workload swings do not
        # read as a loop fault while a lasting one still shows within the window.
        mean_power = self._means("rack_power_kw", s.balance_window_s, now)
        mean_dt = self._means("rack_delta_t_c", s.balance_window_s, now)
        mean_coolant = self._means("rack_coolant_kw", s.balance_window_s, now)
        for row in racks.iter_rows(named=True):
            rack = self._racks.get(row["rack"])
            if rack is None:
                continue
            ts, labels = _to_dt(row["ts"]), self._rack_labels(rack.id)
            cdu = self._cdus.get(rack.cdu)
            heat_to_liquid = cdu.heat_to_liquid if cdu else 0.88
            power_kw = row["power_kw"]
            supply_c, return_c, flow_lpm = row["supply_c"], row["return_c"], row["flow_lpm"]
            limit_c = rack.return_limit_c

            def emit(rule: str, active: bool, value: float | None, reasons: list[str]) -> None:
                out.append(Observation(rule=rule, target=rack.id, active=bool(active), ts=ts,
                                       value=None if value is None else float(value), labels=labels, reasons=reasons))

            rate = rates.get(rack.id)
            if return_c is not None:
                reason = f"return {return_c:.1f} °C, limit {limit_c:.0f} °C"
                if rate is not None:
                    reason += f", {rate:+.1f} K/min"
                emit("rack_return_temp_high", return_c >= limit_c - s.return_warn_margin_c, return_c, [reason])
            if rate is not None:
                emit("return_temp_rising", rate > s.return_rate_k_per_min, rate,
                     [f"return {return_c:.1f} °C rising {rate:+.1f} K/min (limit {limit_c:.0f} °C)"])
            if row["leak_state"] is not None:
                state = int(row["leak_state"])
                emit("leak_detected", state >= 1, state, [f"rack leak detector {('OK', 'Warning', 'Critical')[min(state, 2)]}"])
            loaded = power_kw is not None and power_kw >= s.min_load_fraction * rack.rated_kw
            if not loaded:
                continue
            design_lpm_per_kw = rack.design_flow_lpm / rack.rated_kw
            if flow_lpm is not None:
                lpm_per_kw = flow_lpm / power_kw
                emit("flow_per_kw_low", lpm_per_kw < s.flow_per_kw_min_ratio * design_lpm_per_kw, lpm_per_kw,
                     [f"flow {lpm_per_kw:.2f} L/min/kW (design {design_lpm_per_kw:.2f}) at {power_kw:.0f} kW"])
            avg_power_kw = mean_power.get(rack.id, power_kw)
            if supply_c is not None and return_c is not None and avg_power_kw:
                delta_t = mean_dt.get(rack.id, return_c - supply_c)
                design_dt = avg_power_kw * heat_to_liquid / (rack.design_flow_lpm / 60.0 * CP_WATER_KJ_PER_KG_K)
                rising = f" and rising {rate:+.1f} K/min" if rate is not None and rate > 0.2 else ""
                emit("delta_t_high", delta_t > s.delta_t_max_ratio * design_dt and delta_t > design_dt + 2.0, delta_t,
                     [f"ΔT {delta_t:.1f} K{rising} (design {design_dt:.1f} K at {avg_power_kw:.0f} kW)"])
                if flow_lpm is not None:
                    coolant_kw = mean_coolant.get(rack.id, coolant_heat_kw(flow_lpm, return_c - supply_c))
                    expected_kw = avg_power_kw * heat_to_liquid
                    mismatch = (coolant_kw - expected_kw) / expected_kw
                    emit("heat_balance_mismatch", abs(mismatch) > s.heat_balance_tolerance, mismatch,
                         [f"coolant carries {coolant_kw:.0f} kW, expected {expected_kw:.0f} kW "
                          f"({mismatch:+.0%}) from {avg_power_kw:.0f} kW electrical"])
        return out

    def _cdu_checks(self, cdus: pl.DataFrame, racks: pl.DataFrame, now: datetime) -> list[Observation]:
        s = self.settings
        out: list[Observation] = []
        slopes = self._slopes_per_min("cdu_approach_c", s.approach_window_s, now)
        mean_power = self._means("rack_power_kw", s.balance_window_s, now)
        rack_power = {r["rack"]: mean_power.get(r["rack"], r["power_kw"]) for r in racks.iter_rows(named=True)}
        mean_loop = self._means("cdu_coolant_kw", s.balance_window_s, now)
        for row in cdus.iter_rows(named=True):
            cdu = self._cdus.get(row["cdu"])
            if cdu is None:
                continue
            ts = _to_dt(row["ts"])
            labels = {"site": self.site.id, "module": self._cdu_module[cdu.id], "cdu": cdu.id}

            def emit(rule: str, active: bool, value: float | None, reasons: list[str]) -> None:
                out.append(Observation(rule=rule, target=cdu.id, active=bool(active), ts=ts,
                                       value=None if value is None else float(value), labels=labels, reasons=reasons))

            supply_c = row["supply_c"]
            setpoint_c = row["setpoint_c"] if row["setpoint_c"] is not None else cdu.supply_setpoint_c
            if supply_c is not None:
                emit("cdu_supply_temp_high", supply_c > setpoint_c + s.supply_over_setpoint_c, supply_c,
                     [f"supply {supply_c:.1f} °C, setpoint {setpoint_c:.1f} °C"])
            if row["approach_c"] is not None:
                approach = row["approach_c"]
                slope_per_h = slopes.get(cdu.id)
                # Supply is held at setpoint while the CDU can: supply − facility is then above the
                # design approach by design. The approach only means trouble once control saturates
                # (supply above setpoint) or when it keeps rising (fouling, valve, facility water).
                saturated = supply_c is not None and supply_c > setpoint_c + 0.5
                high = saturated and approach > cdu.approach_c + s.approach_margin_c
                rising = slope_per_h is not None and slope_per_h * 60 > s.approach_slope_k_per_h
                trend = "" if slope_per_h is None else f", {slope_per_h * 60:+.1f} K/h"
                emit("approach_rising", high or rising, approach,
                     [f"approach {approach:.1f} K (design {cdu.approach_c:.1f} K){trend}"])
            if supply_c is not None and row["dew_point_c"] is not None:
                margin = supply_c - row["dew_point_c"]
                margin_min = self.site.spec.thermal.dew_point_margin_c
                emit("dew_point_margin_low", margin < margin_min, margin,
                     [f"supply {supply_c:.1f} °C only {margin:.1f} K above dew point {row['dew_point_c']:.1f} °C "
                      f"(need {margin_min:.1f} K)"])
            pumps = [row[f"pump{n}"] for n in range(1, cdu.pumps + 1)]
            faults = [row[f"pump{n}_fault"] for n in range(1, cdu.pumps + 1)]
            if all(p is not None for p in pumps):
                running_set = {n for n, p in enumerate(pumps, start=1) if p >= 0.5}
                seen = self._pumps_seen_running.setdefault(cdu.id, set())
                seen |= running_set
                if all(f is not None for f in faults):
                    # the CDU says which pumps are faulted: a stopped healthy pump is standby, and a
                    # repaired one is standby again at once
                    down = {n for n, f in enumerate(faults, start=1) if f >= 0.5} - running_set
                    self._pumps_seen_running[cdu.id] = running_set
                else:
                    # Without fault registers "stopped" alone is not "failed" (standby pumps idle by
                    # design): a pump that has run and stopped is down; pumps never seen running are
                    # standby still available. (A repaired pump counts as down until it runs again.)
                    down = seen - running_set
                spare = cdu.pumps - len(running_set) - len(down)
                needed = cdu.working_pumps
                lost = len(running_set) < needed or spare < cdu.pumps - needed
                detail = f"pump(s) {', '.join(map(str, sorted(down)))} down" if down else "no pump down"
                emit("pump_redundancy_lost", lost, float(len(running_set)),
                     [f"{len(running_set)} of {cdu.pumps} pumps running, {needed} needed for full flow, "
                      f"{max(spare, 0)} standby left ({cdu.pump_redundancy}); {detail}"])
            if row["leak_state"] is not None:
                state = int(row["leak_state"])
                emit("leak_detected", state >= 1, state, [f"CDU leak detector {('OK', 'Warning', 'Critical')[min(state, 2)]}"])
            # CDU heat balance: secondary loop heat vs the liquid share of its racks' power
            powers = [rack_power.get(r) for r in cdu.racks]
            if (row["flow_lpm"] is not None and supply_c is not None and row["return_c"] is not None
                    and powers and all(p is not None for p in powers)):
                expected_kw = sum(powers) * cdu.heat_to_liquid
                if expected_kw >= s.min_load_fraction * cdu.capacity_kw * 0.5:
                    coolant_kw = mean_loop.get(cdu.id, coolant_heat_kw(row["flow_lpm"], row["return_c"] - supply_c))
                    mismatch = (coolant_kw - expected_kw) / expected_kw
                    emit("heat_balance_mismatch", abs(mismatch) > s.heat_balance_tolerance, mismatch,
                         [f"loop carries {coolant_kw:.0f} kW, racks put {expected_kw:.0f} kW into the liquid ({mismatch:+.0%})"])
        return out

    def stale_after_s(self, info) -> float:
        """Seconds without a good sample after which a device (or one of its signals) is stale."""
        return self.settings.stale_after_s or max(10.0, 5 * info.poll_interval_s)

    def stale_observations(self, now: datetime) -> list[Observation]:
        """`sensor_stale` of every device at sample time `now`, for when no batch arrives at all
        (a dead collector or broker): without it the silence itself would never alert."""
        if self._started is None:
            return []
        return self._sensor_checks(_to_dt(now), ())

    def _sensor_checks(self, now: datetime, touched: Iterable[str]) -> list[Observation]:
        s = self.settings
        out: list[Observation] = []
        now_naive = now.replace(tzinfo=None)
        started = self._started.replace(tzinfo=None) if self._started else now_naive
        analog_all = self._last.filter(
            pl.any_horizontal(*[pl.col("metric").str.ends_with(x) for x in s.stuck_metric_suffixes])
        ).with_columns(((pl.lit(now_naive) - pl.col("ts")).dt.total_milliseconds() / 1000.0).alias("age_s"),
                       ((pl.lit(now_naive) - pl.col("changed_ts")).dt.total_milliseconds() / 1000.0).alias("unchanged_s"))
        point_ages: dict[str, list[tuple[str, float]]] = {}
        for device, metric, age in analog_all.select("device", "metric", "age_s").iter_rows():
            point_ages.setdefault(device, []).append((metric, age))
        for info in self.devices.values():
            stale_after = self.stale_after_s(info)
            last = self._last_seen.get(info.device)
            age_s = (now_naive - (last or started)).total_seconds()
            labels = {"site": self.site.id, "device": info.device, "kind": info.kind, "entity": info.entity}
            if info.module:
                labels["module"] = info.module
            reasons = [f"no good sample for {age_s:.0f} s (stale after {stale_after:.0f} s)" if last
                       else f"no good sample since checks started {age_s:.0f} s ago"]
            active = age_s > stale_after
            if not active:
                # The device reports, but a signal it used to send has dropped out (one register
                # or topic failing): stale too, named - not "stuck" at its last value.
                dropped = sorted(((m, a) for m, a in point_ages.get(info.device, ()) if a > stale_after),
                                 key=lambda x: -x[1])
                if dropped:
                    active, age_s = True, dropped[0][1]
                    reasons = [f"{m}: no good sample for {a:.0f} s while the device reports (stale after "
                               f"{stale_after:.0f} s)" for m, a in dropped]
            out.append(Observation(rule="sensor_stale", target=info.device, active=active,
                                   ts=now, value=age_s, labels=labels, reasons=reasons))
        touched = set(touched)
        analog = analog_all.filter(pl.col("device").is_in(list(touched)))
        if analog.is_empty():
            return out
        for device, metrics, unchanged, values, ages in analog.group_by("device").agg(
                pl.col("metric"), pl.col("unchanged_s"), pl.col("value"), pl.col("age_s")).iter_rows():
            if device not in self.devices:
                continue
            info = self.devices[device]
            stale_after = self.stale_after_s(info)
            # a value at exactly 0 repeats exactly because it is true (an empty rack's PDU, no flow
            # while the pumps are down): not evidence of a frozen sensor, and the physics checks
            # judge a zero flow or power; a live signal's noise never repeats bit for bit. A
            # signal that no longer arrives is stale (above), not stuck.
            stuck = [(m, u, v) for m, u, v, a in zip(metrics, unchanged, values, ages)
                     if u > s.stuck_after_s and v != 0 and a <= stale_after]
            worst = max(unchanged)
            labels = {"site": self.site.id, "device": device, "kind": info.kind, "entity": info.entity}
            reasons = [f"{m} unchanged at {v:g} for {u:.0f} s" for m, u, v in sorted(stuck, key=lambda x: -x[1])]
            out.append(Observation(rule="sensor_stuck", target=device, active=bool(stuck), ts=now,
                                   value=float(worst), labels=labels,
                                   reasons=reasons or [f"analog signals changing (longest unchanged {worst:.0f} s)"]))
        return out


def _seconds(s: float):
    from datetime import timedelta

    return timedelta(seconds=s)


def active(observations: Iterable[Observation]) -> list[Observation]:
    """The observations whose condition holds (handy for logs and tests)."""
    return [o for o in observations if o.active]
