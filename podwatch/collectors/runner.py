"""Runs every collector of a site (Modbus and MQTT) into one sink, logs health periodically and
shuts down in order: stop polling/consuming, let in-flight polls finish and batches flush, then
the caller flushes and closes the sink (`podwatch collect` does this with the Kafka producer).

Lifecycle: `CollectorRunner(site, sink, ...)`; `await run(stop_event)` returns after a clean
shutdown once the event is set. One `SequenceSource` is shared by the collectors so device
sequence numbers all start from the same time base.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from podwatch.collectors.modbus import ModbusCollector, ModbusSettings, ReadingSink, SequenceSource
from podwatch.collectors.mqtt import MqttCollector, MqttCollectorSettings
from podwatch.health import REGISTRY
from podwatch.logs import fields
from podwatch.samples import Reading
from podwatch.site import MqttSettings, Site

log = logging.getLogger(__name__)


class CollectorRunner:
    def __init__(self, site: Site, sink: ReadingSink, modbus: ModbusSettings | None = None,
                 mqtt: MqttCollectorSettings | None = None, mqtt_settings: MqttSettings | None = None,
                 health_log_interval_s: float = 30.0, sequences: SequenceSource | None = None,
                 enable_mqtt: bool = True, clock=None):
        self.site = site
        self.sink = sink
        self.sequences = sequences or SequenceSource()
        self.health_log_interval_s = health_log_interval_s
        has_modbus = any(d.protocol != "mqtt" and d.enabled for d in site.devices)
        has_mqtt = any(d.protocol == "mqtt" and d.enabled for d in site.devices)
        self.modbus = ModbusCollector(site, sink, modbus, sequences=self.sequences, clock=clock) if has_modbus else None
        self.mqtt = (MqttCollector(site, sink, mqtt, mqtt_settings, sequences=self.sequences)
                     if has_mqtt and enable_mqtt else None)

    async def run(self, stop: asyncio.Event) -> None:
        tasks = []
        if self.modbus is not None:
            tasks.append(asyncio.create_task(self.modbus.run(stop), name="modbus collector"))
        if self.mqtt is not None:
            tasks.append(asyncio.create_task(self.mqtt.run(stop), name="mqtt collector"))
        health = asyncio.create_task(self._log_health(stop), name="collector health log")
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, Exception):
                    log.error("A collector stopped with an error", extra=fields(error=repr(r)))
        finally:
            stop.set()
            await health
            self.log_health()

    async def _log_health(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.health_log_interval_s)
            except asyncio.TimeoutError:
                self.log_health()

    def log_health(self) -> None:
        for comp in REGISTRY.all():
            if comp.component in ("modbus_collector", "mqtt_collector") and comp.instance == self.site.id:
                log.info("Collector health", extra=fields(component=comp.component, **comp.snapshot()))


class StdoutSink:
    """Writes each reading as one JSON line to stdout (`podwatch collect --print`); dead letters to stderr."""

    async def send(self, reading: Reading) -> None:
        sys.stdout.write(json.dumps(reading.to_envelope(), separators=(",", ":")) + "\n")
        sys.stdout.flush()

    async def send_dead_letter(self, payload: bytes, reason: str, source: str, **meta) -> None:
        sys.stderr.write(json.dumps({"dead_letter": reason, "source": source, **{k: str(v) for k, v in meta.items()},
                                     "payload": payload[:256].decode("utf-8", "replace")}) + "\n")
