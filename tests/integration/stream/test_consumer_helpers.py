"""Consumer helpers against Tansu: lag from the high-water mark, read_topic, DeadLetterPublisher."""

from __future__ import annotations

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from podwatch.errors import PodwatchError
from podwatch.stream.consumer import DeadLetterPublisher, partition_lag, read_topic, total_lag
from podwatch.stream.envelope import decode_envelope
from podwatch.stream.producer import TelemetryProducer
from tests.integration.stream.helpers import fast_settings, reading

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_lag_uses_the_highwater_mark(tansu_broker, topics, tmp_path):
    async with TelemetryProducer(fast_settings(tansu_broker), tmp_path, "test", health_instance="lag",
                                 telemetry_topic=topics["telemetry"]) as p:
        assert await p.send_many([reading("pdu-01", seq) for seq in range(25)]) == 25
    consumer = AIOKafkaConsumer(bootstrap_servers=tansu_broker, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topics["telemetry"], p) for p in consumer.partitions_for_topic(topics["telemetry"])]
        consumer.assign(tps)
        assert set((await partition_lag(consumer, tps)).values()) == {None}  # nothing fetched yet
        got = 0
        while got < 10:
            batches = await consumer.getmany(timeout_ms=500, max_records=10 - got)
            got += sum(len(v) for v in batches.values())
        lag = await partition_lag(consumer, tps)
        assert total_lag(lag) == 15  # 25 produced (one batch: Tansu's end_offsets() would say 1), 10 read
    finally:
        await consumer.stop()


async def test_read_topic_and_dead_letter_publisher(tansu_broker, topics, tmp_path):
    async with DeadLetterPublisher(fast_settings(tansu_broker), topics["deadletter"], source="duckdb_sink") as dlq:
        await dlq.publish(b"\x00bad", "value is not valid JSON", topic=topics["telemetry"], partition=3, offset=17)
    letters = [r async for r in read_topic(tansu_broker, topics["deadletter"], max_messages=1, idle_timeout_s=10)]
    letter = orjson.loads(letters[0].value)
    assert (letter["source"], letter["partition"], letter["offset"]) == ("duckdb_sink", 3, 17)
    async with TelemetryProducer(fast_settings(tansu_broker), tmp_path, "test", health_instance="read",
                                 telemetry_topic=topics["telemetry"]) as p:
        await p.send_many([reading("cdu-01", seq) for seq in range(5)])
    records = [r async for r in read_topic(tansu_broker, topics["telemetry"], max_messages=5, idle_timeout_s=10)]
    assert [decode_envelope(r.value)["seq"] for r in records] == list(range(5))
    with pytest.raises(PodwatchError, match="does not exist"):
        async for _ in read_topic(tansu_broker, "no.such.topic", max_messages=1):
            pass
