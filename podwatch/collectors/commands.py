"""`podwatch collect`: run a site's collectors into Kafka (or print the read plan / readings)."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import typer

from podwatch.errors import ConfigError, PodwatchError
from podwatch.stream.config import kafka_option_callback
from podwatch.stream.topics import TELEMETRY_TOPIC, ensure_topics, topic_partitions

log = logging.getLogger(__name__)


def default_spool_dir(site_id: str) -> Path:
    """Where `podwatch collect` spools readings while Kafka is unreachable, unless --spool-dir."""
    return Path(".podwatch") / "spool" / site_id


def _make_producer(kafka: str, site_id: str, spool_dir: Path | None, topic: str | None = None):
    """The stream stage's TelemetryProducer, imported lazily (the collectors do not depend on it)."""
    try:
        from podwatch.stream.config import KafkaSettings
        from podwatch.stream.producer import TelemetryProducer
    except ModuleNotFoundError as exc:
        raise PodwatchError(f"the Kafka producer (podwatch.stream.producer) is not available: {exc}; "
                            "use --print to write readings to stdout") from None
    try:
        settings = KafkaSettings(bootstrap_servers=kafka)
    except ValueError as exc:
        raise ConfigError("--kafka", [str(exc)]) from None
    extra = {"telemetry_topic": topic} if topic else {}
    return TelemetryProducer(settings, spool_dir or default_spool_dir(site_id), site=site_id, **extra)


async def _ensure_topics(kafka: str, telemetry_topic: str | None = None) -> None:
    """Create the podwatch topics when Kafka answers; an unreachable Kafka is not fatal (we spool).
    `telemetry_topic` replaces podwatch.telemetry.v1 (one topic per site on a shared cluster)."""
    wanted = topic_partitions()
    if telemetry_topic and telemetry_topic != TELEMETRY_TOPIC:
        wanted[telemetry_topic] = wanted.pop(TELEMETRY_TOPIC)
    try:
        await ensure_topics(kafka, topics=wanted, timeout_s=5.0)
    except PodwatchError as exc:
        log.warning("Could not create the Kafka topics now; readings are spooled until Kafka answers",
                    extra={"fields": {"error": exc}})


async def _run_collect(site, sink, modbus_settings, mqtt_settings, enable_mqtt: bool, health_interval_s: float,
                       producer=None, clock=None) -> None:
    from podwatch.collectors.runner import CollectorRunner

    if producer is not None:
        await _ensure_topics(producer.settings.bootstrap_servers, getattr(producer, "telemetry_topic", None))
        await producer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        runner = CollectorRunner(site, sink, modbus=modbus_settings, mqtt_settings=mqtt_settings,
                                 health_log_interval_s=health_interval_s, enable_mqtt=enable_mqtt, clock=clock)
        await runner.run(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if producer is not None:
            log.info("Flushing the producer")
            await producer.stop()


def register(app: typer.Typer) -> None:
    @app.command("collect")
    def collect(
        site_file: Path = typer.Option(..., "--site", help="Site file (YAML)."),
        kafka: str | None = typer.Option(None, "--kafka", help="Kafka bootstrap servers HOST:PORT.", callback=kafka_option_callback),
        mqtt: str | None = typer.Option(None, "--mqtt", help="MQTT broker URL (overrides the site's mqtt.url)."),
        no_mqtt: bool = typer.Option(False, "--no-mqtt", help="Do not run the MQTT collector."),
        topic: str = typer.Option(TELEMETRY_TOPIC, "--topic",
                                  help="Telemetry topic (one per site when sites share a Kafka cluster)."),
        port_offset: int = typer.Option(0, "--port-offset", help="Shift every Modbus TCP port by N."),
        spool_dir: Path | None = typer.Option(None, "--spool-dir",
                                              help="Producer spool directory for Kafka outages (default .podwatch/spool/<site>)."),
        plan: bool = typer.Option(False, "--plan", help="Print each Modbus device's read plan and exit."),
        print_readings: bool = typer.Option(False, "--print", help="Write readings as JSON lines to stdout instead of Kafka."),
        max_registers: int | None = typer.Option(None, "--max-registers", min=1, max=125,
                                                 help="Maximum registers per read for every device."),
        max_gap: int | None = typer.Option(None, "--max-gap", min=0, help="Maximum unused registers read through."),
        health_interval_s: float = typer.Option(30.0, "--health-interval", help="Seconds between health log lines."),
        speed: float = typer.Option(1.0, "--speed", min=0.001,
                                    help="Simulated seconds per wall second (accelerated runs against `podwatch simulate`)."),
        clock_origin: str | None = typer.Option(None, "--clock-origin",
                                                help="Share the simulator's clock: WALL_MS:SIM_MS (as given to `simulate`)."),
    ) -> None:
        """Poll a site's Modbus devices and subscribe to its MQTT devices, into Kafka."""
        from podwatch.collectors.modbus import ModbusSettings, format_plan
        from podwatch.site import load_site

        from podwatch.clock import ScaledClock

        site = load_site(site_file, port_offset=port_offset)
        try:
            clock = ScaledClock.from_spec(speed, clock_origin)
        except ValueError:
            raise ConfigError("--clock-origin", [f"{clock_origin!r}: expected WALL_MS:SIM_MS"]) from None
        try:
            modbus_settings = ModbusSettings(max_registers_per_read=max_registers, max_gap=max_gap)
        except ValueError as exc:
            raise ConfigError("options", [str(exc)]) from None
        if plan:
            typer.echo(format_plan(site, modbus_settings))
            return
        mqtt_settings = site.spec.mqtt
        if mqtt:
            from podwatch.site import MqttSettings

            try:
                mqtt_settings = MqttSettings(**{**site.spec.mqtt.model_dump(), "url": mqtt})
            except ValueError as exc:
                raise ConfigError("--mqtt", [f"{mqtt!r}: not mqtt://host:port or mqtts://host:port"]) from None
        # pymodbus logs every timeout at ERROR; the collector logs first failures and recoveries itself.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        if print_readings:
            from podwatch.collectors.runner import StdoutSink

            asyncio.run(_run_collect(site, StdoutSink(), modbus_settings, mqtt_settings, not no_mqtt, health_interval_s,
                                     clock=clock))
            return
        if not kafka:
            raise ConfigError("options", ["--kafka HOST:PORT is required (or --print, or --plan)"])
        producer = _make_producer(kafka, site.id, spool_dir, topic)
        asyncio.run(_run_collect(site, producer, modbus_settings, mqtt_settings, not no_mqtt, health_interval_s, producer,
                                 clock=clock))
