"""Train on small simulator histories, then score unseen scenarios: a pump failure without
standby and a slow heat-exchanger fouling must raise the risk before the ground-truth breach,
with readable reasons. Real simulator, real Parquet, real model files."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from podwatch.analytics.commands import (
    TRAIN_RANGES, RunSpec, evaluate_sim_runs, scenario_specs, simulate_run, train_from_runs,
)
from podwatch.analytics.thermal import ThermalModel

SITE = str(Path(__file__).parents[3] / "examples/sites/demo.yaml")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("thermal")
    specs = scenario_specs([SITE], 1, 1.5, seed=11, ranges=TRAIN_RANGES, prefix="t")
    runs = [simulate_run(s, work) for s in specs]
    model = train_from_runs(runs, horizon_s=300, max_iter=60)
    model.save(work / "model")
    return ThermalModel.load(work / "model"), work


def _first_breach(run):
    first = run.breaches.filter(pl.col("first_of_incident")).sort("breach_ts")
    assert first.height > 0, f"{run.spec.name} produced no breach: the scenario must be severe"
    return first.row(0, named=True)


def test_pump_failure_without_standby_raises_risk_before_the_breach(trained):
    model, work = trained
    spec = RunSpec("pump-no-standby", SITE, 0.75, seed=321, faults=[
        {"kind": "pump_failure", "target": "cdu-m1", "onset_s": 1500, "pumps": [1, 2], "standby_takeover": False}])
    run = simulate_run(spec, work)
    breach = _first_breach(run)
    scores = model.score(run.features.filter(pl.col("rack") == breach["rack"])).sort("ts")
    onset = breach["onset_ts"]
    before_fault = scores.filter(pl.col("ts") < onset)
    assert before_fault["probability"].max() < 0.5
    just_before = scores.filter((pl.col("ts") > onset) & (pl.col("ts") < breach["breach_ts"]))
    assert just_before.height >= 1
    assert just_before["probability"].max() >= 0.5, "risk did not rise before the breach"
    assert just_before["probability"].max() > before_fault["probability"].max()
    reasons = " ".join(just_before.sort("probability")["reasons"].to_list()[-1])
    assert "pump" in reasons or "flow" in reasons or "settles" in reasons, reasons


def test_slow_fouling_is_flagged_minutes_ahead(trained):
    model, work = trained
    spec = RunSpec("fouling", SITE, 2.5, seed=654, faults=[
        {"kind": "hx_fouling", "target": "cdu-m2", "onset_s": 900, "magnitude": 13.0, "ramp_s": 3600}])
    run = simulate_run(spec, work)
    report = evaluate_sim_runs(model, [run])
    assert report.breaches, "fouling produced no breach"
    assert report.recall_at_2min == 1.0
    assert report.slow_fault_median_lead_s >= 300
    breach = _first_breach(run)
    scores = model.score(run.features.filter(pl.col("rack") == breach["rack"]))
    window = scores.filter((pl.col("ts") < breach["breach_ts"])
                           & (pl.col("ts") >= breach["breach_ts"] - timedelta(minutes=3)))
    assert window["probability"].min() >= 0.3
    reasons = " ".join(window["reasons"].to_list()[-1])
    assert "CDU supply" in reasons or "settles" in reasons or "approach" in reasons, reasons


def test_fault_free_history_stays_quiet(trained):
    model, work = trained
    run = simulate_run(RunSpec("quiet", SITE, 2.0, seed=987, fault_free=True), work)
    report = evaluate_sim_runs(model, [run])
    assert report.false_alarms == 0
    assert report.rack_days == pytest.approx(16 * 2.0 / 24, rel=0.02)
