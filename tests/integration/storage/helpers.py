"""Shared bits of the storage integration tests: topics, envelopes, reading Kafka back."""

from __future__ import annotations

import asyncio
import time

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from podwatch.samples import Reading

BASE_TS_MS = 1_764_000_000_000  # 2025-11-24


def reading(device_no: int, seq: int, n_points: int = 5) -> Reading:
    return Reading(
        site="test",
        device=f"pdu-{device_no:03d}",
        seq=seq,
        ts_ms=BASE_TS_MS + seq * 1000 + device_no,
        points={f"pdu.l{k}.power_kw": float(device_no * 1000 + seq) + k / 10 for k in range(n_points)},
    )


def envelope_bytes(r: Reading) -> bytes:
    return orjson.dumps(r.to_envelope())


async def create_topics(bootstrap: str, *topics: tuple[str, int]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1) for name, partitions in topics])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes]]) -> None:
    """Send (key, value) pairs with acks=all and wait for every ack."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 15.0) -> list:
    """Read a topic from the beginning until `expected` records arrived (or fail)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    records = []
    try:
        await consumer.topics()
        partitions = consumer.partitions_for_topic(topic) or {0}
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        deadline = time.monotonic() + timeout
        while len(records) < expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"read {len(records)} of {expected} records from {topic}")
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
    finally:
        await consumer.stop()
    return records
