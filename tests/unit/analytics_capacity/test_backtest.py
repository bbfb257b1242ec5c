"""Rolling-origin backtest on short synthetic histories: scores, figures, origin count, no leakage."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from podwatch.analytics.backtest import (HorizonScores, backtest_figures, combine_scores, rolling_origin_backtest,
                                         synthetic_history)
from podwatch.analytics.forecast import ForecastConfig, build_features
from podwatch.analytics.load import node_loads
from tests.unit.analytics_capacity.sites import small_site


@pytest.mark.slow
def test_backtest_scores_and_figures(tmp_path):
    site = small_site([{"racks": [100.0, 120.0]}, {"racks": [80.0]}], pdus=True, timezone="America/Chicago")
    history = synthetic_history(site, days=24, resolution_s=1800, seed=2)
    load = node_loads(site, history, 1800)
    result = rolling_origin_backtest(load.hourly_peaks(), "America/Chicago", ForecastConfig(max_iter=40),
                                     horizons=("24h",), step_h=12, refit_every_h=168, min_train_days=5)
    scores = result.scores["24h"]
    assert scores.origins >= 10 and scores.pairs == scores.origins * len(load.nodes)
    # no peeking: every scored origin lies after the training warm-up
    assert scores.first_origin >= load.loads["ts"].min()
    for q in (0.5, 0.95, 0.99):
        assert 0 <= scores.coverage_model[q] <= 1 and scores.pinball_model[q] > 0 and scores.pinball_naive[q] > 0
        assert scores.pinball_naive_pooled[q] > 0 and 0 <= scores.coverage_naive_pooled[q] <= 1
    assert scores.coverage_model[0.99] >= scores.coverage_model[0.5]
    lines = result.summary_lines()
    assert any("P95: pinball model" in line and "seasonal-naive" in line and "coverage" in line for line in lines)
    assert any("pooled over nodes" in line for line in lines)
    assert scores.improvement_pooled(0.95) == pytest.approx(
        1 - scores.pinball_model[0.95] / scores.pinball_naive_pooled[0.95])
    paths = backtest_figures(result, tmp_path)
    assert [p.name for p in paths] == ["backtest_scores.png", "backtest_node.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    json.dumps({h: s.improvement() for h, s in result.scores.items()})  # plain floats


def test_backtest_refuses_too_short_history():
    site = small_site([{"racks": [100.0]}], pdus=True)
    load = node_loads(site, synthetic_history(site, days=9, resolution_s=3600, seed=1), 3600)
    with pytest.raises(ValueError, match="too short"):
        rolling_origin_backtest(load.hourly_peaks(), horizons=("24h",), min_train_days=10)


@pytest.fixture(scope="module")
def small_history():
    site = small_site([{"racks": [100.0, 120.0]}, {"racks": [80.0]}], pdus=True, timezone="America/Chicago")
    load = node_loads(site, synthetic_history(site, days=40, resolution_s=3600, seed=5), 3600)
    return load.hourly_peaks(), load.node_info()


def test_origins_every_step_from_the_warm_up_to_the_last_observed_horizon(small_history):
    hourly, info = small_history
    result = rolling_origin_backtest(hourly, "America/Chicago", horizons=("7d",), step_h=6, min_train_days=5,
                                     node_info=info)
    s = result.scores["7d"]
    known = build_features(hourly, 168, "America/Chicago", info).frame.filter(pl.col("target").is_not_nan())
    first = known["ts"].min() + timedelta(days=5) + timedelta(hours=168)
    expected = int((known["ts"].max() - first).total_seconds() // (6 * 3600)) + 1
    assert s.origins == expected and s.pairs == expected * len(info)
    assert s.first_origin == first and (s.last_origin - first).total_seconds() % (6 * 3600) == 0
    assert s.last_origin + timedelta(hours=168) <= hourly["ts"].max() + timedelta(hours=1)  # whole horizon observed


@pytest.mark.parametrize("horizon", ["24h", "7d"])
def test_no_origin_sees_its_own_horizon(small_history, horizon):
    """Leakage test: change every load from time T on; forecasts (model and naive) made at origins
    before T must not move — neither their features nor the models fitted before them may see
    data after the origin — and forecasts after T must (else the test could not fail)."""
    hourly, info = small_history
    nodes = [c for c in hourly.columns if c != "ts"]
    cut = hourly["ts"].min() + timedelta(days=30)
    changed = hourly.with_columns([pl.when(pl.col("ts") >= cut).then(pl.col(n) * 1.3).otherwise(pl.col(n)).alias(n)
                                   for n in nodes])
    kwargs = dict(config=ForecastConfig(max_iter=15), horizons=(horizon,), step_h=6, min_train_days=5, node_info=info)
    before = rolling_origin_backtest(hourly, "America/Chicago", **kwargs).predictions.sort("ts", "node")
    after = rolling_origin_backtest(changed, "America/Chicago", **kwargs).predictions.sort("ts", "node")
    cols = [c for c in before.columns if c.startswith(("q", "naive_"))]
    early = before["ts"] < cut
    assert early.sum() > 20 and (~early).sum() > 20
    assert np.array_equal(before.filter(early).select(cols).to_numpy(), after.filter(early).select(cols).to_numpy())
    late_before, late_after = before.filter(~early).select(cols).to_numpy(), after.filter(~early).select(cols).to_numpy()
    assert not np.allclose(late_before, late_after)


def test_combine_scores_weighs_every_pair_alike():
    a = HorizonScores("7d", origins=10, pairs=100, first_origin=datetime(2026, 1, 1), last_origin=datetime(2026, 2, 1),
                      pinball_model={0.95: 1.0}, pinball_naive={0.95: 2.0}, coverage_model={0.95: 0.9},
                      coverage_naive={0.95: 0.8}, pinball_naive_pooled={0.95: 3.0}, coverage_naive_pooled={0.95: 0.7})
    b = HorizonScores("7d", origins=30, pairs=300, first_origin=datetime(2026, 1, 5), last_origin=datetime(2026, 3, 1),
                      pinball_model={0.95: 2.0}, pinball_naive={0.95: 2.0}, coverage_model={0.95: 1.0},
                      coverage_naive={0.95: 0.8}, pinball_naive_pooled={0.95: 3.0}, coverage_naive_pooled={0.95: 0.7})
    both = combine_scores([a, b])
    assert (both.origins, both.pairs) == (40, 400)
    assert both.pinball_model[0.95] == pytest.approx(1.75) and both.coverage_model[0.95] == pytest.approx(0.975)
    assert both.improvement(0.95) == pytest.approx(1 - 1.75 / 2.0)
    assert (both.first_origin, both.last_origin) == (datetime(2026, 1, 1), datetime(2026, 3, 1))
    with pytest.raises(ValueError):
        combine_scores([a, HorizonScores("24h", 1, 1, None, None)])


def test_a_model_worse_than_the_baseline_is_called_worse():
    from podwatch.analytics.backtest import _better_or_worse
    assert _better_or_worse(0.354) == "35.4 % better"
    assert _better_or_worse(-0.346) == "34.6 % worse"
