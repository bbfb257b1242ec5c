"""The alert lifecycle engine: turns sample rows (threshold rules) and analytics observations
(check and risk rules) into alerts that go pending -> firing -> resolved.

Lifecycle of the alert of one rule on one target (`alert_id = sha1(rule, target)`):

    (none/resolved) --condition active--> pending --active for `for`--> firing
         ^                                  |                             |
         |                     clear before `for` (never notified)       clear for `clear_for`
         +----------------------------------+--------- resolved <--------+ (`flap.stable_clear` when flapping)

- Hold time: pending becomes firing only once the condition held for `for` (sample time).
- Hysteresis: with `clear_threshold` the condition clears only once the value is past it;
  values in between keep the previous condition.
- Clear hold: a firing alert resolves only after the condition stayed clear for `clear_for`.
- Flap damping: condition changes (active<->clear) are counted per target over `flap.window`;
  from `flap.max_transitions` on the target is flapping and its alert resolves only after
  `flap.stable_clear` of continuous clear — so a flapping target yields one alert that stays
  firing, not one per flap. The count spans resolutions, so a slow flapper whose clear gaps
  outlast `clear_for` yields at most max_transitions/2 + 1 alerts, the last of which stays firing.
- Time is the samples'/observations' timestamps, never the wall clock: replaying history gives
  the same alerts. Within a batch only the rows where the condition changes, the first row past
  each hold deadline of a run and the last row of a run reach the state machine (vectorised in
  polars); a hold that started in an earlier batch is checked at those rows.

Cause attribution (rules' `cascade`): an alert of a `cause` rule on a CDU (pump redundancy lost,
supply too warm, ...) explains the `symptom` alerts of the racks that CDU cools. Both carry the
label `cascade=cause|symptom` (static per rule and target, so Alertmanager inhibit rules can match
it with `equal: [site, cdu]`). While a cause alert is pending or firing:
- a symptom alert on one of its racks gets the label `probable_cause="<cdu>:<rule>"` when it
  starts and again when it fires; from firing on its labels never change (Alertmanager identifies
  an alert by its label set: a label added later would make a second alert there);
- the symptom's annotations `probable_cause` (a sentence with the cause's summary and reasons)
  and `probable_cause_ref` follow the cause as it comes and goes (annotations may change);
- the cause alert's annotation `affected_racks` lists the racks with symptom alerts, `racks` the
  racks it cools (from the site model).
Annotation changes of a firing alert without a transition reach receivers that take updates
(Alertmanager) as an `update` of the same alert; webhooks, e-mail and Kafka get transitions only.

Every transition is one event (see `model`) written, in one DuckDB transaction together with the
alert's row in `alerts`, to the outbox queue of each receiver that wants it; `on_events` (the
dispatcher's `kick`) is then called. State is reloaded from `alerts` on start (pending/firing
rows; flap history and clear holds restart empty, which only delays a resolution).
"""

from __future__ import annotations

import contextlib
import json
import logging
import operator
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl

from podwatch.analytics.alerting import store
from podwatch.analytics.alerting.model import EVENT_VERSION, AlertState, Observation, alert_id, as_utc, iso
from podwatch.analytics.alerting.outbox import enqueue
from podwatch.analytics.alerting.rules import CASCADE_LABEL, CAUSE_LABEL, Rule, RuleSet, render_template
from podwatch.analytics.alerting.settings import SEVERITY_RANK
from podwatch.health import REGISTRY

if TYPE_CHECKING:
    from podwatch.analytics.alerting.receivers import Receiver
    from podwatch.site import Site

log = logging.getLogger(__name__)
COMMIT_ATTEMPTS = 3
# Annotations the engine keeps current from cause attribution (they may change while firing).
ATTRIBUTION_ANNOTATIONS = ("probable_cause", "probable_cause_ref", "affected_racks", "racks")

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne}


@dataclass
class AlertRecord:
    """In-memory state of one (rule, target) alert."""

    rule: Rule
    target: str
    alert_id: str
    state: AlertState | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    value: float | None = None
    reasons: list[str] = field(default_factory=list)
    started_at: datetime | None = None
    fired_at: datetime | None = None
    resolved_at: datetime | None = None
    updated_at: datetime | None = None
    condition: bool | None = None
    clear_since: datetime | None = None
    transitions: deque = field(default_factory=deque)
    flapping: bool = False

    def row(self) -> tuple:
        return (self.alert_id, self.rule.id, self.target, self.rule.severity, str(self.state), json.dumps(self.labels),
                json.dumps(self.annotations), self.value, self.started_at, self.fired_at, self.resolved_at, self.updated_at)


def site_target_labels(site: "Site") -> Callable[[str], dict[str, str]]:
    """Labels of a target id from the site model: a device, rack or CDU id -> site, module,
    rack/cdu, device. Unknown targets get only the site label."""
    table: dict[str, dict[str, str]] = {}
    site_id = site.id
    for module in site.modules:
        for cdu in module.cdus:
            table[cdu.id] = {"site": site_id, "module": module.id, "cdu": cdu.id}
    for rack in site.racks:
        table[rack.id] = {"site": site_id, "module": rack.module, "rack": rack.id, "cdu": rack.cdu}
    for device in site.devices:
        labels = {"site": site_id, "device": device.id}
        labels.update({k: v for k, v in table.get(device.entity, {}).items() if k != "site"})
        if device.module:
            labels["module"] = device.module
        table[device.id] = labels

    def lookup(target: str) -> dict[str, str]:
        return dict(table.get(target, {"site": site_id}))

    return lookup


def site_cdu_racks(site: "Site") -> dict[str, list[str]]:
    """CDU id -> the ids of the racks it cools (for the cause alert's `racks` annotation)."""
    return {cdu.id: list(cdu.racks) for module in site.modules for cdu in module.cdus}


def cause_ref(rec: "AlertRecord") -> str:
    """`<cdu>:<rule>`, the value of a symptom's `probable_cause` label."""
    return f"{rec.target}:{rec.rule.id}"


def _hms(ts: datetime | None) -> str:
    return "?" if ts is None else as_utc(ts).strftime("%H:%M:%S UTC")


def site_device_entities(site: "Site") -> dict[str, str]:
    """Device id -> the rack / CDU / power node id it measures (for rules with `target: entity`)."""
    return {d.id: d.entity for d in site.devices if d.entity}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


class AlertEngine:
    """See the module docstring. Single-threaded: call it from one asyncio task/thread."""

    def __init__(self, con: duckdb.DuckDBPyConnection, rules: RuleSet, *, receivers: Sequence["Receiver"] = (),
                 target_labels: Callable[[str], dict[str, str]] | None = None,
                 device_entities: dict[str, str] | None = None,
                 cdu_racks: dict[str, list[str]] | None = None,
                 target_thresholds: dict[str, dict[str, float]] | None = None,
                 on_events: Callable[[list[dict]], None] | None = None) -> None:
        self._con = con
        store.ensure_alerting_tables(con)
        self.rules = rules
        self.receivers = list(receivers)
        self.target_labels = target_labels or (lambda target: {})
        self.device_entities = dict(device_entities or {})
        self.cdu_racks = {cdu: list(racks) for cdu, racks in (cdu_racks or {}).items()}
        # rule `threshold_from` name -> target -> threshold (e.g. each rack's return limit, site model)
        self.target_thresholds = {name: dict(m) for name, m in (target_thresholds or {}).items()}
        self.on_events = on_events
        self.health = REGISTRY.component("alert_engine")
        enabled = rules.enabled_rules()
        self._metric_rules = [r for r in enabled if r.source == "metric"]
        self._by_check: dict[str, list[Rule]] = {}
        for r in enabled:
            if r.check_name:
                self._by_check.setdefault(r.check_name, []).append(r)
        self._alerts: dict[tuple[str, str], AlertRecord] = {}
        self._cascade: dict[str, AlertRecord] = {}  # alert_id -> pending/firing alert with a cascade label
        self._last_seen: dict[tuple[str, str], datetime] = {}  # (rule id, target) -> newest good sample
        self._unmatched: set[str] = set()
        self.clock: datetime | None = None  # newest sample/observation time seen
        self._load()

    # ------------------------------------------------------------------ state

    def _load(self) -> None:
        rules = {r.id: r for r in self.rules.enabled_rules()}
        orphans: list[AlertRecord] = []
        for row in store.list_alerts(self._con, limit=1_000_000):
            if row["state"] == "resolved":
                continue
            rule = rules.get(row["rule"])
            rec = AlertRecord(rule=rule or _placeholder_rule(row), target=row["target"], alert_id=row["alert_id"],
                              state=AlertState(row["state"]), labels=row["labels"], annotations=row["annotations"],
                              value=row["value"], started_at=row["started_at"], fired_at=row["fired_at"],
                              updated_at=row["updated_at"], condition=True,
                              reasons=[r for r in row["annotations"].get("reasons", "").split("; ") if r])
            if rule is None:
                orphans.append(rec)
            else:
                self._alerts[(rule.id, rec.target)] = rec
                self._track(rec)
        log.info("alert engine loaded %d active alert(s) from the alerts table", len(self._alerts))
        if orphans:
            now = datetime.now(UTC)
            events = []
            for rec in orphans:
                log.warning("alert %s (%s on %s) belongs to a rule that is gone or disabled; resolving it",
                            rec.alert_id, rec.rule.id, rec.target)
                events.append(self._resolve(rec, now, ["rule removed or disabled"]))
            self._commit(events, orphans)

    def active(self) -> list[AlertRecord]:
        return [a for a in self._alerts.values() if a.state in (AlertState.PENDING, AlertState.FIRING)]

    def get(self, rule: str, target: str) -> AlertRecord | None:
        return self._alerts.get((rule, target))

    # ------------------------------------------------------------------ inputs

    def observe(self, observations: Iterable[Observation]) -> list[dict]:
        """Feed analytics observations; returns the transition events (already queued)."""
        events: list[dict] = []
        dirty: dict[str, AlertRecord] = {}
        # Time order, and at one time a CDU's cause observations before the racks' (the checks emit
        # racks first), so a rack alert starting at the same moment already sees its probable cause.
        observations = sorted(observations, key=lambda o: (o.ts, not self._feeds_cause(o.rule)))
        for obs in observations:
            self.health.inc("received")
            rules = self._by_check.get(obs.rule)
            if not rules:
                self.health.inc("dropped")
                if obs.rule not in self._unmatched:
                    self._unmatched.add(obs.rule)
                    log.warning("observations of check %r match no enabled alert rule (source: check:%s); "
                                "they are counted as dropped", obs.rule, obs.rule)
                continue
            self._advance_clock(obs.ts)
            for rule in rules:
                rec = self._record(rule, obs.target)
                active = obs.active
                if rule.threshold is not None and obs.value is not None:
                    active = self._hysteresis(rule, obs.value, rec.condition)
                    if active is None:
                        continue
                self._step(rec, active, obs.ts, obs.value, obs.labels, obs.reasons, events, dirty)
        self._commit(events, dirty)
        return events

    def _feeds_cause(self, check: str) -> bool:
        return any(r.cascade == "cause" for r in self._by_check.get(check, ()))

    def evaluate_samples(self, rows: pl.DataFrame) -> list[dict]:
        """Evaluate the metric rules on a batch of new sample rows (columns ts, device, metric,
        value, quality; quality 0/'good' = good); returns the transition events (already queued)."""
        if not self._metric_rules or rows.height == 0:
            return []
        missing = {"ts", "device", "metric", "value"} - set(rows.columns)
        if missing:
            raise ValueError(f"sample rows lack column(s) {sorted(missing)}; expected ts, device, metric, value, quality")
        frame = self._normalise(rows)
        watermark = frame.get_column("ts").max()
        events: list[dict] = []
        dirty: dict[str, AlertRecord] = {}
        wanted = sorted({m for r in self._metric_rules for m in r.metric or ()})
        good = frame.filter(pl.col("metric").is_in(wanted) & pl.col("good") & pl.col("value").is_not_null()
                            & pl.col("value").is_finite())
        self.health.inc("received", rows.height)
        for rule in self._metric_rules:
            part = good.filter(pl.col("metric").is_in(rule.metric or []))
            if rule.target == "entity" and self.device_entities:
                part = part.with_columns(pl.col("device").replace(self.device_entities).alias("target"))
            else:
                part = part.with_columns(pl.col("device").alias("target"))
            if part.height:
                for target, last_ts in part.group_by("target").agg(pl.col("ts").max()).iter_rows():
                    key = (rule.id, target)
                    if key not in self._last_seen or last_ts > self._last_seen[key]:
                        self._last_seen[key] = last_ts
                if rule.threshold is not None:
                    self._threshold_runs(rule, part, events, dirty)
                else:  # a staleness-only rule: fresh data clears it
                    for target, device, last_ts, value in part.sort("ts").group_by("target").agg(
                            pl.col("device").last(), pl.col("ts").last(), pl.col("value").last()).iter_rows():
                        self._step(self._record(rule, target), False, last_ts, value, {"device": device}, [], events, dirty)
            if rule.stale_after_s is not None and watermark is not None:
                self._stale(rule, as_utc(watermark), events, dirty)
        if watermark is not None:
            self._advance_clock(as_utc(watermark))
        self._commit(events, dirty)
        return events

    def check_stale(self, now: datetime) -> list[dict]:
        """Evaluate `stale_after` of metric rules at `now` (for when no batch arrives at all)."""
        events: list[dict] = []
        dirty: dict[str, AlertRecord] = {}
        for rule in self._metric_rules:
            if rule.stale_after_s is not None:
                self._stale(rule, as_utc(now), events, dirty)
        self._commit(events, dirty)
        return events

    # ------------------------------------------------------------------ evaluation

    @staticmethod
    def _normalise(rows: pl.DataFrame) -> pl.DataFrame:
        ts = pl.col("ts")
        dtype = rows.schema["ts"]
        if isinstance(dtype, pl.Datetime):
            ts = ts.dt.replace_time_zone("UTC") if dtype.time_zone is None else ts.dt.convert_time_zone("UTC")
        elif dtype.is_integer():  # epoch milliseconds, as in the Kafka envelope
            ts = pl.from_epoch(ts, time_unit="ms").dt.replace_time_zone("UTC")
        if "quality" not in rows.columns:
            good = pl.lit(True)
        elif rows.schema["quality"] == pl.String:
            good = pl.col("quality") == "good"
        else:
            good = pl.col("quality") == 0
        return rows.select(ts.alias("ts"), pl.col("device").cast(pl.String), pl.col("metric").cast(pl.String),
                           pl.col("value").cast(pl.Float64), good.fill_null(False).alias("good"))

    def _threshold_runs(self, rule: Rule, part: pl.DataFrame, events: list[dict], dirty: dict[str, AlertRecord]) -> None:
        """Vectorised: per target, the condition per row (1 active, 0 clear, null = inside the
        hysteresis band: keep the previous state), forward-filled; only the rows where it changes,
        the first row past each hold deadline of a run and the last row of each run go to the
        state machine."""
        op = _OPS[rule.op]
        value = pl.col("value")
        per_target = self.target_thresholds.get(rule.threshold_from or "")
        if per_target:
            thr = pl.col("target").replace_strict(per_target, default=rule.threshold, return_dtype=pl.Float64)
        else:
            thr = pl.lit(rule.threshold, dtype=pl.Float64)
        part = part.with_columns(thr.alias("thr"))
        hi = op(value, pl.col("thr"))
        still = op(value, pl.col("thr") + (rule.effective_clear_threshold - rule.threshold))
        cond = pl.when(hi).then(pl.lit(True)).when(~still).then(pl.lit(False)).otherwise(pl.lit(None, dtype=pl.Boolean))
        runs = (part.sort("target", "ts")
                .with_columns(cond.alias("cond"))
                .with_columns(pl.col("cond").forward_fill().over("target"))
                .filter(pl.col("cond").is_not_null())
                .with_columns(changed=(pl.col("cond") != pl.col("cond").shift(1).over("target")).fill_null(True))
                .with_columns(run_end=pl.col("changed").shift(-1).over("target").fill_null(True),
                              run_id=pl.col("changed").cum_sum().over("target"))
                .with_columns(elapsed_s=(pl.col("ts") - pl.col("ts").first().over("target", "run_id")).dt.total_microseconds() / 1e6)
                .with_columns(prev_elapsed_s=pl.col("elapsed_s").shift(1).over("target", "run_id").fill_null(-1.0)))
        # The first row at/after each deadline of a run (hold when active; clear hold and flap
        # stable-clear when clear), so transitions carry the time the deadline passed.
        crossing = pl.lit(False)
        for deadline_s, when_active in ((rule.hold_s, True), (rule.clear_for_s, False), (rule.flap.stable_clear_s, False)):
            crossing = crossing | ((pl.col("cond") == when_active) & (pl.col("elapsed_s") >= deadline_s)
                                   & (pl.col("prev_elapsed_s") < deadline_s))
        runs = runs.filter(pl.col("changed") | pl.col("run_end") | crossing)
        for target, device, ts, metric, val, active, thr in runs.select("target", "device", "ts", "metric", "value", "cond",
                                                                        "thr").iter_rows():
            rec = self._record(rule, target)
            if active:
                reasons = [f"{metric} {_fmt(val)} {rule.op} {thr:g} on {device}"]
            else:
                reasons = [f"{metric} {_fmt(val)} back past {thr + rule.effective_clear_threshold - rule.threshold:g} on {device}"]
            self._step(rec, bool(active), ts, val, {"device": device}, reasons, events, dirty)

    def _stale(self, rule: Rule, now: datetime, events: list[dict], dirty: dict[str, AlertRecord]) -> None:
        limit = timedelta(seconds=rule.stale_after_s or 0)
        for (rule_id, target), last in list(self._last_seen.items()):
            if rule_id == rule.id and now - last > limit:
                age_s = (now - last).total_seconds()
                reasons = [f"no good sample of {', '.join(rule.metric or [])} from {target} for {age_s:.0f} s "
                           f"(stale after {rule.stale_after_s:g} s)"]
                self._step(self._record(rule, target), True, now, None, {}, reasons, events, dirty)

    @staticmethod
    def _hysteresis(rule: Rule, value: float, previous: bool | None) -> bool | None:
        op = _OPS[rule.op]
        if op(value, rule.threshold):
            return True
        if not op(value, rule.effective_clear_threshold):
            return False
        return previous

    def _advance_clock(self, ts: datetime) -> None:
        if self.clock is None or ts > self.clock:
            self.clock = ts

    def _record(self, rule: Rule, target: str) -> AlertRecord:
        key = (rule.id, target)
        rec = self._alerts.get(key)
        if rec is None:
            rec = self._alerts[key] = AlertRecord(rule=rule, target=target, alert_id=alert_id(rule.id, target))
        return rec

    # ------------------------------------------------------------------ the state machine

    def _step(self, rec: AlertRecord, active: bool, ts: datetime, value: float | None, labels: dict[str, str],
              reasons: list[str], events: list[dict], dirty: dict[str, AlertRecord]) -> None:
        self._transition(rec, active, ts, value, labels, reasons, events, dirty)
        if rec.alert_id in dirty:
            self._track(rec)

    def _transition(self, rec: AlertRecord, active: bool, ts: datetime, value: float | None, labels: dict[str, str],
                    reasons: list[str], events: list[dict], dirty: dict[str, AlertRecord]) -> None:
        ts = as_utc(ts)
        rule = rec.rule
        if rec.condition is not None and active != rec.condition:
            rec.transitions.append(ts)
        window_start = ts - timedelta(seconds=rule.flap.window_s)
        while rec.transitions and rec.transitions[0] < window_start:
            rec.transitions.popleft()
        rec.condition = active
        if value is not None or active:
            rec.value = value
        if active and reasons:
            rec.reasons = list(reasons)
        if rec.state in (None, AlertState.RESOLVED):
            if not active:
                return
            rec.state, rec.started_at, rec.fired_at, rec.resolved_at, rec.clear_since = AlertState.PENDING, ts, None, None, None
            rec.flapping = False
            rec.labels = self._labels(rule, rec.target, labels)
            self._set_cause_label(rec)
            rec.annotations = self._annotations(rec)
            rec.updated_at = ts
            events.append(self._event(rec, None, ts))
            dirty[rec.alert_id] = rec
        if len(rec.transitions) >= rule.flap.max_transitions and not rec.flapping:
            rec.flapping = True
            self.health.inc("flaps")
            log.info("alert %s on %s is flapping (%d changes in %.0f s); it resolves only after %.0f s of clear",
                     rule.id, rec.target, len(rec.transitions), rule.flap.window_s, rule.flap.stable_clear_s)
        if rec.state is AlertState.PENDING:
            if not active:
                events.append(self._resolve(rec, ts, reasons))
                dirty[rec.alert_id] = rec
            elif (ts - rec.started_at).total_seconds() >= rule.hold_s:
                rec.state, rec.fired_at, rec.updated_at = AlertState.FIRING, ts, ts
                self._set_cause_label(rec)  # the last change: from here on the labels are fixed
                rec.annotations = self._annotations(rec)
                events.append(self._event(rec, AlertState.PENDING, ts))
                dirty[rec.alert_id] = rec
                self.health.inc("fired")
            return
        if rec.state is AlertState.FIRING:
            if active:
                rec.clear_since = None
                return
            if rec.clear_since is None:
                rec.clear_since = ts
            hold_s = max(rule.clear_for_s, rule.flap.stable_clear_s) if rec.flapping else rule.clear_for_s
            if (ts - rec.clear_since).total_seconds() >= hold_s:
                events.append(self._resolve(rec, ts, reasons))
                dirty[rec.alert_id] = rec

    def _resolve(self, rec: AlertRecord, ts: datetime, reasons: list[str]) -> dict:
        previous = rec.state
        rec.state, rec.resolved_at, rec.updated_at = AlertState.RESOLVED, ts, ts
        if reasons and previous is AlertState.FIRING:
            rec.annotations = {**rec.annotations, "resolution": "; ".join(reasons)}
        event = self._event(rec, previous, ts)
        rec.clear_since = None
        rec.flapping = False
        return event

    def _labels(self, rule: Rule, target: str, labels: dict[str, str]) -> dict[str, str]:
        # Fixed for the alert's whole cycle once it fires: Alertmanager identifies an alert by its
        # label set. (Only `probable_cause` may still change between pending and firing.)
        merged = {**self.rules.labels, **self.target_labels(target), **labels, **rule.labels,
                  "alertname": rule.id, "severity": rule.severity, "target": target}
        out = {k: str(v) for k, v in merged.items() if v is not None and k not in (CASCADE_LABEL, CAUSE_LABEL)}
        # The cascade role follows from the rule and the target alone, so it never changes: a
        # cause only on the CDU itself, a symptom only on a rack that has a CDU.
        if rule.cascade == "cause" and out.get("cdu") == target:
            out[CASCADE_LABEL] = "cause"
        elif rule.cascade == "symptom" and out.get("rack") == target and out.get("cdu"):
            out[CASCADE_LABEL] = "symptom"
        return out

    # ------------------------------------------------------------------ cause attribution

    def _track(self, rec: AlertRecord) -> None:
        if rec.labels.get(CASCADE_LABEL) and rec.state in (AlertState.PENDING, AlertState.FIRING):
            self._cascade[rec.alert_id] = rec
        else:
            self._cascade.pop(rec.alert_id, None)

    @staticmethod
    def _loop(rec: AlertRecord) -> tuple[str, str]:
        return rec.labels.get("site", ""), rec.labels.get("cdu", "")

    def causes_of(self, rec: AlertRecord) -> list[AlertRecord]:
        """The pending/firing cause alerts on the CDU of a symptom alert, most probable first:
        firing before pending, then the more severe, then the one that started first."""
        if rec.labels.get(CASCADE_LABEL) != "symptom":
            return []
        loop = self._loop(rec)
        found = [c for c in self._cascade.values() if c.labels.get(CASCADE_LABEL) == "cause" and self._loop(c) == loop]
        return sorted(found, key=lambda c: (c.state is not AlertState.FIRING, -SEVERITY_RANK[c.rule.severity],
                                            c.started_at or datetime.max.replace(tzinfo=UTC), c.rule.id))

    def symptoms_of(self, rec: AlertRecord) -> list[AlertRecord]:
        """The pending/firing symptom alerts of the racks on the CDU of a cause alert."""
        if rec.labels.get(CASCADE_LABEL) != "cause":
            return []
        loop = self._loop(rec)
        return sorted((s for s in self._cascade.values() if s.labels.get(CASCADE_LABEL) == "symptom" and self._loop(s) == loop),
                      key=lambda s: (s.target, s.rule.id))

    def _set_cause_label(self, rec: AlertRecord) -> None:
        """`probable_cause` of a symptom alert from the causes active now (called when its cycle
        starts and when it fires; never afterwards, see the module docstring)."""
        if rec.labels.get(CASCADE_LABEL) != "symptom":
            return
        causes = self.causes_of(rec)
        if causes:
            rec.labels[CAUSE_LABEL] = cause_ref(causes[0])
        else:
            rec.labels.pop(CAUSE_LABEL, None)

    def _attribution(self, rec: AlertRecord) -> dict[str, str]:
        """The attribution annotations of `rec` as they are now."""
        role = rec.labels.get(CASCADE_LABEL)
        out: dict[str, str] = {}
        if role == "symptom":
            causes = self.causes_of(rec)
            if causes:
                main = causes[0]
                since = main.fired_at if main.state is AlertState.FIRING else main.started_at
                state = "firing" if main.state is AlertState.FIRING else "pending"
                summary = main.annotations.get("summary") or cause_ref(main)
                text = f"Probably caused by {summary} ({main.rule.id}, {state} since {_hms(since)})"
                if main.reasons:
                    text += ": " + "; ".join(main.reasons)
                others = [c.rule.id for c in causes[1:]]
                if others:
                    text += f". Also active on {main.target}: {', '.join(others)}"
                out["probable_cause"] = text
                out["probable_cause_ref"] = cause_ref(main)
            elif rec.labels.get(CAUSE_LABEL):
                # The cause this alert fired with has resolved; the rack still alerts on its own.
                ref = rec.labels[CAUSE_LABEL]
                cdu, _, rule_id = ref.rpartition(":")
                gone = self._alerts.get((rule_id, cdu))
                when = f" at {_hms(gone.resolved_at)}" if gone is not None and gone.resolved_at else ""
                out["probable_cause"] = (f"Fired while {ref} was active; that alert resolved{when} but this rack "
                                         "still alerts: check the rack itself")
                out["probable_cause_ref"] = ref
        elif role == "cause":
            cdu = rec.target
            cooled = self.cdu_racks.get(cdu, [])
            if cooled:
                out["racks"] = f"{cdu} cools {len(cooled)} rack(s): {', '.join(cooled)}"
            by_rack: dict[str, list[str]] = {}
            for symptom in self.symptoms_of(rec):
                by_rack.setdefault(symptom.target, []).append(symptom.rule.id)
            if by_rack:
                of = f" of {len(cooled)}" if cooled else ""
                listed = ", ".join(f"{rack} ({', '.join(rules)})" for rack, rules in by_rack.items())
                out["affected_racks"] = f"{len(by_rack)}{of} rack(s) on {cdu} alerting: {listed}"
        return out

    def _refresh_attribution(self, events: list[dict], dirty: dict[str, AlertRecord]) -> list[dict]:
        """After the transitions of a batch: bring the attribution annotations of the alerts on
        the CDU loops those transitions touched up to date (in the batch's newest event of each
        alert, and in `alerts`). Returns `update` events of firing alerts that changed without a
        transition of their own (for receivers that take updates)."""
        loops = {(e["labels"].get("site", ""), e["labels"].get("cdu", "")) for e in events if e["labels"].get(CASCADE_LABEL)}
        if not loops:
            return []
        newest = {e["alert_id"]: e for e in events}
        updates: list[dict] = []
        for rec in list(self._cascade.values()):
            if self._loop(rec) not in loops:
                continue
            annotations = {k: v for k, v in rec.annotations.items() if k not in ATTRIBUTION_ANNOTATIONS}
            annotations.update(self._attribution(rec))
            if annotations == rec.annotations:
                continue
            rec.annotations = annotations
            dirty[rec.alert_id] = rec
            if rec.alert_id in newest:
                newest[rec.alert_id]["annotations"] = dict(annotations)
            elif rec.state is AlertState.FIRING:
                updates.append(self._event(rec, AlertState.FIRING, self.clock or rec.updated_at or datetime.now(UTC)))
        return updates

    def _annotations(self, rec: AlertRecord) -> dict[str, str]:
        rule = rec.rule
        threshold = self.target_thresholds.get(rule.threshold_from or "", {}).get(rec.target, rule.threshold)
        kwargs = dict(target=rec.target, value=rec.value, reasons=rec.reasons, threshold=threshold, rule=rule.id,
                      severity=rule.severity, labels=rec.labels)
        out = {}
        for name in ("summary", "description", "runbook"):
            template = getattr(rule.annotations, name)
            if template:
                try:
                    out[name] = render_template(template, **kwargs)
                except (KeyError, IndexError, ValueError, TypeError) as exc:  # e.g. {value:d} on a float
                    out[name] = f"{template} (template error: {exc})"
        out["reasons"] = "; ".join(rec.reasons)
        out.update(self._attribution(rec))
        return out

    def _event(self, rec: AlertRecord, previous: AlertState | None, ts: datetime) -> dict:
        return {
            "v": EVENT_VERSION, "alert_id": rec.alert_id, "rule": rec.rule.id, "target": rec.target,
            "state": str(rec.state), "previous_state": None if previous is None else str(previous),
            "severity": rec.rule.severity, "labels": dict(rec.labels), "annotations": dict(rec.annotations),
            "value": rec.value, "reasons": list(rec.reasons), "flapping": rec.flapping,
            "startsAt": iso(rec.started_at), "endsAt": iso(rec.resolved_at), "firedAt": iso(rec.fired_at), "ts": iso(ts),
        }

    # ------------------------------------------------------------------ persistence

    def _commit(self, events: list[dict], records: Iterable[AlertRecord] | dict[str, AlertRecord]) -> None:
        dirty = records if isinstance(records, dict) else {r.alert_id: r for r in records}
        updates = self._refresh_attribution(events, dirty)
        if not events and not dirty:
            return
        rows = [r.row() for r in dirty.values()]
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            self._con.execute("BEGIN TRANSACTION")
            try:
                store.upsert_alert_rows(self._con, rows)
                for receiver in self.receivers:
                    wanted = [e for e in events if receiver.wants(e)]
                    if receiver.takes_updates:
                        wanted += [e for e in updates if receiver.wants(e)]
                    if wanted:
                        enqueue(self._con, [receiver.name], wanted)
                self._con.execute("COMMIT")
                break
            except duckdb.TransactionException as exc:
                # A write-write conflict with the dispatcher's outbox updates: try again; the
                # state change is already made in memory, so giving up would lose the events.
                with contextlib.suppress(duckdb.Error):
                    self._con.execute("ROLLBACK")
                if attempt == COMMIT_ATTEMPTS:
                    log.error("could not store %d alert event(s) after %d attempts: %s", len(events), attempt, exc)
                    raise
                self.health.inc("retries")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    self._con.execute("ROLLBACK")
                raise
        self.health.inc("sent", len(events))
        if events and self.on_events is not None:
            self.on_events(events)


def _placeholder_rule(row: dict) -> Rule:
    return Rule.model_validate({"id": row["rule"], "source": f"check:{row['rule']}", "severity": row["severity"],
                                "annotations": {"summary": row["annotations"].get("summary", row["rule"]).replace("{", "{{").replace("}", "}}")}})
