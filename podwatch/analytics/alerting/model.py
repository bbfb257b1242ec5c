"""The alerting contract: what analytics hands to the alert engine (`Observation`) and what the
engine emits on every lifecycle transition (the alert event, `podwatch.alerts.v1`).

Observation — one evaluation of one condition on one target:

    Observation(rule="flow_per_kw_low", target="rack-m1-03", active=True,
                ts=datetime(2026, 11, 22, 3, 0, tzinfo=UTC), value=0.71,
                labels={"site": "demo", "module": "m1", "rack": "rack-m1-03"},
                reasons=["flow 0.71 L/min/kW (design 1.2)", "ΔT 17 K and rising"])

- `rule` is the *check name* that produced it (`flow_per_kw_low`, `leak_detected`, ...) or
  `thermal_risk` for the risk model. Every alert rule with `source: check:<rule>` (or
  `source: risk` for `thermal_risk`) consumes it; several rules may consume the same check
  (e.g. a warning and a critical rule).
- `active` says whether the checked condition holds. A rule with its own `threshold` ignores
  `active` and compares `value` instead (with hysteresis), e.g. risk probability >= 0.6.
- `ts` is the time the evaluation refers to (sample time, UTC). The engine's clock is these
  timestamps: hold times and clear holds are measured in them, never by sleeping.
- `labels` are merged into the alert's labels (site, module, rack, device, ...).
- `reasons` are sentences shown in the alert's annotations (most important first).

Alert event (JSON object, one per transition, published to Kafka `podwatch.alerts.v1` keyed by
`alert_id` and queued in the outbox of every receiver):

    {"v": 1, "alert_id": "3f1c...", "rule": "cdu_supply_temp_high", "target": "cdu-m1-01",
     "state": "firing", "previous_state": "pending", "severity": "critical",
     "labels": {"alertname": "cdu_supply_temp_high", "severity": "critical", "target": "cdu-m1-01",
                "site": "demo", "module": "m1", "team": "facilities"},
     "annotations": {"summary": "...", "description": "...", "runbook": "...", "reasons": "..."},
     "value": 41.2, "reasons": ["supply 41.2 °C > 40 °C"], "flapping": false,
     "startsAt": "2026-11-22T03:00:00+00:00", "endsAt": null, "firedAt": "2026-11-22T03:02:00+00:00",
     "ts": "2026-11-22T03:02:00+00:00"}

- `state`: pending | firing | resolved. A pending alert whose condition clears before its hold
  time has `state: resolved` and `firedAt: null` (it never notified anybody: receivers only get
  events of alerts that fired).
- `startsAt`: when the condition first held; `endsAt`: when it resolved (null while active);
  `ts`: the sample time of the transition. All ISO 8601 UTC.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

EVENT_VERSION = 1
ALERTS_TOPIC = "podwatch.alerts.v1"


class AlertState(StrEnum):
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass(slots=True)
class Observation:
    """One evaluation of one condition on one target (see the module docstring)."""

    rule: str
    target: str
    active: bool
    ts: datetime
    value: float | None = None
    labels: dict[str, str] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ts = as_utc(self.ts)


def alert_id(rule: str, target: str) -> str:
    """Stable id of the alert of `rule` on `target` (sha1 of both, hex): one alert per pair."""
    return hashlib.sha1(f"{rule}\x1f{target}".encode()).hexdigest()


def as_utc(ts: datetime) -> datetime:
    """A timezone-aware UTC datetime; naive datetimes are taken to be UTC already."""
    if ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC)


def iso(ts: datetime | None) -> str | None:
    return None if ts is None else as_utc(ts).isoformat()


def parse_iso(text: str | None) -> datetime | None:
    return None if text is None else as_utc(datetime.fromisoformat(text))
