"""Every transition reaches Kafka `podwatch.alerts.v1` (here a unique topic on the real Tansu
broker) through the stream stage's producer, in order, keyed by alert_id."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import duckdb
import orjson
import pytest

from podwatch.analytics.alerting import Observation, build_runtime, load_rules
from podwatch.analytics.alerting.settings import settings_from_dict
from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_transitions_published_to_kafka(tansu_broker, unique_topic, tmp_path):
    import podwatch.stream.producer as producer_mod
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from podwatch.stream.config import KafkaSettings

    admin = AIOKafkaAdminClient(bootstrap_servers=tansu_broker)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(unique_topic, 1, 1)])
    finally:
        await admin.close()
    producer = producer_mod.TelemetryProducer(KafkaSettings(bootstrap_servers=tansu_broker), tmp_path / "spool",
                                              site="test", alerts_topic=unique_topic, health_instance=unique_topic)
    await producer.start()
    con = duckdb.connect(str(tmp_path / "a.duckdb"))
    runtime = build_runtime(con, settings_from_dict({}), producer.send_alert_event,
                            rules=load_rules(text="rules: [{id: pump_redundancy_lost, for: 10s, clear_for: 0s}]"))
    consumer = AIOKafkaConsumer(unique_topic, bootstrap_servers=tansu_broker, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    got: list[tuple[bytes, dict]] = []
    try:
        t0 = datetime.now(UTC)
        events = await runtime.observe([
            Observation("pump_redundancy_lost", "cdu-m1", True, t0, 1.0, {}, ["pump 1 down"]),
            Observation("pump_redundancy_lost", "cdu-m1", True, t0 + timedelta(seconds=10), 1.0, {}, ["pump 1 down"]),
            Observation("pump_redundancy_lost", "cdu-m1", False, t0 + timedelta(seconds=20), 0.0)])
        assert [e["state"] for e in events] == ["pending", "firing", "resolved"]
        await wait_until(lambda: runtime.dispatcher.pending_count() == 0, timeout=15, what="outbox published to Kafka")
        await consumer.start()

        async def fetch():
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                got.extend((r.key, orjson.loads(r.value)) for r in records)
            return len(got) >= 3
        await wait_until(fetch, timeout=15, what="3 alert events on the topic")
        assert [v["state"] for _, v in got] == ["pending", "firing", "resolved"]
        assert {k for k, _ in got} == {events[0]["alert_id"].encode()}
        assert got[1][1]["reasons"] == ["pump 1 down"] and got[1][1]["v"] == 1
    finally:
        await consumer.stop()
        await runtime.aclose()
        await asyncio.wait_for(producer.stop(), 20)
        con.close()
