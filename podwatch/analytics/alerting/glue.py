"""Wiring alerting into the process that owns the DuckDB file (`podwatch serve` / the demo).

    alerting = attach_alerting(service, settings, publish=producer.send_alert_event, site=site)
    async with service:                     # the runtime is built once the service opened the file
        await alerting.observe(observations)   # analytics checks / risk model, any time
        ...
    await alerting.aclose()                 # idempotent

`attach_alerting` registers `on_batch` as the service's batch listener (threshold rules
on every committed batch of samples) and `deliver` as a periodic task (outbox delivery,
Alertmanager resends, pruning). The engine runs in a worker thread on its own DuckDB cursor (the
sink calls listeners one batch at a time, so it is never re-entered); the dispatcher runs on the
event loop with another cursor. A batch's events are delivered right after it (a `kick`), not at
the next period, which keeps the sample -> notification latency low.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import duckdb
import polars as pl

from podwatch.analytics.alerting.engine import AlertEngine, site_cdu_racks, site_device_entities, site_target_labels
from podwatch.analytics.alerting.model import Observation
from podwatch.analytics.alerting.outbox import OutboxDispatcher
from podwatch.analytics.alerting.receivers import PublishReceiver, Receiver, build_receivers
from podwatch.analytics.alerting.rules import RuleSet, load_rules
from podwatch.analytics.alerting.settings import AlertingSettings
from podwatch.analytics.alerting.store import ensure_alerting_tables

if TYPE_CHECKING:
    from podwatch.site import Site

Publish = Callable[[dict], Awaitable[object]]  # e.g. TelemetryProducer.send_alert_event
PRUNE_EVERY_S = 3600.0


class AlertingRuntime:
    """The engine and the dispatcher of one process, with async entry points."""

    def __init__(self, engine: AlertEngine, dispatcher: OutboxDispatcher, settings: AlertingSettings) -> None:
        self.engine, self.dispatcher, self.settings = engine, dispatcher, settings
        self._engine_lock = asyncio.Lock()
        self._last_prune = time.monotonic()
        self._closed = False
        self._last_batch: tuple[float, datetime] | None = None  # (monotonic, newest sample time)
        self.silence_after_s = 5.0

    async def on_batch(self, rows: pl.DataFrame) -> list[dict]:
        """Batch listener: threshold rules on new sample rows; delivery is kicked at once."""
        async with self._engine_lock:
            events = await asyncio.to_thread(self.engine.evaluate_samples, rows)
            if self.engine.clock is not None:
                self._last_batch = (time.monotonic(), self.engine.clock)
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

    async def deliver(self, _service: Any = None) -> int:
        """Periodic (`coro_fn(service)`): one outbox delivery pass (+ Alertmanager resends, hourly pruning)."""
        if self._last_batch is not None and time.monotonic() - self._last_batch[0] >= self.silence_after_s:
            # no batch at all: `stale_after` rules run on from the newest sample time with the wall clock
            now = self._last_batch[1] + timedelta(seconds=time.monotonic() - self._last_batch[0])
            async with self._engine_lock:
                events = await asyncio.to_thread(self.engine.check_stale, now)
            if events:
                self.dispatcher.kick()
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
    engine = AlertEngine(engine_con, rules, receivers=receivers, target_labels=target_labels,
                         device_entities=site_device_entities(site) if site is not None else None,
                         cdu_racks=site_cdu_racks(site) if site is not None else None,
                         target_thresholds=({"rack_return_limit": {r.id: r.return_limit_c for r in site.racks}}
                                            if site is not None else None))
    return AlertingRuntime(engine, dispatcher, settings)


def _connection_of(service: Any) -> duckdb.DuckDBPyConnection | None:
    """The owning connection of a storage `Service` (None before it started)."""
    for attr in ("db", "database"):
        db = getattr(service, attr, None)
        if db is not None and hasattr(db, "connection"):
            return db.connection
    con = getattr(service, "con", None)
    if isinstance(con, duckdb.DuckDBPyConnection):
        return con
    return None


class ServiceAlerting:
    """Alerting attached to a storage `Service`. The service opens its DuckDB file in `start()`,
    after listeners and periodic tasks are registered, so the runtime is built on first use
    (the first periodic call, which the service makes right at start)."""

    def __init__(self, service: Any, settings: AlertingSettings, publish: Publish | None, rules: RuleSet,
                 site: "Site | None") -> None:
        self._service, self.settings, self._publish, self._rules, self._site = service, settings, publish, rules, site
        self.runtime: AlertingRuntime | None = None

    def _ensure(self) -> AlertingRuntime:
        if self.runtime is None:
            con = _connection_of(self._service)
            if con is None:
                raise RuntimeError("alerting used before the service opened its DuckDB file (call after start())")
            self.runtime = build_runtime(con, self.settings, self._publish, rules=self._rules, site=self._site)
        return self.runtime

    async def on_batch(self, rows: pl.DataFrame) -> list[dict]:
        return await self._ensure().on_batch(rows)

    async def observe(self, observations: Iterable[Observation]) -> list[dict]:
        return await self._ensure().observe(observations)

    async def deliver(self, _service: Any = None) -> int:
        return await self._ensure().deliver()

    async def aclose(self) -> None:
        if self.runtime is not None:
            await self.runtime.aclose()


def attach_alerting(service: Any, settings: AlertingSettings, publish: Publish | None = None, *,
                    site: "Site | None" = None, rules: RuleSet | None = None) -> ServiceAlerting:
    """Register alerting with the storage service (before `service.start()`): the batch
    listener (threshold rules on new rows) and periodic outbox delivery. Rules are loaded now,
    so a bad rules file fails the start with every error listed."""
    rules = rules if rules is not None else load_rules(settings.rules_file)
    attached = ServiceAlerting(service, settings, publish, rules, site)
    service.add_batch_listener(attached.on_batch)
    service.add_periodic(attached.deliver, settings.delivery_interval_s)
    return attached
