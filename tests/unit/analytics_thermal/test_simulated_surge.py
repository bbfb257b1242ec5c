"""The physics-only risk on simulator histories (no servers, no trained model): a ramped load surge
over a saturated CDU is flagged minutes ahead of its breach, ordinary workload swings at peak load
are not, and a kind of fault the risk was never tuned on (worn pumps) is flagged from its physics."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import polars as pl

from podwatch.analytics.evaluate import EvalRun, evaluate_runs, truth_frames
from podwatch.analytics.features import build_features
from podwatch.analytics.thermal import PhysicsRiskModel
from podwatch.simulators.history import generate_history
from podwatch.simulators.scenario import Scenario
from podwatch.site import load_site

ROOT = Path(__file__).resolve().parents[3]
SITE = load_site(ROOT / "examples/sites/demo.yaml")
AFTERNOON_MS = 1_763_000_000_000 + 20 * 3600_000  # 14:00 at the demo site: the workload near its daily peak
NIGHT_MS = 1_763_000_000_000 + 10 * 3600_000  # 04:00 there: the workload near its daily low


def _run(faults: list[dict], seconds: float, seed: int, tmp_path, start_ms: int = AFTERNOON_MS
         ) -> tuple[pl.DataFrame, pl.DataFrame]:
    scenario = Scenario.parse({"name": "t", "faults": faults}, "t", SITE)
    result = generate_history(SITE, days=seconds / 86400, resolution_s=10, scenarios=[scenario], seed=seed,
                              out_dir=tmp_path, start_ms=start_ms)
    _, breaches = truth_frames(result.truth.to_dict())
    return build_features(pl.read_parquet(result.samples_path), SITE), breaches


def test_a_ramped_surge_on_a_saturated_cdu_is_flagged_two_minutes_ahead(tmp_path):
    # cdu-m1's exchanger is fouled (7.5x approach: the supply runs above setpoint) in the small
    # hours, when the load is low and the loop holds; at 1500 s a surge is rolled out over its
    # racks, to 2x demand over 150 s, and they breach 2.5-5 minutes later
    onset_s = 1500.0
    feats, breaches = _run([
        {"kind": "hx_fouling", "target": "cdu-m1", "magnitude": 7.5, "onset_s": 0},
        {"kind": "load_surge", "target": "cdu-m1", "magnitude": 2.0, "ramp_s": 150, "onset_s": onset_s}],
        2400, 6, tmp_path, start_ms=NIGHT_MS)
    surge = breaches.filter(pl.col("fault_kind") == "load_surge")
    assert surge.height >= 6
    # the lead is earned after the onset: no rack of the CDU was in alarm in the 5 minutes before it
    onset = feats["ts"].min() - timedelta(seconds=10) + timedelta(seconds=onset_s)
    before = PhysicsRiskModel().score(feats.filter(pl.col("rack").str.starts_with("m1-")
                                                   & (pl.col("ts") < onset) & (pl.col("ts") >= onset - timedelta(minutes=5))),
                                      with_reasons=False)
    assert before.height >= 8 * 25 and before["probability"].max() < 0.5
    report = evaluate_runs(PhysicsRiskModel(), [EvalRun("surge", feats, surge)])
    first = min(report.breaches, key=lambda b: b.breach_ts)
    assert first.onset_to_breach_s > 120 and first.lead_s >= 120, first
    assert all(b.lead_s >= 120 for b in report.breaches), [(b.rack, b.onset_to_breach_s, b.lead_s) for b in report.breaches]


def test_ordinary_swings_at_peak_load_raise_no_alarm(tmp_path):
    # three fault-free hours around the daily peak: the workload's own swings, ramps included, take
    # no rack near its limit on a healthy loop, whatever the ramp projection does
    feats, breaches = _run([], 3 * 3600, 21, tmp_path)
    assert breaches.is_empty()
    assert feats["power_trend_2m"].max() > 0  # the workload does ramp at times
    scores = PhysicsRiskModel().score(feats, with_reasons=False)
    assert scores["probability"].max() < 0.2


def test_worn_pumps_are_flagged_from_the_falling_flow_before_the_racks_breach(tmp_path):
    # both duty pumps of cdu-m1 wear out over 40 min (examples/scenarios/pump-degradation.yaml):
    # the risk has never seen this kind, but the flow per kW falls and the settled ΔT rises
    scenario = Scenario.load(ROOT / "examples/scenarios/pump-degradation.yaml", SITE)
    feats, breaches = _run([f.model_dump(exclude_none=True) for f in scenario.faults], 3300, 5, tmp_path)
    first = breaches.filter(pl.col("first_of_incident"))
    assert first.height >= 4
    report = evaluate_runs(PhysicsRiskModel(), [EvalRun("wear", feats, first)])
    assert all(b.lead_s >= 300 for b in report.breaches), [(b.rack, b.lead_s) for b in report.breaches]
