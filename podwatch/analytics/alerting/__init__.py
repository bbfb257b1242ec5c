"""Alerting: rules (YAML), the alert lifecycle engine, receivers with a durable outbox.

Public API (docs/alerts.md):
- `Observation` — what analytics checks and the risk model emit (model.py).
- `load_rules(path)` / `RuleSet` / `Rule` — rules, shipped defaults merged with a site file.
- `AlertEngine(con, rules, receivers=..., target_labels=..., cdu_racks=..., on_events=...)` —
  `observe(obs)`, `evaluate_samples(df)`, `causes_of(rec)` / `symptoms_of(rec)` (cause
  attribution, docs/alerts.md "One CDU fault, one page"); persists to the DuckDB `alerts`
  table, queues events in `alert_outbox`.
- `OutboxDispatcher(con, receivers)` — delivers the outbox (`tick()`, `kick()`, `run(stop)`).
- `AlertingSettings` / `load_settings(path)`; receivers in receivers.py.
- `attach_alerting(service, settings, publish=None, site=None) -> ServiceAlerting` — wiring for
  the serve process (`observe(obs)` for analytics, `aclose()`).
"""

from podwatch.analytics.alerting.engine import (
    AlertEngine,
    AlertRecord,
    cause_ref,
    site_cdu_racks,
    site_device_entities,
    site_target_labels,
)
from podwatch.analytics.alerting.glue import AlertingRuntime, ServiceAlerting, attach_alerting, build_runtime
from podwatch.analytics.alerting.model import ALERTS_TOPIC, AlertState, Observation, alert_id
from podwatch.analytics.alerting.outbox import DeliveryError, OutboxDispatcher
from podwatch.analytics.alerting.rules import Rule, RuleSet, load_rules
from podwatch.analytics.alerting.settings import AlertingSettings, load_settings

__all__ = [
    "ALERTS_TOPIC", "AlertEngine", "AlertRecord", "AlertState", "AlertingRuntime", "AlertingSettings", "DeliveryError",
    "Observation", "OutboxDispatcher", "Rule", "RuleSet", "ServiceAlerting", "alert_id", "attach_alerting", "build_runtime", "load_rules",
    "load_settings", "cause_ref", "site_cdu_racks", "site_device_entities", "site_target_labels",
]
