"""The producer when aiokafka fails several records of one group at once (a restarted Tansu answers
produce requests with UnknownError for a few seconds): every record goes to the spool, and no
failed aiokafka future is left with an unretrieved exception (asyncio would log
"Future exception was never retrieved" with a traceback for each)."""

from __future__ import annotations

import asyncio
import gc

from aiokafka.errors import UnknownError

from podwatch.samples import Reading
from podwatch.stream.config import KafkaSettings
from podwatch.stream.producer import TelemetryProducer
from tests.conftest import wait_until


class FailingKafka:
    """Stands in for AIOKafkaProducer: every send is accepted, then its delivery fails."""

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, topic, value, key=None):
        self.sent += 1
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(fut.set_exception, UnknownError())
        return fut

    async def flush(self):
        return None

    async def stop(self):
        return None


async def test_a_group_failing_with_unknown_error_spools_every_record_and_retrieves_every_exception(tmp_path):
    loop = asyncio.get_running_loop()
    unretrieved: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    kafka = FailingKafka()
    producer = TelemetryProducer(KafkaSettings(bootstrap_servers="127.0.0.1:9", delivery_timeout_s=1.0,
                                               retry_backoff_min_s=5.0, retry_backoff_max_s=5.0,
                                               stop_drain_timeout_s=0.1, health_log_interval_s=0),
                                 tmp_path / "spool", "t", health_instance="unit-failing-group")

    async def fake_ensure() -> bool:
        producer._kafka = kafka
        return True

    producer._ensure_kafka = fake_ensure
    try:
        await producer.start()
        readings = [Reading("t", f"dev-{i}", i, 1_764_000_000_000 + i, {"pdu.power_kw": 1.0}) for i in range(5)]
        durable = await asyncio.gather(*(producer.send(r) for r in readings))
        assert durable == [True] * 5
        await wait_until(lambda: producer.mode == "spool" and producer.spool_records == 5, timeout=5,
                         what="all five records in the spool")
        assert kafka.sent >= 5
    finally:
        await producer.stop()
        gc.collect()
        loop.set_exception_handler(previous)
    never = [c for c in unretrieved if "never retrieved" in str(c.get("message", ""))]
    assert never == [], [c.get("exception") for c in never]
