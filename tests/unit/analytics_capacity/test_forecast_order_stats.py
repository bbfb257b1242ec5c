"""The order-statistics base of the peak forecaster: Gumbel fit to the upper tail of the daily
peaks, moved to the max of the horizon's days, and the model chosen per horizon."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import polars as pl
import pytest

from podwatch.analytics.forecast import (DIRECT_VERSION, GUMBEL_DAYS_BACK, GUMBEL_FIT_LEVELS, MODEL_VERSION,
                                         ForecastConfig, PeakForecaster, _row_quantiles, build_features,
                                         forecast_peaks)

T0 = datetime(2026, 1, 5, tzinfo=timezone.utc)
MU_KW, BETA_KW = 100.0, 5.0


def iid_gumbel_days(nodes: int, days: int, seed: int = 1) -> tuple[pl.DataFrame, np.ndarray]:
    """Hourly load at 40 kW except one random hour a day at an iid Gumbel(MU, BETA) daily peak."""
    rng = np.random.default_rng(seed)
    peaks = rng.gumbel(MU_KW, BETA_KW, (nodes, days))
    data = {"ts": [T0 + timedelta(hours=i) for i in range(days * 24)]}
    for n in range(nodes):
        y = np.full(days * 24, 40.0)
        y[np.arange(days) * 24 + rng.integers(0, 24, days)] = peaks[n]
        data[f"n{n}"] = y
    return pl.DataFrame(data).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC"))), peaks


def gumbel_z(level: float) -> float:
    return -math.log(-math.log(level))


def test_base_and_spread_are_the_gumbel_fit_of_the_daily_peaks_moved_to_the_weekly_max():
    hourly, peaks = iid_gumbel_days(nodes=3, days=GUMBEL_DAYS_BACK + 1)
    # origin at the last hour of the last day: its 28 trailing 24 h windows are the 28 calendar days
    origin = T0 + timedelta(days=GUMBEL_DAYS_BACK + 1, hours=-1)
    rows = build_features(hourly, 168).frame.filter(pl.col("ts") == origin).sort("node")
    lo, hi = GUMBEL_FIT_LEVELS
    for i, row in enumerate(rows.iter_rows(named=True)):
        # day 0 is outside the 28-day window; median-unbiased sample quantiles
        q_lo, q_hi = np.quantile(peaks[i, 1:], [lo, hi], method="median_unbiased")
        beta = (q_hi - q_lo) / (gumbel_z(hi) - gumbel_z(lo))
        mu = q_lo - beta * gumbel_z(lo)
        assert row["spread"] * row["scale"] == pytest.approx(beta)
        assert row["base"] * row["scale"] == pytest.approx(mu + beta * math.log(7))


def test_row_quantiles_match_numpy_with_gaps():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 28))
    a[rng.random(a.shape) < 0.3] = np.nan
    a[3] = np.nan  # a row without any value stays NaN
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        linear = np.nanquantile(a, [0.5, 0.75, 0.95], axis=1)
        unbiased = np.nanquantile(a, [0.5, 0.75, 0.95], axis=1, method="median_unbiased")
    assert np.allclose(_row_quantiles(a, [0.5, 0.75, 0.95]), linear, equal_nan=True)
    assert np.allclose(_row_quantiles(a, [0.5, 0.75, 0.95], unbiased=True), unbiased, equal_nan=True)


@pytest.mark.parametrize("seed", [4, 6])
def test_direct_quantiles_match_the_closed_form_of_the_max_of_seven_iid_gumbel_days(seed):
    """Max of 7 iid Gumbel(mu, beta) is Gumbel(mu + beta ln 7, beta): its τ-quantile is
    mu + beta (ln 7 − ln(−ln τ)). The fitted (not yet calibrated) quantiles estimate it; averaged
    over 40 nodes the sampling noise of 28 days is ~0.1 beta at P50 and ~0.3 beta at P95/P99. A
    wrong number of days would be off by beta ln 7 ~ 2 beta; the old linear sample quantiles
    were ~0.55 beta low at P95 and ~0.8 beta at P99 on these draws."""
    hourly, _ = iid_gumbel_days(nodes=40, days=GUMBEL_DAYS_BACK + 1, seed=seed)
    origin = T0 + timedelta(days=GUMBEL_DAYS_BACK + 1, hours=-1)
    rows = build_features(hourly, 168).frame.filter(pl.col("ts") == origin)
    base_kw, spread_kw = (rows["base"] * rows["scale"]).to_numpy(), (rows["spread"] * rows["scale"]).to_numpy()
    assert spread_kw.mean() == pytest.approx(BETA_KW, rel=0.15)
    for level, tolerance in ((0.5, 0.15), (0.95, 0.4), (0.99, 0.5)):
        closed_form = MU_KW + BETA_KW * (math.log(7) - math.log(-math.log(level)))
        fitted = base_kw + spread_kw * gumbel_z(level)
        assert fitted.mean() == pytest.approx(closed_form, abs=tolerance * BETA_KW)
    # the same fit for the next 24 h: one day, no ln n shift
    day = build_features(hourly, 24).frame.filter(pl.col("ts") == origin)
    assert np.allclose((rows["base"] - day["base"]).to_numpy(), (day["spread"] * math.log(7)).to_numpy())


def test_calibrated_direct_model_covers_the_weekly_max_of_iid_days():
    """Split conformal on earlier weeks: P95 of the 7-day peak covers ~95 % of later weeks."""
    hourly, _ = iid_gumbel_days(nodes=40, days=70, seed=9)
    table = build_features(hourly, 168)
    known = table.frame.filter(pl.col("target").is_not_nan())
    cut = T0 + timedelta(days=49)
    train = type(table)(frame=known.filter(pl.col("ts") <= cut - timedelta(hours=168)), horizon_h=168)
    model = PeakForecaster(ForecastConfig()).fit(train)
    assert model.method == DIRECT_VERSION
    test = known.filter((pl.col("ts") > cut) & ((pl.col("ts").dt.hour()) == 23))  # one origin a day
    q = model.predict(table, test)
    y = (test["target"] * test["scale"]).to_numpy()
    assert 0.90 <= np.mean(y <= q[:, 1]) <= 0.99
    assert 0.35 <= np.mean(y <= q[:, 0]) <= 0.65


def test_a_rack_feed_at_its_rated_clip_gets_its_clip_as_the_weekly_peak():
    """The upper-tail fit: a feed that reaches its rating on most weekdays (weekends lower) has its
    75th and 95th percentile daily peak at the clip, so base = clip and no spread."""
    h = np.arange(35 * 24)
    daily = 0.5 - 0.5 * np.cos(2 * np.pi * (h % 24 - 4) / 24)
    weekly = np.where((h // 24) % 7 >= 5, 0.85, 1.0)
    rng = np.random.default_rng(0)
    rack = 100 * np.minimum((0.6 + 0.5 * daily) * weekly + rng.normal(0, 0.03, len(h)), 1.0)
    hourly = pl.DataFrame({"ts": [T0 + timedelta(hours=int(i)) for i in h], "rack": rack}).with_columns(
        pl.col("ts").cast(pl.Datetime("us", "UTC")))
    last = build_features(hourly, 168).frame.tail(1)
    assert last["base"][0] * last["scale"][0] == pytest.approx(100.0, abs=0.01)
    assert last["spread"][0] * last["scale"][0] < 0.01


def test_auto_model_boosts_the_24h_horizon_and_uses_the_direct_model_for_7_days():
    from tests.unit.analytics_capacity.test_forecast import synthetic_hourly

    forecasts, notes = forecast_peaks(synthetic_hourly(days=49, nodes=3), config=ForecastConfig(max_iter=20))
    methods = {f.horizon: f.method for f in forecasts}
    assert methods["24h"].startswith(MODEL_VERSION) and methods["7d"].startswith(DIRECT_VERSION)
    assert notes == {}  # the 7-day direct model is the choice, not a fallback worth a note


def test_gumbel_fit_levels_are_checked():
    hourly, _ = iid_gumbel_days(nodes=1, days=10)
    with pytest.raises(ValueError, match="gumbel_fit_levels"):
        build_features(hourly, 24, gumbel_fit_levels=(0.95, 0.75))
