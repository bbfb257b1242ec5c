"""`fetch.lean_records`: inside the fetch process the sink's consumer gets (offset, value) records
instead of aiokafka's full ConsumerRecords - the same offsets and values, and nothing changes for
a consumer with a deserializer or after the block."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from podwatch.storage.fetch import LeanRecord, lean_records
from tests.integration.storage.helpers import create_topics, read_all

pytestmark = pytest.mark.integration


async def test_lean_records_carry_the_same_offsets_and_values(tansu_broker, unique_topic):
    await create_topics(tansu_broker, (unique_topic, 1))
    producer = AIOKafkaProducer(bootstrap_servers=tansu_broker, acks="all")
    await producer.start()
    try:
        sent = [b'{"n": %d}' % i for i in range(40)] + [None]  # and a tombstone
        for i, value in enumerate(sent):
            await producer.send_and_wait(unique_topic, value, key=b"k%d" % i, headers=[("h", b"x")])
    finally:
        await producer.stop()

    stock = await read_all(tansu_broker, unique_topic, len(sent))
    with lean_records() as replaced:
        assert replaced
        lean = await read_all(tansu_broker, unique_topic, len(sent))
        decoded = await read_all(tansu_broker, unique_topic, len(sent), value_deserializer=lambda v: v)
    after = await read_all(tansu_broker, unique_topic, len(sent))

    assert all(type(r) is LeanRecord for r in lean)
    assert [(r.offset, r.value) for r in lean] == [(r.offset, r.value) for r in stock]
    assert [r.value for r in stock] == sent
    # a consumer that is not the sink's (it deserializes) and any consumer after the block: full records
    assert all(isinstance(r, ConsumerRecord) for r in decoded + after)
    assert [r.headers for r in after] == [r.headers for r in stock]
