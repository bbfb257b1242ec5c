"""Consumer-side helpers of the Kafka contract: lag from the fetch high-water mark, reading a topic
with assign() (no consumer group), and a small dead-letter publisher.

The sink itself lives in `podwatch.storage.sink`; these are the pieces it (and `podwatch tail`)
share with the stream stage.

Lag: `consumer.end_offsets()` is wrong on Tansu (it answers "base offset of the last batch + 1"),
so lag is `consumer.highwater(tp) - position`, where `highwater` is the high-water mark the last
fetch response carried (correct on Tansu and on Apache Kafka). Before the first fetch of a
partition it is unknown (None).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord

from podwatch.errors import PodwatchError
from podwatch.stream.config import KafkaSettings
from podwatch.stream.envelope import dead_letter, encode_dead_letter
from podwatch.stream.topics import DEADLETTER_TOPIC


async def partition_lag(consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int | None]:
    """Messages between each partition's position and its high-water mark; None until the
    consumer has fetched from that partition once."""
    lag: dict[TopicPartition, int | None] = {}
    for tp in partitions:
        highwater = consumer.highwater(tp)
        if highwater is None:
            lag[tp] = None
            continue
        position = await consumer.position(tp)
        lag[tp] = max(highwater - position, 0)
    return lag


def total_lag(lag: dict[TopicPartition, int | None]) -> int:
    """Sum of the known lags (unknown partitions count 0)."""
    return sum(v for v in lag.values() if v is not None)


async def read_topic(settings: KafkaSettings | str, topic: str, *, from_beginning: bool = True,
                     max_messages: int | None = None, idle_timeout_s: float | None = 5.0,
                     ) -> AsyncIterator[ConsumerRecord]:
    """Yield the records of every partition of `topic` through an assign()ed consumer (no group,
    no commits). Stops after `max_messages`, or after `idle_timeout_s` without a record (None:
    never). `from_beginning=False` starts at the records that arrive from now on."""
    settings = settings if isinstance(settings, KafkaSettings) else KafkaSettings(bootstrap_servers=settings)
    consumer = AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest", **settings.consumer_kwargs())
    try:
        await asyncio.wait_for(consumer.start(), settings.request_timeout_ms / 1000 + 5)
    except Exception as exc:
        await consumer.stop()
        raise PodwatchError(f"cannot reach Kafka at {settings.bootstrap_servers}: {exc or type(exc).__name__}") from exc
    try:
        topics = await consumer.topics()
        if topic not in topics:
            raise PodwatchError(f"topic {topic} does not exist on {settings.bootstrap_servers} "
                                f"(topics: {', '.join(sorted(topics)) or 'none'})")
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            # Tansu's "latest" offset is wrong (see module docstring): find the real end by
            # reading to the high-water mark without yielding.
            await consumer.seek_to_beginning(*tps)
            while True:
                batches = await consumer.getmany(timeout_ms=300, max_records=10_000)
                if not batches:
                    break
        yielded = 0
        loop = asyncio.get_running_loop()
        last_record = loop.time()
        while max_messages is None or yielded < max_messages:
            batches = await consumer.getmany(timeout_ms=200, max_records=1000)
            records = sorted((r for rs in batches.values() for r in rs), key=lambda r: (r.timestamp, r.partition, r.offset))
            if records:
                last_record = loop.time()
            for record in records:
                yield record
                yielded += 1
                if max_messages is not None and yielded >= max_messages:
                    return
            if idle_timeout_s is not None and loop.time() - last_record > idle_timeout_s:
                return
    finally:
        await consumer.stop()


class DeadLetterPublisher:
    """Publishes dead letters and waits for Kafka's ack (bounded). For consumers (the sink) that
    must not commit an offset past a bad message before its dead letter is durable. Producers
    use `TelemetryProducer.send_dead_letter`, which spools during outages.

    Lifecycle: `await start()`, `await publish(...)` any number of times, `await stop()` (idempotent)."""

    def __init__(self, settings: KafkaSettings, topic: str = DEADLETTER_TOPIC, source: str = "consumer") -> None:
        self.settings, self.topic, self.source = settings, topic, source
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> "DeadLetterPublisher":
        producer = AIOKafkaProducer(**self.settings.producer_kwargs())
        try:
            await asyncio.wait_for(producer.start(), self.settings.delivery_timeout_s)
        except Exception as exc:
            await producer.stop()
            raise PodwatchError(f"cannot reach Kafka at {self.settings.bootstrap_servers}: {exc or type(exc).__name__}") from exc
        self._producer = producer
        return self

    async def publish(self, payload: bytes, reason: str, *, topic: str | None = None, partition: int | None = None,
                      offset: int | None = None, **meta) -> None:
        """Send one dead letter and wait for the ack; raises TimeoutError after delivery_timeout_s."""
        if self._producer is None:
            raise PodwatchError("DeadLetterPublisher is not started")
        letter = dead_letter(payload, reason, self.source, topic=topic, partition=partition, offset=offset, **meta)
        future = await self._producer.send(self.topic, encode_dead_letter(letter), key=self.source.encode())
        done, _ = await asyncio.wait({future}, timeout=self.settings.delivery_timeout_s)
        if not done:
            raise TimeoutError(f"dead letter not acked within {self.settings.delivery_timeout_s}s")
        future.result()

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await asyncio.wait({asyncio.ensure_future(producer.stop())}, timeout=self.settings.delivery_timeout_s)

    async def __aenter__(self) -> "DeadLetterPublisher":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
