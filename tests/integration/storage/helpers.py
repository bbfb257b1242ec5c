"""Shared bits of the storage integration tests: topics, envelopes, reading Kafka back."""

from __future__ import annotations

import asyncio
import time

import httpx
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


async def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 15.0, **consumer_options) -> list:
    """Read a topic from the beginning until `expected` records arrived (or fail)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                                **consumer_options)
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


# Every stored reading once per (device, seq), and its points stored exactly once: as many
# sample rows at (device, ts) as the readings there say, each metric once, and no sample row
# without its reading. (Readings of a device at the same ts - an MQTT redelivery - are
# counted together, their points cannot be told apart; these tests have none.)
READINGS_CHECK_SQL = """
WITH points AS (SELECT device, ts, count(*) AS n, count(DISTINCT metric) AS metrics FROM samples GROUP BY ALL),
     per_ts AS (SELECT device, ts, sum(n_points) AS n FROM readings GROUP BY ALL)
SELECT
    (SELECT count(*) FROM readings) AS readings,
    (SELECT count(DISTINCT (device, seq)) FROM readings) AS distinct_device_seq,
    (SELECT count(*) FROM per_ts r LEFT JOIN points p USING (device, ts)
     WHERE p.n IS DISTINCT FROM r.n OR p.metrics <> r.n) AS readings_with_wrong_points,
    (SELECT count(*) FROM points p ANTI JOIN readings r USING (device, ts)) AS orphan_point_groups,
    (SELECT count(*) FROM samples) AS points
"""


def readings_check(db) -> dict[str, int]:
    """Counts of READINGS_CHECK_SQL on a `Database` (see there)."""
    names = ["readings", "distinct_device_seq", "readings_with_wrong_points", "orphan_point_groups", "points"]
    return dict(zip(names, db.query(READINGS_CHECK_SQL)[0]))


async def sink_reaches(task: asyncio.Task, predicate, what: str, timeout: float = 30.0) -> None:
    """Wait until `predicate()` holds while the sink's `run()` task is running; a run that ended
    (failed) raises its error at once instead of waiting for the timeout."""
    from tests.conftest import wait_until

    await wait_until(lambda: predicate() or task.done(), timeout=timeout, what=what)
    if task.done():
        task.result()
        raise AssertionError(f"the sink stopped before {what}")


async def healthz_ok(client: httpx.AsyncClient) -> bool:
    return (await client.get("/healthz")).status_code == 200


def serve_answers(proc: asyncio.subprocess.Process, client: httpx.AsyncClient, check=healthz_ok):
    """A `wait_until` predicate for a `podwatch serve` child: fails at once with its stderr if it
    exited; not listening yet (or a body that is not JSON yet) counts as not yet."""
    async def predicate() -> bool:
        if proc.returncode is not None:
            raise AssertionError((await proc.stderr.read()).decode()[-2000:])
        try:
            return await check(client)
        except (httpx.TransportError, ValueError):
            return False

    return predicate
