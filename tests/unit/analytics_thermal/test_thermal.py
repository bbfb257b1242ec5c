"""Labels, reasons, and model save/load with metadata (small hand-made histories)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from podwatch.analytics.features import build_features
from podwatch.analytics.thermal import (
    ModelError, ThermalModel, TrainingRun, breaches_from_features, explain, label_features, level_of,
    risk_rows_for_db, train_thermal,
)
from podwatch.site import load_site

from .frames import T0, healthy_rows

SITE = load_site(Path(__file__).parents[3] / "examples/sites/demo.yaml")
RACK = "m1-r03"


def restriction_rows(onset_s: int, seconds: int, rate_per_s: float) -> pl.DataFrame:
    """Rack flow falls linearly from onset; the return follows the steady state ΔT = P/(ṁ c_p)."""
    def override(t, kind, entity, m, value):
        if entity != RACK or t < onset_s:
            return value
        share = max(0.25, 1.0 - rate_per_s * (t - onset_s))
        if m == "rack.liquid_flow_lpm":
            return value * share
        if m == "rack.liquid_return_temp_c":
            supply = SITE.cdu("cdu-m1").supply_setpoint_c
            return supply + (value - supply) / share
        return value
    return healthy_rows(SITE, 0, seconds, load=1.0, override=override)


@pytest.fixture(scope="module")
def runs():
    out = []
    for i, (onset, rate) in enumerate([(200, 0.0015), (300, 0.001), (150, 0.002), (250, 0.0012)]):
        feats = build_features(restriction_rows(onset, 1200, rate), SITE)
        out.append(TrainingRun(f"restriction-{i}", feats, breaches_from_features(feats)))
    healthy = build_features(healthy_rows(SITE, 0, 1200, load=1.0), SITE)
    out.append(TrainingRun("healthy", healthy, None))
    return out


def test_labels_mark_the_horizon_before_a_breach_and_skip_the_breach():
    feats = build_features(restriction_rows(200, 1200, 0.0015), SITE)
    breaches = breaches_from_features(feats)
    assert breaches.filter(pl.col("rack") == RACK).height == 1
    assert set(breaches["rack"]) == {RACK}
    b = breaches["breach_ts"][0]
    lab = label_features(feats, breaches, horizon_s=300).filter(pl.col("rack") == RACK)
    pos = lab.filter(pl.col("label") == 1)
    assert pos["ts"].min() == b - timedelta(seconds=300)  # breach within (ts, ts + 300 s]
    assert pos["ts"].max() == b - timedelta(seconds=10)
    assert lab.filter(pl.col("ts") >= b)["in_breach"].all()
    assert lab.filter(pl.col("ts") < b)["in_breach"].any() is False


def test_explain_names_flow_and_delta_t_in_words():
    row = {"flow_ratio": 0.59, "flow_per_kw": 0.71, "design_flow_per_kw": 1.2, "dt_ratio": 1.6, "delta_t_c": 17.0,
           "dt_design_c": 10.5, "return_slope_2m": 1.2, "margin_c": 6.0, "return_c": 49.0, "limit_c": 55.0}
    reasons = explain(row)
    assert any(r.startswith("flow 0.71 L/min/kW (design 1.20)") for r in reasons), reasons
    assert any("ΔT 17 K (design 10 K) and rising 1.2 K/min" in r for r in reasons), reasons
    assert explain({"flow_ratio": 1.0, "margin_c": 15.0, "return_c": 40.0, "limit_c": 55.0}) == \
        ["all signals within healthy ranges"]



def test_explain_says_when_the_return_and_flow_are_estimated():
    row = {"flow_ratio": 0.59, "flow_per_kw": 0.71, "design_flow_per_kw": 1.2, "margin_c": 3.0, "return_c": 52.0,
           "limit_c": 55.0, "return_estimated": True}
    reasons = explain(row)
    assert "return 52.0 °C (estimated from the CDU and PDUs), 3.0 K below the 55 °C limit" in reasons, reasons
    assert any(r.startswith("flow 0.71 L/min/kW (estimated from the CDU and PDUs)") for r in reasons), reasons
    assert not any("estimated" in r for r in explain({**row, "return_estimated": False}))


def test_breaches_are_not_read_from_estimated_returns():
    ts = [T0 + timedelta(seconds=10 * i) for i in range(4)]
    f = pl.DataFrame({"rack": ["r1"] * 4 + ["r2"] * 4, "ts": ts * 2, "return_c": [50.0, 56.0, 56.0, 50.0] * 2,
                      "limit_c": [55.0] * 8, "return_estimated": [False] * 4 + [True] * 4})
    assert breaches_from_features(f)["rack"].to_list() == ["r1"]

def test_levels():
    assert [level_of(p) for p in (0.0, 0.2, 0.5, 0.79, 0.8, 1.0)] == \
        ["ok", "watch", "warning", "warning", "critical", "critical"]


@pytest.mark.slow
def test_train_score_save_load_round_trip(runs, tmp_path):
    model = train_thermal(runs, horizon_s=300, max_iter=60)
    feats = runs[0].features
    scores = model.score(feats)
    assert scores.columns == ["rack", "ts", "horizon_s", "probability", "level", "reasons", "model_version"]
    rack = scores.filter(pl.col("rack") == RACK).sort("ts")
    breach = runs[0].breaches["breach_ts"][0]
    # risk is high in the minutes before the breach, low on healthy racks and early on
    before = rack.filter((pl.col("ts") < breach) & (pl.col("ts") >= breach - timedelta(seconds=120)))
    assert before["probability"].min() > 0.5
    assert scores.filter(pl.col("rack") != RACK)["probability"].max() < 0.5
    assert rack.filter(pl.col("ts") < T0 + timedelta(seconds=180))["probability"].max() < 0.5
    first_reasons = before["reasons"].to_list()[0]
    assert first_reasons and first_reasons[0] != "all signals within healthy ranges"

    model.save(tmp_path)
    meta = json.loads((tmp_path / "thermal.json").read_text())
    assert meta["features"] == model.features and meta["horizon_s"] == 300
    assert meta["version"] == model.version and meta["runs"] == [r.name for r in runs]
    assert meta["training_range"]["from"] < meta["training_range"]["to"]
    loaded = ThermalModel.load(tmp_path)
    assert loaded.version == model.version
    np.testing.assert_allclose(loaded.predict_proba(feats), model.predict_proba(feats))
    model.update_scores(tmp_path, {"recall_at_2min": 1.0})
    assert json.loads((tmp_path / "thermal.json").read_text())["scores"] == {"recall_at_2min": 1.0}

    db = risk_rows_for_db(scores.head(3))
    assert db.schema["ts"] == pl.Datetime("us", "UTC")
    assert json.loads(db["reasons"][0]) == list(scores["reasons"][0])


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelError, match="podwatch train thermal"):
        ThermalModel.load(tmp_path)
    (tmp_path / "thermal.joblib").write_text("not a model")
    with pytest.raises(ModelError, match="cannot read"):
        ThermalModel.load(tmp_path)


def test_training_needs_both_classes():
    healthy = build_features(healthy_rows(SITE, 0, 120), SITE)
    with pytest.raises(ModelError, match="both"):
        train_thermal([TrainingRun("h", healthy, None)])


def test_physics_only_risk_rises_before_the_breach_without_training():
    from podwatch.analytics.thermal import PhysicsRiskModel

    feats = build_features(restriction_rows(200, 1200, 0.0015), SITE)
    breach = breaches_from_features(feats)["breach_ts"][0]
    scores = PhysicsRiskModel(300).score(feats).filter(pl.col("rack") == RACK).sort("ts")
    assert scores["model_version"][0] == "thermal-physics-only"
    early = scores.filter(pl.col("ts") < T0 + timedelta(seconds=200))
    late = scores.filter((pl.col("ts") < breach) & (pl.col("ts") >= breach - timedelta(seconds=60)))
    assert early["probability"].max() < 0.2
    assert late["probability"].min() >= 0.5
    assert scores.filter(pl.col("ts") >= breach)["probability"].max() == 1.0


def test_explain_names_what_drives_the_worst_case():
    row = {"return_c": 48.0, "limit_c": 55.0, "margin_c": 7.0, "margin_ss_c": 4.0, "worst_margin_c": -1.5,
           "supply_c": 40.0, "supply_worst_c": 43.2, "power_kw": 100.0, "power_worst_kw": 130.0,
           "flow_lpm": 150.0, "flow_proj_lpm": 149.0}
    text = " ".join(explain(row))
    assert "within the horizon the return may settle near 56 °C (limit 55 °C)" in text
    assert "supply up to 43.2 °C" in text and "load up to 130 kW" in text and "flow down" not in text


class _Confident:
    """A classifier that is sure of a breach on every row: what the gate lets through shows."""

    def predict_proba(self, x):
        return np.column_stack([np.full(len(x), 0.1), np.full(len(x), 0.9)])


def test_a_return_settling_after_a_load_step_does_not_pass_the_gate_one_running_away_does():
    from podwatch.analytics.thermal import MODEL_GATE_CAP
    model = ThermalModel(_Confident(), ["worst_margin_c"], 300, "test")
    rows = pl.DataFrame({
        "worst_margin_c": [14.9, 14.9, 14.9, 3.0],
        "proj_margin_c": [4.2, 4.2, 9.0, 4.2],  # the return climbed fast in the last 2 minutes
        "balance_error_c": [-0.2, 3.0, 3.0, -0.2],  # at its settled value / 3 K above the balance
        "margin_c": [15.4, 15.4, 15.4, 6.0]})
    p = model.predict_proba(rows)
    assert p[0] == pytest.approx(MODEL_GATE_CAP)  # heading for a settled return 15 K below the limit
    assert p[1] == pytest.approx(0.9)  # above the balance: a flow loss the flow sensor misses
    assert p[2] == pytest.approx(MODEL_GATE_CAP)  # both margins wide
    assert p[3] == pytest.approx(0.9)  # the worst case itself is close


@pytest.mark.slow
def test_a_model_trains_without_the_signals_no_training_site_measures(tmp_path):
    """A colo pod whose landlord CDU sends no telemetry (examples/sites/mqtt-only.yaml): every CDU
    column is empty. Training leaves those signals out (and says so) instead of failing, and
    the model scores frames that lack them."""
    def without_cdus(rows: pl.DataFrame) -> pl.DataFrame:
        return rows.filter(~pl.col("device").str.starts_with("cdu-"))

    runs = []
    for i, (onset, rate) in enumerate([(200, 0.0015), (300, 0.001)]):
        feats = build_features(without_cdus(restriction_rows(onset, 1200, rate)), SITE)
        runs.append(TrainingRun(f"restriction-{i}", feats, breaches_from_features(feats)))
    assert runs[0].features["cdu_flow_ratio"].null_count() == runs[0].features.height
    model = train_thermal(runs, horizon_s=300, max_iter=30)
    assert "cdu_flow_ratio" not in model.features and "supply_over_setpoint_c" not in model.features
    assert "cdu_flow_ratio" in model.metadata["features_not_measured"]
    assert "margin_ss_c" in model.features
    model.save(tmp_path)
    loaded = ThermalModel.load(tmp_path)
    assert loaded.features == model.features
    assert loaded.predict_proba(runs[0].features).max() > 0.5  # the restriction is still seen
