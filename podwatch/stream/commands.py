"""`podwatch broker`, `podwatch topics create|list`, `podwatch tail`: the local Kafka-protocol
broker for development (Tansu), topic creation, and a reader that prints envelopes."""

from __future__ import annotations

import asyncio
import json
import signal
import threading

import typer

from podwatch.errors import PodwatchError
from podwatch.stream.config import kafka_option_callback
from podwatch.stream.topics import ALL_TOPICS, DEFAULT_TELEMETRY_PARTITIONS, TELEMETRY_TOPIC


def register(app: typer.Typer) -> None:
    @app.command("broker")
    def broker(port: int = typer.Option(None, "--port", help="Port to listen on (default: a free port)"),
               host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on"),
               partitions: int = typer.Option(DEFAULT_TELEMETRY_PARTITIONS, "--partitions", min=1,
                                              help="Partitions of the telemetry topic")) -> None:
        """Run a local Kafka-protocol broker (Tansu, memory storage) with the podwatch topics until
        Ctrl-C / SIGTERM. For development: production points --kafka at Apache Kafka / Redpanda."""
        from podwatch import procs
        from podwatch.stream.topics import ensure_topics

        if port is not None and procs.port_open(host, port):
            raise PodwatchError(f"{host}:{port} is already in use; choose another --port or leave it out for a free one")
        process = procs.tansu(port=port, host=host)
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            process.start()
            try:
                asyncio.run(ensure_topics(process.address, partitions))
            except PodwatchError:
                process.stop()
                raise
            typer.echo(f"Kafka broker (Tansu) listening; bootstrap: {process.address}", color=False)
            typer.echo(f"topics: {', '.join(ALL_TOPICS)}")
            typer.echo("Press Ctrl-C to stop. Memory storage: a restart loses every topic.")
            while not stop.wait(0.5):
                if not process.alive():
                    raise PodwatchError(f"the broker exited unexpectedly: {process.log_tail(500)}")
            typer.echo("stopping the broker")
        finally:
            process.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    topics_app = typer.Typer(help="Kafka topics of podwatch.", no_args_is_help=True)
    app.add_typer(topics_app, name="topics")

    @topics_app.command("create")
    def create(kafka: str = typer.Option(..., "--kafka", help="Bootstrap servers host:port[,host:port]", callback=kafka_option_callback),
               partitions: int = typer.Option(DEFAULT_TELEMETRY_PARTITIONS, "--partitions", min=1,
                                              help="Partitions of the telemetry topic"),
               replication_factor: int = typer.Option(1, "--replication-factor", min=1)) -> None:
        """Create the podwatch topics (existing ones are left as they are)."""
        from podwatch.stream.topics import ensure_topics

        result = asyncio.run(ensure_topics(kafka, partitions, replication_factor=replication_factor))
        for name, state in result.items():
            typer.echo(f"{name}: {state}")

    @topics_app.command("list")
    def list_topics(kafka: str = typer.Option(..., "--kafka", help="Bootstrap servers host:port", callback=kafka_option_callback)) -> None:
        """List the topics of a broker with their partition counts."""

        async def run() -> list[tuple[str, int]]:
            from aiokafka import AIOKafkaConsumer

            consumer = AIOKafkaConsumer(bootstrap_servers=kafka, request_timeout_ms=10_000)
            try:
                await asyncio.wait_for(consumer.start(), 15)
                names = await consumer.topics()
                return sorted((n, len(consumer.partitions_for_topic(n) or ())) for n in names)
            except Exception as exc:
                raise PodwatchError(f"cannot reach Kafka at {kafka}: {exc or type(exc).__name__}") from exc
            finally:
                await consumer.stop()

        for name, count in asyncio.run(run()):
            typer.echo(f"{name}\t{count} partitions")

    @app.command("tail")
    def tail(kafka: str = typer.Option(..., "--kafka", help="Bootstrap servers host:port", callback=kafka_option_callback),
             topic: str = typer.Option(TELEMETRY_TOPIC, "--topic", help="Topic to read"),
             count: int = typer.Option(10, "--count", "-n", min=1, help="Stop after this many messages"),
             follow: bool = typer.Option(False, "--follow", "-f", help="Only new messages (default: from the beginning)"),
             idle_timeout: float = typer.Option(5.0, "--idle-timeout",
                                                help="Stop after this many seconds without a message (0: never)"),
             meta: bool = typer.Option(False, "--meta", help="Wrap each envelope with partition, offset and key")) -> None:
        """Print the messages of a topic as JSON lines (envelopes; invalid ones with the reason)."""
        from podwatch.stream.consumer import read_topic
        from podwatch.stream.envelope import EnvelopeError, decode_envelope

        def render(record) -> str:
            try:
                value = decode_envelope(record.value) if "telemetry" in topic else json.loads(record.value)
            except (EnvelopeError, ValueError, TypeError) as exc:
                value = {"invalid": getattr(exc, "reason", str(exc)),
                         "raw": (record.value or b"")[:200].decode(errors="replace")}
            if meta:
                value = {"partition": record.partition, "offset": record.offset,
                         "key": record.key.decode(errors="replace") if record.key else None, "value": value}
            return json.dumps(value, separators=(",", ":"))

        async def run() -> int:
            printed = 0
            async for record in read_topic(kafka, topic, from_beginning=not follow, max_messages=count,
                                           idle_timeout_s=idle_timeout if idle_timeout > 0 else None):
                typer.echo(render(record))
                printed += 1
            return printed

        printed = asyncio.run(run())
        if printed == 0:
            typer.echo(f"no messages on {topic} within {idle_timeout:g}s", err=True)
