"""Quantile forecasts (P50/P95/P99) of the peak demand of every node over the next 24 h and 7 days.

This module owns the forecasting method; `headroom.py` turns its output into headroom rows and
`backtest.py` evaluates it. Method (docs/analytics.md, "Forecasts"):

- Input: hourly peaks per node (max of the bucketed design load in each clock hour, `load.py`).
- Target at an origin hour t: the peak over hours t+1 .. t+H (H = 24 or 168) — the number
  headroom is about — divided by the node's scale (its mean load over the last 7 days), so one
  *global* model learns from every node at once whatever its size.
- Base and spread (order statistics of maxima): the peak of H/24 days is the max of H/24 daily
  peaks (origin-aligned 24 h windows tile the horizon). A Gumbel law is fitted to the node's daily
  peaks of the last 28 days by their 75th and 95th percentiles (the upper tail, which decides a
  window's peak: quiet weekends do not widen it, a rack feed clipped at its rating gets its clip);
  the max of n iid Gumbel(mu, beta) is Gumbel(mu + beta ln n, beta). base = mu + beta ln(H/24),
  spread = beta.
- Normalised target z = (peak − base) / spread: a steady rack feed clipped at its rating and a
  busway whose peak is the coincidence of many bursts land on one scale, so one model and one
  conformal offset serve both (the old un-normalised model, `normalise="none"`, was over-wide
  for the first and too narrow for the second).
- Features, in the same z units: load now, peaks of the last 24 h and 7 days, the same window
  one and two weeks ago (seasonal naive), mean daily/weekly peaks, median/90th pct/max of the
  daily peaks of the last 14 days, max of the last 4 weekly peaks, recent means (trend); plus
  the spread, variability, local hour and day of week of the window start, log rack count.
- Model: for the 24 h horizon scikit-learn `HistGradientBoostingRegressor(loss="quantile")` on z,
  one per level. For the 7-day horizon (and for 24 h while the history is too short for boosting)
  the direct model: z_τ = −ln(−ln τ) (the Gumbel quantile itself), conformally shifted — it needs
  no training rows, only calibration rows. A weekly target has one independent value per node and
  week; boosting on it learned noise (7-day P95 pinball 4–15 % worse than the direct model on
  140-day histories, docs/analytics.md).
- Calibration: split conformal (one-sided per level) on the z residuals of the latest held-out
  origins (all known rows for the direct model), so P95 covers ~95 % on exchangeable data.
  Quantiles are then made non-crossing.
- Baseline: seasonal naive — the peak of the same window one week earlier (24 h) or the last
  7 days' peak (7 d) — plus empirical quantiles of each node's own naive residuals on the same
  training rows (`predict_naive`; `pooled=True`: residuals of all nodes together, weaker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

HORIZON_HOURS = {"24h": 24, "7d": 168}
QUANTILES = (0.5, 0.95, 0.99)
MODEL_VERSION = "hgb-quantile-gumbel-normalised-cqr/3"
NAIVE_VERSION = "seasonal-naive/1"
DIRECT_VERSION = "gumbel-daily-peaks-conformal/2"
MIN_DIRECT_CALIBRATION = 20  # rows with a known peak the direct Gumbel model needs for its conformal offsets
WEEK_H = 168
MIN_SCALE_KW = 1.0  # an idle node has no meaningful relative scale; below this use 1 kW

FEATURES = ("now", "peak_24h", "peak_7d", "naive", "naive_2w", "daily_peak_mean_7d", "weekly_peak_mean_4w",
            "mean_24h", "mean_7d_prev", "std_7d", "hour", "dow", "log_racks")
# levels (scaled kW) that the normalised model sees relative to the base and in units of the spread
LEVEL_FEATURES = ("now", "peak_24h", "naive", "naive_2w", "daily_peak_mean_7d", "weekly_peak_mean_4w", "mean_24h",
                  "mean_7d_prev", "daily_peak_q50_14d", "daily_peak_q90_14d", "daily_peak_max_14d", "weekly_peak_max_4w")
SHAPE_FEATURES = ("spread", "peak_7d", "std_7d", "hour", "dow", "log_racks")
DAILY_PEAKS_BACK = 14  # daily-window peaks summarised as features (2 weeks: every weekday twice)
# The Gumbel law of the daily peaks (base and spread) is fitted to 4 weeks of them (every weekday
# four times): with 14 days its upper quantile was the second-largest peak, so base and spread
# moved with single days. 56 days scored alike on the demo histories and follows a step in load
# half as fast.
GUMBEL_DAYS_BACK = 28
# ... by their 75th and 95th percentiles: a window's peak is decided by the upper tail of the daily
# peaks, so the fit looks only there; weekends and quiet days below it do not widen the spread, and
# a rack feed that reaches its rated clip on more than a quarter of days gets its clip as base and
# no spread (the median/90th-percentile fit gave it a 7-day P95 several % above its rating)
GUMBEL_FIT_LEVELS = (0.75, 0.95)
SPREAD_FLOOR = 1e-3  # scaled units (0.1 % of the node's mean): a perfectly flat peak still has some width
MIN_NODE_NAIVE_RESIDUALS = 48  # training rows a node needs for its own seasonal-naive residual quantiles
MIN_GROUP_CALIBRATION = 200  # rows a node group needs for its own conformal offsets (else the global ones)


@dataclass(frozen=True)
class NodeInfo:
    """What the model may know about a series besides its values: its kind (the conformal group)
    and how many racks it aggregates (aggregates are smoother: peaks sit closer to the mean)."""

    kind: str
    racks: int


class ForecastConfig(BaseModel):
    """Settings of the peak forecaster (defaults were chosen on simulated histories, see the backtest)."""

    model_config = ConfigDict(extra="forbid")

    quantiles: tuple[float, ...] = Field(QUANTILES, description="Quantile levels, each in (0, 1)")
    train_stride_h: int = Field(3, ge=1, description="Use every n-th hourly origin for training (neighbours overlap)")
    calibration_fraction: float = Field(0.3, gt=0.05, lt=0.8, description="Latest share of training origins held out for conformal calibration")
    max_iter: int = Field(100, ge=10)
    learning_rate: float = Field(0.06, gt=0, le=1)
    max_leaf_nodes: int = Field(8, ge=2)
    min_samples_leaf: int = Field(40, ge=1)
    min_training_rows: int = Field(150, ge=10, description="Below this many rows the horizon falls back to seasonal naive")
    calibration: Literal["cqr", "median"] = Field(
        "cqr", description="cqr: one quantile model per level, each shifted by its held-out residual quantile; "
                              "median: one median model, every level = median + held-out residual quantile "
                              "(cheaper; loses on clipped, heteroscedastic peaks — see the backtest)")
    mondrian: bool = Field(False, description="Separate conformal offsets per node kind (rack feeds, busways, ...) "
                                              "when a kind has enough held-out rows. Off by default: on simulated "
                                              "histories it made the 7-day P95 worse (a 7-day window leaves few "
                                              "independent rows per kind); the normalised target evens kinds out instead")
    normalise: Literal["none", "center", "scale"] = Field("scale", description="scale: model and calibrate z = (peak - Gumbel base) / Gumbel spread of the "
                                             "recent daily peaks, so that one global model and one conformal offset fit "
                                             "steady rack feeds and fluctuating aggregates alike")
    model: Literal["auto", "gbm", "gumbel"] = Field(
        "auto", description="gbm: quantile gradient boosting on the normalised features; gumbel: the direct "
                            "order-statistics model only (Gumbel quantile of the window peak + conformal shift), "
                            "which is also the fallback when the history is too short for gbm; auto: gbm for "
                            "horizons shorter than a week, gumbel for a week or more (a weekly target gives one "
                            "independent row per node and week: too few for boosting to learn more than noise)")
    random_state: int = 0


@dataclass
class FeatureTable:
    """Origins (node, hour) with scaled features, scale (kW) and scaled target (NaN if unknown)."""

    frame: pl.DataFrame  # ts (origin hour start), node, FEATURES..., scale, target, naive
    horizon_h: int

    def matrix(self, rows: pl.DataFrame | None = None) -> np.ndarray:
        return (self.frame if rows is None else rows).select(FEATURES).to_numpy().astype(np.float64)

    def design(self, rows: pl.DataFrame | None = None, normalise: str = "scale"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features, base, spread) of `rows` (scaled units). "scale": the model works in
        z = (value − base) / spread, base and spread from the Gumbel fit to recent daily peaks
        (module docstring); features are levels in the same units plus shape/calendar columns.
        "center": value − base, spread 1. "none": the raw scaled FEATURES, base 0, spread 1."""
        rows = self.frame if rows is None else rows
        if normalise == "none":
            return self.matrix(rows), np.zeros(rows.height), np.ones(rows.height)
        base = rows["base"].to_numpy().astype(np.float64)
        spread = rows["spread"].to_numpy().astype(np.float64)
        spread = np.maximum(np.nan_to_num(spread, nan=SPREAD_FLOOR), SPREAD_FLOOR)
        if normalise == "center":
            levels = rows.select(LEVEL_FEATURES).to_numpy().astype(np.float64)
            shape = rows.select(SHAPE_FEATURES).to_numpy().astype(np.float64)
            shape[:, 0] = spread
            shape[:, 1] = shape[:, 1] - base
            return np.column_stack([levels - base[:, None], shape]), base, np.ones(rows.height)
        levels = rows.select(LEVEL_FEATURES).to_numpy().astype(np.float64)
        shape = rows.select(SHAPE_FEATURES).to_numpy().astype(np.float64)
        shape[:, 0] = spread
        shape[:, 1] = (shape[:, 1] - base) / spread
        return np.column_stack([(levels - base[:, None]) / spread[:, None], shape]), base, spread


def _window_reduce(y: np.ndarray, width: int, reduce) -> np.ndarray:
    """`reduce` (nanmax, nanmean, nanstd) over each trailing window of `width`, NaN-aware;
    NaN where the window is not full yet."""
    out = np.full(y.shape, np.nan)
    if len(y) < width:
        return out
    windows = np.lib.stride_tricks.sliding_window_view(y, width)
    with np.errstate(all="ignore"), _nan_warnings_off():
        out[width - 1:] = reduce(windows, axis=1)
    return out


def _window_max(y: np.ndarray, width: int) -> np.ndarray:
    return _window_reduce(y, width, np.nanmax)


def _window_mean(y: np.ndarray, width: int) -> np.ndarray:
    return _window_reduce(y, width, np.nanmean)


def _window_std(y: np.ndarray, width: int) -> np.ndarray:
    return _window_reduce(y, width, np.nanstd)


def _row_quantiles(a: np.ndarray, levels: list[float], unbiased: bool = False) -> np.ndarray:
    """Quantiles along axis 1 ignoring NaN (shape len(levels) x rows; NaN for an all-NaN row).

    Default: linear interpolation like np.quantile (type 7). `unbiased`: median-unbiased plotting
    positions (Hyndman & Fan type 8, np.quantile method="median_unbiased"), so an upper quantile of
    a few weeks of daily peaks is not biased low — with type 7 the "95th percentile" of 28 peaks
    sits at level ~0.92. Vectorised: np.nanquantile loops over rows in Python (~0.5 ms a row)."""
    ordered = np.sort(a, axis=1)  # NaN sort last
    valid = np.sum(~np.isnan(a), axis=1)
    rows = np.arange(a.shape[0])
    last = np.maximum(valid - 1, 0)
    out = np.full((len(levels), a.shape[0]), np.nan)
    for i, level in enumerate(levels):
        pos = (valid + 1 / 3) * level - 2 / 3 if unbiased else (valid - 1) * level  # 0-based
        pos = np.clip(pos, 0, last)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, last)
        frac = pos - lo
        out[i] = np.where(valid > 0, ordered[rows, lo] * (1 - frac) + ordered[rows, hi] * frac, np.nan)
    return out


class _nan_warnings_off:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _shift(a: np.ndarray, k: int) -> np.ndarray:
    """out[t] = a[t-k] (k > 0: past; k < 0: future); NaN outside."""
    out = np.full(a.shape, np.nan)
    if k > 0:
        out[k:] = a[:-k] if k < len(a) else out[k:]
    elif k < 0:
        out[:k] = a[-k:]
    else:
        out[:] = a
    return out


def _gumbel_z(level: float) -> float:
    """Quantile of the standard Gumbel law."""
    return -math.log(-math.log(level))


def build_features(hourly_peaks: pl.DataFrame, horizon_h: int, timezone: str = "UTC",
                   node_info: dict[str, NodeInfo] | None = None, gumbel_days_back: int | None = None,
                   gumbel_fit_levels: tuple[float, float] | None = None) -> FeatureTable:
    """Feature rows for every node and every origin hour with >= 7 days of history behind it.

    `hourly_peaks`: ts (hour start, UTC, regular hourly grid) + one column per node (kW).
    `node_info`: kind and rack count per node (unknown nodes: group 'other', log_racks NaN)."""
    node_info = node_info or {}
    fit_days = gumbel_days_back or GUMBEL_DAYS_BACK
    lo, hi = gumbel_fit_levels or GUMBEL_FIT_LEVELS
    if not 0 < lo < hi < 1:
        raise ValueError(f"gumbel_fit_levels must satisfy 0 < low < high < 1, got {(lo, hi)}")
    hourly = hourly_peaks.sort("ts")
    ts = hourly["ts"]
    # regular grid, so that index arithmetic is time arithmetic
    grid = pl.DataFrame({"ts": pl.datetime_range(ts.min(), ts.max(), "1h", eager=True, time_zone="UTC")})
    hourly = grid.join(hourly, on="ts", how="left")
    ts = hourly["ts"]
    window_start_local = ts.dt.offset_by("1h").dt.convert_time_zone(timezone)
    hour = window_start_local.dt.hour().to_numpy().astype(np.float64)
    dow = window_start_local.dt.weekday().to_numpy().astype(np.float64)
    parts = []
    for node in [c for c in hourly.columns if c != "ts"]:
        y = hourly[node].cast(pl.Float64).fill_nan(None).to_numpy().astype(np.float64)
        mean_7d = _window_mean(y, WEEK_H)
        scale = np.maximum(np.nan_to_num(mean_7d, nan=np.nan), MIN_SCALE_KW)
        future_peak = _shift(_window_max(y, horizon_h), -horizon_h)  # max(y[t+1 .. t+H])
        if horizon_h <= WEEK_H:
            naive = _shift(future_peak, WEEK_H) if horizon_h < WEEK_H else _window_max(y, WEEK_H)
            naive_2w = _shift(future_peak, 2 * WEEK_H) if horizon_h < WEEK_H else _shift(_window_max(y, WEEK_H), WEEK_H)
        else:  # longer than a week: last horizon's peak
            naive = _window_max(y, horizon_h)
            naive_2w = _shift(naive, horizon_h)
        peak_24h = _window_max(y, 24)
        peak_7d = _window_max(y, WEEK_H)
        with _nan_warnings_off():
            # averages of past window peaks: the seasonal level without one week's noise
            daily_peak_mean = np.nanmean(np.column_stack([_shift(peak_24h, 24 * k) for k in range(7)]), axis=1)
            weekly_peak_mean = np.nanmean(np.column_stack([_shift(peak_7d, WEEK_H * k) for k in range(4)]), axis=1)
            # the distribution of recent daily peaks (the next window's peak is a max over such days)
            daily = np.column_stack([_shift(peak_24h, 24 * k) for k in range(DAILY_PEAKS_BACK)])
            daily_q50, daily_q90 = _row_quantiles(daily, [0.5, 0.9])
            # origin-aligned 24 h windows: H/24 of them tile the horizon exactly
            fit_window = np.column_stack([_shift(peak_24h, 24 * k) for k in range(fit_days)])
            fit_lo, fit_hi = _row_quantiles(fit_window, [lo, hi], unbiased=True)
            daily_max = np.nanmax(daily, axis=1)
            weekly_max = np.nanmax(np.column_stack([_shift(peak_7d, WEEK_H * k) for k in range(4)]), axis=1)
            # Base and spread of the normalised model: a Gumbel law fitted to the daily peaks of
            # the last GUMBEL_DAYS_BACK days by two upper quantiles (GUMBEL_FIT_LEVELS), moved to
            # the max of the horizon's days — the max of n iid Gumbel(mu, beta) is
            # Gumbel(mu + beta ln n, beta) (order statistics of maxima).
            spread = (fit_hi - fit_lo) / (_gumbel_z(hi) - _gumbel_z(lo))
            base = fit_lo - spread * _gumbel_z(lo) + spread * math.log(max(horizon_h / 24.0, 1.0))
            base = np.where(np.isnan(base), peak_7d, base)
        cols = {
            "now": y, "peak_24h": peak_24h, "peak_7d": peak_7d, "naive": naive, "naive_2w": naive_2w,
            "daily_peak_mean_7d": daily_peak_mean, "weekly_peak_mean_4w": weekly_peak_mean, "mean_24h": _window_mean(y, 24), "mean_7d_prev": _shift(mean_7d, WEEK_H),
            "std_7d": _window_std(y, WEEK_H), "daily_peak_q50_14d": daily_q50, "daily_peak_q90_14d": daily_q90,
            "daily_peak_max_14d": daily_max, "weekly_peak_max_4w": weekly_max, "spread": spread, "base": base,
        }
        frame = {"ts": ts, "node": [node] * len(y)}
        for name, arr in cols.items():
            frame[name] = arr / scale
        frame["hour"] = hour
        frame["dow"] = dow
        info = node_info.get(node)
        frame["log_racks"] = np.full(len(y), np.log1p(info.racks) if info else np.nan)
        frame["group"] = [info.kind if info else "other"] * len(y)
        frame["scale"] = scale
        frame["target"] = future_peak / scale
        frame["naive_kw"] = naive
        part = pl.DataFrame(frame, strict=False).filter(pl.col("scale").is_not_nan() & ~pl.col("now").is_nan())
        part = part.filter(pl.col("peak_7d").is_not_nan())
        parts.append(part)
    frame = pl.concat(parts) if parts else pl.DataFrame()
    return FeatureTable(frame=frame, horizon_h=horizon_h)


def _conformal_offset(residuals: np.ndarray, level: float) -> float:
    """Finite-sample one-sided split-conformal shift: the ceil((n+1)·τ)-th smallest residual."""
    residuals = np.sort(residuals[np.isfinite(residuals)])
    n = len(residuals)
    if n == 0:
        return 0.0
    k = min(n, max(1, math.ceil((n + 1) * level)))
    return float(residuals[k - 1])


def _non_crossing(q: np.ndarray) -> np.ndarray:
    return np.maximum.accumulate(q, axis=1)


class _GumbelLevel:
    """The τ-quantile of a standard Gumbel variable, in the normalised model's z units (base is the
    Gumbel location of the window peak, spread its scale): the direct order-statistics model."""

    def __init__(self, level: float):
        self.level = level

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), -math.log(-math.log(self.level)))


class PeakForecaster:
    """Global quantile model of the scaled window peak, calibrated by split conformal.

    `fit(table)` uses the rows with a known target; `predict(rows)` returns kW, one column per
    quantile level, non-crossing."""

    def __init__(self, config: ForecastConfig | None = None):
        self.config = config or ForecastConfig()
        self.models: list = []
        self.offsets: list[float] = []
        self.group_offsets: dict[str, list[float]] = {}
        self.naive_offsets: list[float] = []  # pooled over all nodes
        self.naive_node_offsets: dict[str, list[float]] = {}  # per node, where it has enough residuals
        self.method = MODEL_VERSION
        self.trained_from = None
        self.trained_to = None
        self.n_train = 0
        self.n_calibration = 0

    def fit(self, table: FeatureTable) -> PeakForecaster:
        # One OpenMP thread: on a small shared machine the default thread pool oversubscribes the
        # cores and a fit takes ~10x longer (measured: 0.7 s vs 9 s for 2.6k rows, 3 quantiles).
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1):
            return self._fit(table)

    def _fit(self, table: FeatureTable) -> PeakForecaster:
        cfg = self.config
        rows = table.frame.filter(pl.col("target").is_not_nan())
        if rows.is_empty():
            raise ValueError("no training rows with a known target (history shorter than 7 days + horizon)")
        self.trained_from, self.trained_to = rows["ts"].min(), rows["ts"].max()
        origins = rows["ts"].unique().sort()
        cut = origins[int(len(origins) * (1 - cfg.calibration_fraction))]
        gap = pl.duration(hours=table.horizon_h)  # fit targets must not overlap calibration windows
        fit_rows = rows.filter(pl.col("ts") < pl.lit(cut) - gap)
        fit_rows = fit_rows.filter((pl.col("ts").dt.epoch("s") // 3600) % cfg.train_stride_h == 0)
        cal_rows = rows.filter(pl.col("ts") >= cut)
        naive_res = (rows["target"] - rows["naive"]).to_numpy()
        self.naive_offsets = [_conformal_offset(naive_res, q) for q in cfg.quantiles]
        nodes = rows["node"].to_numpy()
        self.naive_node_offsets = {}
        for node in np.unique(nodes):
            mine = naive_res[(nodes == node) & np.isfinite(naive_res)]
            if len(mine) >= MIN_NODE_NAIVE_RESIDUALS:
                self.naive_node_offsets[str(node)] = [_conformal_offset(mine, q) for q in cfg.quantiles]
        direct = (cfg.model == "gumbel" or (cfg.model == "auto" and table.horizon_h >= WEEK_H)
                  or fit_rows.height < cfg.min_training_rows or cal_rows.height < 20)
        if direct and cfg.normalise == "scale" and rows.height >= MIN_DIRECT_CALIBRATION:
            # no (or too little) history for the boosted model: the Gumbel quantile of the window
            # peak itself, z = -ln(-ln τ), conformally shifted on every row with a known peak
            x_all, base_all, spread_all = table.design(rows, cfg.normalise)
            z_all = (rows["target"].to_numpy() - base_all) / spread_all
            self.models = [_GumbelLevel(q) for q in cfg.quantiles]
            self.offsets = [_conformal_offset(z_all - m.predict(x_all), m.level) for m in self.models]
            self.group_offsets = {}
            self.method = DIRECT_VERSION
            self.n_train, self.n_calibration = 0, rows.height
            return self
        if direct:
            self.method = NAIVE_VERSION
            self.models = []
            self.n_train, self.n_calibration = 0, rows.height
            return self
        from sklearn.ensemble import HistGradientBoostingRegressor  # slow to import; the direct model does without

        x_fit, base_fit, spread_fit = table.design(fit_rows, cfg.normalise)
        y_fit = (fit_rows["target"].to_numpy() - base_fit) / spread_fit
        # a lag with no value yet in any training row (e.g. two weeks back in a short history) is
        # set to 0, so the model simply never splits on it (an all-NaN column breaks binning)
        x_fit[:, np.isnan(x_fit).all(axis=0)] = 0.0
        x_cal, base_cal, spread_cal = table.design(cal_rows, cfg.normalise)
        y_cal = (cal_rows["target"].to_numpy() - base_cal) / spread_cal
        self.models, self.offsets = [], []

        def quantile_model(level: float):
            return HistGradientBoostingRegressor(
                loss="quantile", quantile=level, max_iter=cfg.max_iter, learning_rate=cfg.learning_rate,
                max_leaf_nodes=cfg.max_leaf_nodes, min_samples_leaf=cfg.min_samples_leaf,
                early_stopping=False, random_state=cfg.random_state).fit(x_fit, y_fit)

        residuals = []
        if cfg.calibration == "median":
            median = quantile_model(0.5)
            shared = y_cal - median.predict(x_cal)
            for q in cfg.quantiles:
                self.models.append(median)
                residuals.append(shared)
        else:
            for q in cfg.quantiles:
                model = quantile_model(q)
                self.models.append(model)
                residuals.append(y_cal - model.predict(x_cal))
        self.offsets = [_conformal_offset(r, q) for r, q in zip(residuals, cfg.quantiles)]
        # Mondrian conformal: each node kind (rack feeds, busways, ...) gets its own offsets when it
        # has enough calibration rows, so a smooth busway is not calibrated by noisy rack feeds
        groups = cal_rows["group"].to_numpy() if "group" in cal_rows.columns else np.array(["other"] * cal_rows.height)
        self.group_offsets = {}
        for group in (np.unique(groups) if cfg.mondrian else []):
            mask = groups == group
            if mask.sum() >= MIN_GROUP_CALIBRATION:
                self.group_offsets[str(group)] = [_conformal_offset(r[mask], q) for r, q in zip(residuals, cfg.quantiles)]
        self.method = MODEL_VERSION
        self.n_train, self.n_calibration = fit_rows.height, cal_rows.height
        return self

    def predict(self, table: FeatureTable, rows: pl.DataFrame | None = None) -> np.ndarray:
        rows = table.frame if rows is None else rows
        if not self.models:  # too little history for the model: the fallback is the pooled naive
            return self.predict_naive(rows, pooled=True)  # (per-node residuals would be fewer still)
        from threadpoolctl import threadpool_limits

        x, base, spread = table.design(rows, self.config.normalise)
        with threadpool_limits(1):
            cache: dict[int, np.ndarray] = {}  # the median mode shares one model between levels
            for m in self.models:
                if id(m) not in cache:
                    cache[id(m)] = m.predict(x)
            raw = np.column_stack([cache[id(m)] for m in self.models])
        offsets = np.tile(np.asarray(self.offsets, dtype=float), (rows.height, 1))
        if self.group_offsets and "group" in rows.columns:
            groups = rows["group"].to_numpy()
            for group, offs in self.group_offsets.items():
                offsets[groups == group] = offs
        scaled = base[:, None] + (raw + offsets) * spread[:, None]
        return _non_crossing(np.maximum(scaled, 0.0)) * rows["scale"].to_numpy()[:, None]

    def predict_naive(self, rows: pl.DataFrame, pooled: bool = False) -> np.ndarray:
        """Seasonal-naive quantiles: the naive peak plus empirical quantiles of the naive's own
        residuals on the training rows — each node's own residuals (the standard, and the stronger
        baseline: a steady rack feed gets a tight band, a fluctuating busway a wide one), or, with
        `pooled` or for a node with too few residuals, those of all nodes together."""
        naive = rows["naive"].to_numpy()
        if np.isnan(naive).any():  # no week-old window yet: the last 7 days' peak
            naive = np.where(np.isnan(naive), rows["peak_7d"].to_numpy(), naive)
        offsets = np.tile(np.asarray(self.naive_offsets, dtype=float), (rows.height, 1))
        if not pooled and self.naive_node_offsets:
            nodes = rows["node"].to_numpy()
            for node, offs in self.naive_node_offsets.items():
                offsets[nodes == node] = offs
        scaled = naive[:, None] + offsets
        return _non_crossing(np.maximum(scaled, 0.0)) * rows["scale"].to_numpy()[:, None]

    @property
    def version(self) -> str:
        if self.trained_from is None:
            return self.method
        return f"{self.method} trained {self.trained_from:%Y-%m-%dT%H}..{self.trained_to:%Y-%m-%dT%H}Z"


def pinball_loss(y: np.ndarray, q_pred: np.ndarray, level: float) -> float:
    """Mean pinball (quantile) loss of predictions `q_pred` at `level` for outcomes `y`."""
    diff = np.asarray(y, dtype=float) - np.asarray(q_pred, dtype=float)
    return float(np.nanmean(np.maximum(level * diff, (level - 1) * diff)))


def coverage(y: np.ndarray, q_pred: np.ndarray) -> float:
    """Share of outcomes at or below the predicted quantile."""
    y, q_pred = np.asarray(y, dtype=float), np.asarray(q_pred, dtype=float)
    ok = np.isfinite(y) & np.isfinite(q_pred)
    return float(np.mean(y[ok] <= q_pred[ok])) if ok.any() else float("nan")


@dataclass(frozen=True)
class PeakForecast:
    """Forecast of one node's peak over one horizon, made at `origin` (end of the last full hour)."""

    node: str
    horizon: str
    origin: object  # datetime (UTC): forecast window starts here
    p50_kw: float
    p95_kw: float
    p99_kw: float
    method: str


def forecast_peaks(hourly_peaks: pl.DataFrame, timezone: str = "UTC", config: ForecastConfig | None = None,
                   horizons: tuple[str, ...] = ("24h", "7d"), node_info: dict[str, NodeInfo] | None = None
                   ) -> tuple[list[PeakForecast], dict[str, str]]:
    """Fit on all history and forecast every node's peak from the last hour with data.

    Returns (forecasts, notes per horizon — e.g. why a horizon fell back to seasonal naive or was skipped)."""
    cfg = config or ForecastConfig()
    if set(cfg.quantiles) != set(QUANTILES):
        raise ValueError(f"forecast_peaks writes P50/P95/P99; quantiles must be {QUANTILES}")
    out: list[PeakForecast] = []
    notes: dict[str, str] = {}
    for horizon in horizons:
        h = HORIZON_HOURS[horizon]
        table = build_features(hourly_peaks, h, timezone, node_info)
        if table.frame.is_empty():
            notes[horizon] = "skipped: needs at least 7 days of history"
            continue
        forecaster = PeakForecaster(cfg)
        try:
            forecaster.fit(table)
        except ValueError:
            forecaster.method = NAIVE_VERSION
            forecaster.naive_offsets = [0.0] * len(cfg.quantiles)
            notes[horizon] = (f"seasonal naive without calibration: history too short for a {horizon} target "
                              f"(needs 7 days + {horizon})")
        else:
            if forecaster.method == NAIVE_VERSION:
                notes[horizon] = "seasonal naive: too few training rows for the model"
            elif forecaster.method == DIRECT_VERSION and (cfg.model == "gbm" or (cfg.model == "auto" and h < WEEK_H)):
                notes[horizon] = ("direct Gumbel model of the daily peaks (conformal): too few training rows for "
                                  "the boosted model")
        last = table.frame.group_by("node").agg(pl.col("ts").max().alias("ts"))
        rows = table.frame.join(last, on=["node", "ts"], how="inner").sort("node")
        q = forecaster.predict(table, rows)
        for i, node in enumerate(rows["node"].to_list()):
            origin = rows["ts"][i] + timedelta(hours=1)  # the window starts after the origin hour
            out.append(PeakForecast(node=node, horizon=horizon, origin=origin, p50_kw=float(q[i, 0]),
                                    p95_kw=float(q[i, 1]), p99_kw=float(q[i, 2]), method=forecaster.version))
    return _nested_windows(out), notes


def _nested_windows(forecasts: list[PeakForecast]) -> list[PeakForecast]:
    """The next 7 days contain the next 24 h, so the 7-day peak quantiles can be no lower than the
    24-hour ones; lift them where the two models disagree (they are fitted separately)."""
    import dataclasses

    day = {f.node: f for f in forecasts if f.horizon == "24h"}
    out = []
    for f in forecasts:
        d = day.get(f.node)
        if f.horizon == "7d" and d is not None and f.origin == d.origin:
            f = dataclasses.replace(f, p50_kw=max(f.p50_kw, d.p50_kw), p95_kw=max(f.p95_kw, d.p95_kw),
                                    p99_kw=max(f.p99_kw, d.p99_kw))
        out.append(f)
    return out
