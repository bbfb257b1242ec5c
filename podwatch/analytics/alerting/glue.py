"""Wiring alerting into the process that owns the DuckDB file (`podwatch serve` / the demo).

    runtime = attach_alerting(service, settings, publish=producer.send_alert_event, site=site)
    ...
    await runtime.observe(observations)   # analytics checks / risk model, any time
    ...
    await runtime.aclose()                # on shutdown (idempotent)

`attach_alerting` registers `runtime.on_batch` as the service's batch listener (threshold rules
on every committed batch of samples) and `runtime.deliver` as a periodic task (outbox delivery,
Alertmanager resends, pruning). The engine runs in a worker thread on its own DuckDB cursor (the
sink calls listeners one batch at a time, so it is never re-entered); the dispatcher runs on the
event loop with another cursor. A batch's events are delivered right after it (a `kick`), not at
the next period, which keeps the sample -> notification latency low.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl

from podwatch.analytics.alerting.engine import AlertEngine, site_target_labels
from podwatch.analytics.alerting.model import Observation
from podwatch.analytics.alerting.outbox import OutboxDispatcher
from podwatch.analytics.alerting.receivers import PublishReceiver, Receiver, build_receivers
from podwatch.analytics.alerting.rules import RuleSet, load_rules
from podwatch.analytics.alerting.settings import AlertingSettings
from podwatch.analytics.alerting.store import ensure_alerting_tables

if TYPE_CHECKING:
    from podwatch.site import Site

Publish = Callable[[dict], Awaitable[None]]
PRUNE_EVERY_S = 3600.0


class AlertingRuntime:
    """The engine and the dispatcher of one process, with async entry points."""

    def __init__(self, engine: AlertEngine, dispatcher: OutboxDispatcher, settings: AlertingSettings) -> None:
        self.engine, self.dispatcher, self.settings = engine, dispatcher, settings
        self._engine_lock = asyncio.Lock()
        self._last_prune = time.monotonic()
        self._closed = False

    async def on_batch(self, rows: pl.DataFrame) -> list[dict]:
        """Batch listener: threshold rules on new sample rows; delivery is kicked at once."""
        async with self._engine_lock:
            events = await asyncio.to_thread(self.engine.evaluate_samples, rows)
        if events:
            self.dispatcher.kick()
        return events

    async def observe(self, observations: Iterable[Observation]) -> list[dict]:
        """Analytics observations (checks, risk) into the engine."""
        observations = list(observations)
        async with self._engine_lock:
            events = await asyncio.to_thread(self.engine.observe, observations)
        if events:
            self.dispatcher.kick()
        return events

    async def deliver(self) -> int:
        """Periodic: one outbox delivery pass (+ Alertmanager resends, hourly pruning)."""
        delivered = await self.dispatcher.tick()
        if time.monotonic() - self._last_prune > PRUNE_EVERY_S:
            self._last_prune = time.monotonic()
            self.dispatcher.prune(timedelta(seconds=self.settings.outbox_retention_s))
        return delivered

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.dispatcher.tick()  # a last pass: what fails stays in the outbox for next start
        await self.dispatcher.aclose()


def build_runtime(con: duckdb.DuckDBPyConnection, settings: AlertingSettings, publish: Publish | None = None, *,
                  rules: RuleSet | None = None, site: "Site | None" = None,
                  target_labels: Callable[[str], dict[str, str]] | None = None,
                  extra_receivers: Iterable[Receiver] = ()) -> AlertingRuntime:
    """Engine + dispatcher on two cursors of `con` (the owning process's connection)."""
    engine_con, dispatch_con = con.cursor(), con.cursor()
    for cur in (engine_con, dispatch_con):
        ensure_alerting_tables(cur)
    rules = rules if rules is not None else load_rules(settings.rules_file)
    receivers: list[Receiver] = build_receivers(settings, dispatch_con)
    if publish is not None and settings.publish_to_kafka:
        receivers.append(PublishReceiver(publish))
    receivers.extend(extra_receivers)
    dispatcher = OutboxDispatcher(dispatch_con, receivers, initial_backoff_s=settings.retry.initial_backoff_s,
                                  max_backoff_s=settings.retry.max_backoff_s)
    if target_labels is None and site is not None:
        target_labels = site_target_labels(site)
    engine = AlertEngine(engine_con, rules, receivers=receivers, target_labels=target_labels)
    return AlertingRuntime(engine, dispatcher, settings)


def _connection_of(service: Any) -> duckdb.DuckDBPyConnection:
    for attr in ("db", "database"):
        db = getattr(service, attr, None)
        if db is not None and hasattr(db, "connection"):
            return db.connection
    con = getattr(service, "con", None)
    if isinstance(con, duckdb.DuckDBPyConnection):
        return con
    raise TypeError("attach_alerting: the service exposes no DuckDB connection (expected .db/.database with "
                    ".connection, or .con)")


def attach_alerting(service: Any, settings: AlertingSettings, publish: Publish | None = None, *,
                    site: "Site | None" = None, rules: RuleSet | None = None) -> AlertingRuntime:
    """Register alerting with the storage service: batch listener + periodic delivery."""
    runtime = build_runtime(_connection_of(service), settings, publish, rules=rules, site=site)
    service.add_batch_listener(runtime.on_batch)
    service.add_periodic(runtime.deliver, settings.delivery_interval_s)
    return runtime
