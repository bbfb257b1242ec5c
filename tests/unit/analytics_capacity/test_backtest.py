"""Rolling-origin backtest on a short synthetic history: scores and figures."""

from __future__ import annotations

import json

import pytest

from podwatch.analytics.backtest import backtest_figures, rolling_origin_backtest, synthetic_history
from podwatch.analytics.forecast import ForecastConfig
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
