"""The `podwatch serve` process: one process owns the site's DuckDB file and runs, around it,
ingest (Kafka -> DuckDB exactly once), the streaming checks and thermal-risk scoring, the alert
engine with its receivers, the periodic headroom forecasts, and the HTTP API.

The storage `Service` is the spine; each stage attaches itself through its extension points
(batch listeners, periodic tasks). This module only composes them, in the order data flows:
    sink rows -> analytics checks -> alert observations -> alert engine -> outbox -> receivers
                 alert engine (threshold rules on the same rows)
    periodic: risk scoring -> risk_scores + observations; headroom -> forecasts
Alert events also go to Kafka `podwatch.alerts.v1` (through the spooling producer) when Kafka is set.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, replace
from pathlib import Path

from podwatch.logs import fields
from podwatch.stream.topics import TELEMETRY_TOPIC

log = logging.getLogger(__name__)


@dataclass
class ServeOptions:
    db: str
    kafka: str | None = None
    site: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    model_dir: str | None = None
    alertmanager: str | None = None
    alert_rules: str | None = None
    alerting_config: str | None = None
    headroom_every_s: float = 600.0
    analytics: bool = True
    speed: float = 1.0  # accelerated runs: periodic analytics keep pace with simulated time
    topic: str = TELEMETRY_TOPIC


def alerting_settings(opts: ServeOptions):
    """The alerting settings of `serve`: the flags over the settings file; notifications link to
    this process's API unless the file names the address people reach it at (`generator_url`)."""
    from podwatch.analytics.alerting.settings import settings_for

    settings = settings_for(opts.alertmanager, rules_file=opts.alert_rules, config_file=opts.alerting_config)
    if "generator_url" not in settings.model_fields_set:
        settings = settings.model_copy(update={"generator_url": f"http://{opts.host}:{opts.port}"})
    return settings


class ServeProcess:
    """Builds the service with every stage attached; `async with ServeProcess(opts) as sp: await sp.wait()`."""

    def __init__(self, opts: ServeOptions) -> None:
        from podwatch.storage.service import Service, ServiceSettings

        if opts.port == 0:
            # pick the port now: notifications link to it, and the alerting is built before the API listens
            from podwatch.procs import free_port

            opts = replace(opts, port=free_port())
        self.opts = opts
        self.service = Service(ServiceSettings(db=opts.db, kafka=opts.kafka, site=opts.site, host=opts.host,
                                               port=opts.port, token=opts.token, topic=opts.topic))
        self.site = None
        self.producer = None
        self.alerting = None
        self.analytics = None
        self.headroom = None

    def _attach(self) -> None:
        from podwatch.analytics.alerting import attach_alerting

        publish = None
        if self.opts.kafka:
            from podwatch.stream.config import KafkaSettings
            from podwatch.stream.producer import TelemetryProducer

            spool = Path(self.opts.db).with_suffix(".alert-spool")
            self.producer = TelemetryProducer(KafkaSettings(bootstrap_servers=self.opts.kafka, client_id="podwatch-serve"),
                                              spool, site=self.site.id if self.site else "", health_instance="alerts")
            publish = self.producer.send_alert_event
        settings = alerting_settings(self.opts)
        self.alerting = attach_alerting(self.service, settings, publish, site=self.site)
        # after the sink and the API stop, before the DuckDB file closes: the outbox flushes its last tick
        self.service.add_on_stop(self._close_alerting)
        if self.site is not None and self.opts.analytics:
            from podwatch.analytics.headroom import HeadroomRefresher
            from podwatch.analytics.streaming import attach_analytics

            from podwatch.analytics.streaming import StreamingSettings

            defaults = StreamingSettings()
            # a breach can follow a pump trip by under a minute: score at least every 5 s of simulated time
            settings = defaults.model_copy(update={"score_every_s": min(defaults.score_every_s, 5.0) / self.opts.speed,
                                                   "clock_speed": self.opts.speed})
            self.analytics = attach_analytics(self.service, self.site, self.opts.model_dir, observe=self.alerting.observe,
                                              settings=settings)
            self.headroom = HeadroomRefresher(self.site)
            self.service.add_periodic(self._headroom_once, self.opts.headroom_every_s / self.opts.speed)

    async def _close_alerting(self, _service) -> None:
        if self.alerting is not None:
            await self.alerting.aclose()

    async def _headroom_once(self, service) -> None:
        report = await self.headroom.run_once(service)
        if report is not None:
            log.info("headroom forecasts refreshed", extra=fields(rows=len(report.rows)))

    async def start(self) -> None:
        if self.opts.site:
            from podwatch.site import load_site

            self.site = load_site(self.opts.site)
        self._attach()
        if self.producer is not None:
            await self.producer.start()
        await self.service.start()

    async def stop(self) -> None:
        await self.service.stop()  # runs _close_alerting before closing the file
        if self.producer is not None:
            await self.producer.stop()

    async def wait(self) -> None:
        await self.service.wait()

    async def __aenter__(self) -> "ServeProcess":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def run_serve(opts: ServeOptions, announce=print) -> None:
    """Run until SIGINT/SIGTERM; stop everything in order (API and sink, alerting, producer)."""
    process = ServeProcess(opts)
    await process.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(process.service.stop()))
    announce(f"podwatch API on {process.service.url} (OpenAPI: {process.service.url}/openapi.json)")
    try:
        await process.wait()
    finally:
        await process.stop()
