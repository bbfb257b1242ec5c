"""Evaluation of the thermal-risk model against ground truth: does the alarm lead the breach?

Per scored run (`EvalRun`: feature rows, ground-truth breaches with their fault kind and onset):

- **Alarm**: the risk at or above the flag level (probability >= `flag_probability`, default
  0.5 = "warning") for `confirm_s` (default 10 s: one 10 s score), held until it falls below
  `clear_probability` (0.3) — the hysteresis of the shipped `thermal_risk` alert rule. Gaps up to
  `merge_gap_s` do not end an alarm episode.
- **Lead** of a breach: breach time minus the start of the alarm episode still running just
  before the breach; never counted from before the fault's onset (an alarm that started earlier
  gets the time since onset). No alarm running at the breach: lead 0 (missed).
- **Recall at 2 min**: breaches with lead >= `min_lead_s` (120 s) / all breaches — the issue's
  goal, reported as is. Also over the *predictable* breaches, those at least `min_lead_s` after
  their fault's onset: a pump trip that breaches 40 s after it happens cannot be flagged 2 minutes
  ahead by anyone, since nothing observable changes before the trip. The share of predictable
  breaches is the ceiling of the all-breach recall (`recall_ceiling_at_2min`).
- **Per fault kind** (`KindStats`): breaches, predictable breaches, onset-to-breach time, the
  alarm's delay after onset, median lead, recall over all and over predictable breaches.
- **Median lead** overall, per fault kind, and for slow faults (fouling, facility water rise).
- **False alarms per rack-day** on fault-free runs: alarm episodes (merged within `fa_merge_s`)
  per rack and day of history.
- **Unconfirmed alarms** on fault runs: alarm episodes of a rack that did not breach between the
  episode's start and `confirm_window_s` (the risk horizon) after its end. Not counted as false
  alarms (the fault was real and the rack near its limit), but reported so that flagging every
  rack near a fault cannot buy recall unseen.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import polars as pl

from podwatch.analytics.thermal import FLAG_LEVEL_PROBABILITY, ThermalModel

SLOW_FAULTS = ("hx_fouling", "facility_water_rise")
GOALS = {
    "recall_at_2min": (">=", 0.95, "recall of breaches flagged >= 2 min ahead"),
    "slow_fault_median_lead_s": (">=", 300.0, "median lead for slow faults (fouling, facility water rise)"),
    "false_alarms_per_rack_day": ("<=", 0.1, "false alarms per rack-day on fault-free runs"),
}


@dataclass
class EvalRun:
    """One held-out history: its features and ground truth.

    `breaches`: rack, breach_ts[, breach_end_ts, fault_kind, onset_ts] — the fault kind and onset
    of the fault that caused each breach (see `truth_frames`). `fault_free` runs count false alarms."""

    name: str
    features: pl.DataFrame
    breaches: pl.DataFrame | None = None
    fault_free: bool = False
    tags: dict[str, Any] = field(default_factory=dict)


def truth_frames(truth: dict[str, Any]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(faults, breaches) frames from a simulator ground truth (`truth.json` as a dict).

    Each breach gets the kind and onset of its cause (the physical fault active on the rack or
    its CDU that started last before the breach); "unknown" when none is named. A worn pump's trip
    (`trip_ms`) is not an onset: a warning raised during the wear and held to the breach is a real
    warning, so the lead counts from the wear's onset (the benchmark reports breaches soon after a
    trip separately).
    `first_of_incident` marks the first breach of a rack per cause: later ones are the throttled
    rack re-crossing its limit. Training labels use every breach; the evaluation scores the first."""
    faults = pl.DataFrame(
        [(f["id"], f["kind"], f["target"], f["onset_ms"], f.get("end_ms")) for f in truth.get("faults", [])],
        schema={"fault_id": pl.String, "kind": pl.String, "target": pl.String, "onset_ms": pl.Int64,
                "end_ms": pl.Int64}, orient="row")
    by_id = {f["id"]: f for f in truth.get("faults", [])}
    rows, seen = [], set()
    for b in sorted(truth.get("breaches", []), key=lambda b: b["ts_ms"]):
        causes = [by_id[c] for c in b.get("causes", []) if c in by_id and by_id[c]["kind"] != "sensor_fault"]
        cause = max(causes, key=lambda f: f["onset_ms"]) if causes else None
        # A throttled rack re-breaches over and over while its fault lasts: that is one incident,
        # the first breach is the one a warning must lead.
        key = (b["rack"], cause["id"] if cause else None)
        first = cause is None or key not in seen
        seen.add(key)
        rows.append((b["rack"], b["ts_ms"], cause["kind"] if cause else "unknown",
                     cause["onset_ms"] if cause else None, first))
    breaches = pl.DataFrame(rows, schema={"rack": pl.String, "breach_ms": pl.Int64, "fault_kind": pl.String,
                                          "onset_ms": pl.Int64, "first_of_incident": pl.Boolean}, orient="row")
    breaches = breaches.select(
        "rack", pl.from_epoch("breach_ms", time_unit="ms").cast(pl.Datetime("us")).alias("breach_ts"),
        "fault_kind", pl.from_epoch("onset_ms", time_unit="ms").cast(pl.Datetime("us")).alias("onset_ts"),
        "first_of_incident")
    return faults, breaches


@dataclass
class BreachResult:
    run: str
    fault_kind: str
    rack: str
    breach_ts: datetime
    onset_to_breach_s: float | None
    alarm_ts: datetime | None
    lead_s: float


@dataclass
class KindStats:
    """Figures of one fault kind (times in seconds; None when there is nothing to measure)."""

    kind: str
    breaches: int
    predictable: int
    onset_to_breach_median_s: float | None
    onset_to_breach_min_s: float | None
    alarm_after_onset_median_s: float | None
    median_lead_s: float | None
    recall_at_2min: float | None
    recall_predictable_at_2min: float | None


@dataclass
class EvalReport:
    breaches: list[BreachResult]
    recall_at_2min: float | None
    recall_predictable_at_2min: float | None
    predictable_breaches: int
    median_lead_s: float | None
    median_lead_by_kind_s: dict[str, float]
    slow_fault_median_lead_s: float | None
    false_alarms: int
    rack_days: float
    false_alarms_per_rack_day: float | None
    settings: dict[str, Any]
    by_kind: list[KindStats] = field(default_factory=list)
    recall_ceiling_at_2min: float | None = None
    fault_run_alarms: int = 0
    unconfirmed_alarms: int = 0

    def goals(self) -> list[tuple[str, str, float | None, str, bool]]:
        """(name, description, value, goal text, met) for the three issue goals."""
        out = []
        for name, (op, target, text) in GOALS.items():
            value = getattr(self, name)
            met = value is not None and (value >= target if op == ">=" else value <= target)
            out.append((name, text, value, f"{op} {target:g}", met))
        return out

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["breaches"] = [{**asdict(b), "breach_ts": str(b.breach_ts), "alarm_ts": str(b.alarm_ts) if b.alarm_ts else None}
                         for b in self.breaches]
        d["goals"] = [{"name": n, "description": t, "value": v, "goal": g, "met": m} for n, t, v, g, m in self.goals()]
        return d

    def kind_table_lines(self) -> list[str]:
        """The per-fault-kind table as fixed-width text lines (header first)."""
        def num(v, pattern="{:.0f}"):
            return "-" if v is None else pattern.format(v)

        head = (f"  {'fault kind':<20} {'breaches':>8} {'>=2min':>6} {'onset->breach med/min s':>23} "
                f"{'alarm after onset s':>19} {'lead med s':>10} {'recall all':>10} {'recall >=2min':>13}")
        out = [head]
        for k in self.by_kind:
            o2b = f"{num(k.onset_to_breach_median_s)}/{num(k.onset_to_breach_min_s)}"
            out.append(f"  {k.kind:<20} {k.breaches:>8} {k.predictable:>6} {o2b:>23} "
                       f"{num(k.alarm_after_onset_median_s):>19} {num(k.median_lead_s):>10} "
                       f"{num(k.recall_at_2min, '{:.3f}'):>10} {num(k.recall_predictable_at_2min, '{:.3f}'):>13}")
        return out

    def summary_lines(self) -> list[str]:
        def fmt(v, unit=""):
            return "n/a" if v is None else (f"{v:.3f}{unit}" if isinstance(v, float) else f"{v}{unit}")

        lines = [
            f"breaches: {len(self.breaches)} ({self.predictable_breaches} at least 2 min after their fault's onset)",
            f"recall at >= 2 min lead: {fmt(self.recall_at_2min)} over all breaches (ceiling "
            f"{fmt(self.recall_ceiling_at_2min)}: the share breaching >= 2 min after onset); "
            f"{fmt(self.recall_predictable_at_2min)} over those predictable breaches",
            f"median lead: {fmt(self.median_lead_s, ' s')}",
            "per fault kind:",
            *self.kind_table_lines(),
        ]
        lines.append(f"false alarms on fault-free runs: {self.false_alarms} over {self.rack_days:.1f} rack-days"
                     f" = {fmt(self.false_alarms_per_rack_day)} per rack-day")
        lines.append(f"alarms on fault runs: {self.fault_run_alarms} episode(s), {self.unconfirmed_alarms} not followed "
                     f"by a breach of that rack (near misses, not counted as false alarms)")
        lines.append("goals:")
        for _, text, value, goal, met in self.goals():
            # a goal the runs cannot measure (no slow fault, no fault-free hours) is neither met nor missed
            state = "not measured" if value is None else "met" if met else "NOT MET"
            lines.append(f"  [{state}] {text}: {fmt(value)} (goal {goal})")
        return lines


def alarm_flags(scores: pl.DataFrame, *, flag_probability: float, confirm_s: float, step_s: float,
                clear_probability: float | None = None) -> pl.DataFrame:
    """Per (rack, ts): `alarm` raised when the probability has been >= the flag level for
    `confirm_s`, and held until it falls below `clear_probability` (hysteresis, as the default
    alert rule: fire at 0.5, clear below 0.3)."""
    confirm_steps = max(1, int(round(confirm_s / step_s)))
    clear = flag_probability if clear_probability is None else clear_probability
    s = scores.sort("rack", "ts").with_columns((pl.col("probability") >= flag_probability).alias("flag"))
    held = pl.col("flag").cast(pl.Int32).rolling_sum(confirm_steps, min_samples=confirm_steps).over("rack") >= confirm_steps
    s = s.with_columns(held.fill_null(False).alias("raise"))
    alarm = []
    for raise_list, prob_list in s.group_by("rack", maintain_order=True).agg("raise", "probability").select(
            "raise", "probability").iter_rows():
        on = False
        for r, p in zip(raise_list, prob_list):
            on = (on and p >= clear) or r
            alarm.append(on)
    return s.with_columns(pl.Series("alarm", alarm, dtype=pl.Boolean))


def _episodes(ts: list[datetime], alarm: list[bool], merge_gap_s: float) -> list[tuple[datetime, datetime]]:
    out: list[list[datetime]] = []
    for t, a in zip(ts, alarm):
        if not a:
            continue
        if out and (t - out[-1][1]).total_seconds() <= merge_gap_s:
            out[-1][1] = t
        else:
            out.append([t, t])
    return [(a, b) for a, b in out]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def kind_stats(results: list[BreachResult], min_lead_s: float) -> list[KindStats]:
    """Per-fault-kind figures of scored breaches (see `KindStats`)."""
    out = []
    for kind in sorted({r.fault_kind for r in results}):
        rs = [r for r in results if r.fault_kind == kind]
        pred = [r for r in rs if r.onset_to_breach_s is None or r.onset_to_breach_s >= min_lead_s]
        o2b = [r.onset_to_breach_s for r in rs if r.onset_to_breach_s is not None]
        after = [(r.alarm_ts - r.breach_ts).total_seconds() + r.onset_to_breach_s for r in rs
                 if r.alarm_ts is not None and r.onset_to_breach_s is not None]
        out.append(KindStats(
            kind=kind, breaches=len(rs), predictable=len(pred),
            onset_to_breach_median_s=_median(o2b), onset_to_breach_min_s=min(o2b) if o2b else None,
            alarm_after_onset_median_s=_median(after), median_lead_s=_median([r.lead_s for r in rs]),
            recall_at_2min=sum(r.lead_s >= min_lead_s for r in rs) / len(rs),
            recall_predictable_at_2min=(sum(r.lead_s >= min_lead_s for r in pred) / len(pred)) if pred else None))
    return out


def evaluate_runs(model: ThermalModel, runs: list[EvalRun], *, flag_probability: float = FLAG_LEVEL_PROBABILITY,
                  clear_probability: float = 0.3,
                  confirm_s: float = 10.0, merge_gap_s: float = 30.0, fa_merge_s: float = 600.0,
                  min_lead_s: float = 120.0, step_s: float = 10.0, confirm_window_s: float | None = None) -> EvalReport:
    results: list[BreachResult] = []
    false_alarms, rack_days = 0, 0.0
    fault_run_alarms, unconfirmed = 0, 0
    confirm_window = timedelta(seconds=confirm_window_s if confirm_window_s is not None
                               else getattr(model, "horizon_s", 300))
    for run in runs:
        if run.features.is_empty():
            continue
        scores = model.score(run.features, with_reasons=False)
        flags = alarm_flags(scores, flag_probability=flag_probability, confirm_s=confirm_s, step_s=step_s,
                            clear_probability=clear_probability)
        per_rack = {rack: (g["ts"].to_list(), g["alarm"].to_list())
                    for (rack,), g in flags.group_by("rack")}
        breaches = run.breaches if run.breaches is not None else pl.DataFrame(schema={"rack": pl.String,
                                                                                     "breach_ts": pl.Datetime("us")})
        for col, dtype in (("fault_kind", pl.String), ("onset_ts", pl.Datetime("us"))):
            if col not in breaches.columns:
                breaches = breaches.with_columns(pl.lit(None, dtype).alias(col))
        if run.fault_free:
            span_days = (flags["ts"].max() - flags["ts"].min()).total_seconds() / 86400.0
            rack_days += span_days * flags["rack"].n_unique()
            for ts, alarm in per_rack.values():
                false_alarms += len(_episodes(ts, alarm, fa_merge_s))
        else:
            # every breach (re-crossings included) confirms an alarm episode that led it
            breach_times: dict[str, list[datetime]] = {}
            for rack, bts in breaches.select("rack", "breach_ts").iter_rows():
                breach_times.setdefault(rack, []).append(bts)
            for rack, (ts, alarm) in per_rack.items():
                for start, end in _episodes(ts, alarm, fa_merge_s):
                    fault_run_alarms += 1
                    if not any(start <= t <= end + confirm_window for t in breach_times.get(rack, [])):
                        unconfirmed += 1
        if "first_of_incident" in breaches.columns:
            breaches = breaches.filter(pl.col("first_of_incident"))
        for b in breaches.sort("breach_ts").iter_rows(named=True):
            ts, alarm = per_rack.get(b["rack"], ([], []))
            before = [(t, a) for t, a in zip(ts, alarm) if t < b["breach_ts"]]
            onset = b["onset_ts"]
            alarm_ts = None
            if before and before[-1][1]:
                episodes = _episodes([t for t, _ in before], [a for _, a in before], merge_gap_s)
                alarm_ts = episodes[-1][0]
                if onset is not None and alarm_ts < onset:
                    alarm_ts = onset
            lead = (b["breach_ts"] - alarm_ts).total_seconds() if alarm_ts else 0.0
            onset_to_breach = (b["breach_ts"] - onset).total_seconds() if onset is not None else None
            results.append(BreachResult(run.name, b["fault_kind"] or "unknown", b["rack"], b["breach_ts"],
                                        onset_to_breach, alarm_ts, lead))
    leads = [r.lead_s for r in results]
    predictable = [r for r in results if r.onset_to_breach_s is None or r.onset_to_breach_s >= min_lead_s]
    by_kind: dict[str, list[float]] = {}
    for r in results:
        by_kind.setdefault(r.fault_kind, []).append(r.lead_s)
    slow = [r.lead_s for r in results if r.fault_kind in SLOW_FAULTS]
    return EvalReport(
        breaches=results,
        recall_at_2min=(sum(1 for x in leads if x >= min_lead_s) / len(leads)) if leads else None,
        recall_predictable_at_2min=(sum(1 for r in predictable if r.lead_s >= min_lead_s) / len(predictable))
        if predictable else None,
        predictable_breaches=len(predictable),
        median_lead_s=statistics.median(leads) if leads else None,
        median_lead_by_kind_s={k: statistics.median(v) for k, v in by_kind.items()},
        slow_fault_median_lead_s=statistics.median(slow) if slow else None,
        false_alarms=false_alarms, rack_days=rack_days,
        false_alarms_per_rack_day=(false_alarms / rack_days) if rack_days > 0 else None,
        settings={"flag_probability": flag_probability, "clear_probability": clear_probability, "confirm_s": confirm_s, "merge_gap_s": merge_gap_s,
                  "fa_merge_s": fa_merge_s, "min_lead_s": min_lead_s,
                  "confirm_window_s": confirm_window.total_seconds()},
        by_kind=kind_stats(results, min_lead_s),
        recall_ceiling_at_2min=(len(predictable) / len(results)) if results else None,
        fault_run_alarms=fault_run_alarms, unconfirmed_alarms=unconfirmed,
    )


class ReturnThresholdBaseline:
    """The reference detector: the plain return-temperature alarm (fires `margin_k` below the
    limit, like the shipped `rack_return_temp_high` rule at 50 °C for a 55 °C limit). Scored by
    the same `evaluate_runs`, so the model's figures are read against it."""

    version = "baseline-return-threshold"

    def __init__(self, margin_k: float = 5.0, horizon_s: int = 300):
        self.margin_k = margin_k
        self.horizon_s = horizon_s

    def score(self, features: pl.DataFrame, *, with_reasons: bool = False) -> pl.DataFrame:
        f = features.filter(pl.col("return_c").is_not_null())
        return f.select("rack", "ts", pl.lit(self.horizon_s).alias("horizon_s"),
                        (pl.col("margin_c") <= self.margin_k).cast(pl.Float64).alias("probability"))
