"""Evaluation arithmetic on hand-made scores: alarms with hysteresis, lead, recall, false alarms."""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl
import pytest

from podwatch.analytics.evaluate import EvalRun, ReturnThresholdBaseline, alarm_flags, evaluate_runs, truth_frames

T0 = datetime(2026, 11, 22, 0, 0, 0)


class FixedScores:
    """A stand-in model whose probabilities are a column of the features."""

    horizon_s = 300
    version = "fixed"

    def score(self, features, *, with_reasons=False):
        return features.select("rack", "ts", pl.lit(300).alias("horizon_s"), "probability")


def frame(rack: str, probs: list[float], step_s: int = 10) -> pl.DataFrame:
    return pl.DataFrame({"rack": [rack] * len(probs),
                         "ts": [T0 + timedelta(seconds=step_s * i) for i in range(len(probs))],
                         "probability": probs, "return_c": [40.0] * len(probs)},
                        schema={"rack": pl.String, "ts": pl.Datetime("us"), "probability": pl.Float64,
                                "return_c": pl.Float64})


def test_alarm_hysteresis_holds_until_below_clear_level():
    f = alarm_flags(frame("r1", [0.1, 0.6, 0.4, 0.35, 0.2, 0.6]), flag_probability=0.5, confirm_s=10, step_s=10,
                    clear_probability=0.3)
    assert f["alarm"].to_list() == [False, True, True, True, False, True]
    confirmed = alarm_flags(frame("r1", [0.6, 0.1, 0.6, 0.6]), flag_probability=0.5, confirm_s=20, step_s=10)
    assert confirmed["alarm"].to_list() == [False, False, False, True]


def test_lead_recall_and_onset_cap():
    # alarm from t = 60 s; breach at t = 300 s -> lead 240 s; fault onset at 100 s caps it to 200 s
    probs = [0.0] * 6 + [0.9] * 25
    feats = pl.concat([frame("r1", probs), frame("r2", [0.0] * 31)])
    breaches = pl.DataFrame({"rack": ["r1", "r2"], "breach_ts": [T0 + timedelta(seconds=300)] * 2,
                             "fault_kind": ["hx_fouling", "pump_failure"],
                             "onset_ts": [T0 + timedelta(seconds=100), T0 + timedelta(seconds=250)]})
    report = evaluate_runs(FixedScores(), [EvalRun("run", feats, breaches)])
    leads = {b.rack: b.lead_s for b in report.breaches}
    assert leads == {"r1": 200.0, "r2": 0.0}
    assert report.recall_at_2min == 0.5
    # r2 breached 50 s after its onset: not predictable 2 min ahead
    assert report.predictable_breaches == 1 and report.recall_predictable_at_2min == 1.0
    assert report.slow_fault_median_lead_s == 200.0
    assert report.false_alarms_per_rack_day is None
    # no fault-free hours: that goal is reported as not measured, not as missed
    lines = report.summary_lines()
    assert any(line.startswith("  [not measured] false alarms per rack-day") for line in lines)
    assert any(line.startswith("  [NOT MET] median lead for slow faults") for line in lines)


def test_false_alarms_per_rack_day_on_fault_free_runs():
    day = 8640  # 10 s steps
    probs = [0.0] * day
    for start in (100, 105, 5000):  # two episodes within 10 min merge; a third one later
        probs[start] = 0.9
    feats = pl.concat([frame("r1", probs), frame("r2", [0.0] * day)])
    report = evaluate_runs(FixedScores(), [EvalRun("quiet", feats, None, fault_free=True)])
    assert report.false_alarms == 2
    assert report.rack_days == pytest.approx(2.0, rel=1e-3)
    assert report.false_alarms_per_rack_day == pytest.approx(1.0, rel=1e-3)
    goals = {name: met for name, _, _, _, met in report.goals()}
    assert goals["false_alarms_per_rack_day"] is False


def test_truth_frames_take_the_latest_cause_and_mark_first_breaches():
    truth = {"faults": [
        {"id": "f1", "kind": "hx_fouling", "target": "cdu-1", "onset_ms": 1_000, "end_ms": None},
        {"id": "f2", "kind": "load_surge", "target": "r1", "onset_ms": 5_000, "end_ms": None},
        {"id": "s1", "kind": "sensor_fault", "target": "bms", "onset_ms": 6_000, "end_ms": None}],
        "breaches": [
            {"rack": "r1", "ts_ms": 10_000, "causes": ["f1", "f2", "s1"]},
            {"rack": "r1", "ts_ms": 20_000, "causes": ["f1", "f2"]},
            {"rack": "r2", "ts_ms": 15_000, "causes": []}]}
    faults, breaches = truth_frames(truth)
    assert faults.height == 3
    rows = breaches.sort("breach_ts").to_dicts()
    assert [(r["rack"], r["fault_kind"], r["first_of_incident"]) for r in rows] == [
        ("r1", "load_surge", True), ("r2", "unknown", True), ("r1", "load_surge", False)]
    assert rows[0]["onset_ts"] == datetime(1970, 1, 1, 0, 0, 5)


def test_a_worn_pump_trip_is_not_the_onset_of_its_breaches():
    # a warning raised during the wear and held through the trip is a real warning: every breach
    # is scored from its fault's onset, tripped or not
    truth = {"faults": [
        {"id": "w1", "kind": "pump_degradation", "target": "cdu-1", "onset_ms": 1_000, "end_ms": None,
         "trip_ms": 50_000},
        {"id": "w2", "kind": "pump_degradation", "target": "cdu-2", "onset_ms": 2_000, "end_ms": None,
         "trip_ms": None},
        {"id": "w3", "kind": "pump_degradation", "target": "cdu-3", "onset_ms": 3_000, "end_ms": None,
         "trip_ms": 900_000}],
        "breaches": [{"rack": "r1", "ts_ms": 80_000, "causes": ["w1"]},
                     {"rack": "r2", "ts_ms": 80_000, "causes": ["w2"]},
                     {"rack": "r3", "ts_ms": 80_000, "causes": ["w3"]}]}
    _, breaches = truth_frames(truth)
    onsets = {r["rack"]: r["onset_ts"] for r in breaches.to_dicts()}
    assert onsets == {"r1": datetime(1970, 1, 1, 0, 0, 1), "r2": datetime(1970, 1, 1, 0, 0, 2),
                      "r3": datetime(1970, 1, 1, 0, 0, 3)}


def test_reference_detector_fires_near_the_limit():
    feats = pl.DataFrame({"rack": ["r"] * 2, "ts": [T0, T0 + timedelta(seconds=10)], "return_c": [40.0, 51.0],
                          "margin_c": [15.0, 4.0]})
    assert ReturnThresholdBaseline().score(feats)["probability"].to_list() == [0.0, 1.0]


def test_per_kind_table_ceiling_and_unconfirmed_alarms():
    # r1: slow fault, alarm from 60 s, breach at 300 s (onset 0) -> hit, predictable
    # r2: pump trip at 250 s, breach at 300 s, alarm from 260 s -> miss, not predictable
    # r3: alarm episode with no breach of r3 -> unconfirmed (a near miss, not a false alarm)
    feats = pl.concat([frame("r1", [0.0] * 6 + [0.9] * 25), frame("r2", [0.0] * 26 + [0.9] * 5),
                       frame("r3", [0.0] * 10 + [0.9] * 3 + [0.0] * 18)])
    breaches = pl.DataFrame({"rack": ["r1", "r2"], "breach_ts": [T0 + timedelta(seconds=300)] * 2,
                             "fault_kind": ["hx_fouling", "pump_failure"],
                             "onset_ts": [T0, T0 + timedelta(seconds=250)]})
    report = evaluate_runs(FixedScores(), [EvalRun("run", feats, breaches)])
    assert report.recall_at_2min == 0.5
    assert report.recall_ceiling_at_2min == 0.5  # only r1 breached >= 2 min after its onset
    assert report.recall_predictable_at_2min == 1.0
    kinds = {k.kind: k for k in report.by_kind}
    assert kinds["hx_fouling"].breaches == 1 and kinds["hx_fouling"].recall_at_2min == 1.0
    assert kinds["hx_fouling"].alarm_after_onset_median_s == 60.0
    pump = kinds["pump_failure"]
    assert (pump.breaches, pump.predictable, pump.onset_to_breach_min_s) == (1, 0, 50.0)
    assert pump.recall_at_2min == 0.0 and pump.recall_predictable_at_2min is None
    assert pump.alarm_after_onset_median_s == 10.0 and pump.median_lead_s == 40.0
    assert (report.fault_run_alarms, report.unconfirmed_alarms) == (3, 1)
    text = "\n".join(report.summary_lines())
    assert "ceiling 0.500" in text and "pump_failure" in text and "1 not followed by a breach" in text
