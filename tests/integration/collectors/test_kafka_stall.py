"""A Kafka that stops answering is only known to be down after the producer's delivery timeout.
The Modbus collector keeps polling on its grid meanwhile: the readings of those seconds go to the
spool behind the ones in flight, so the outage leaves no hole in any device's time line."""

from __future__ import annotations

import asyncio
import time

import pytest

from podwatch import procs
from podwatch.collectors.modbus import ModbusCollector
from podwatch.health import REGISTRY
from podwatch.stream.envelope import decode_envelope
from podwatch.stream.producer import TelemetryProducer
from podwatch.stream.topics import ensure_topics
from tests.conftest import wait_until
from tests.integration.collectors.test_modbus_collector import gateway, gateway_site  # noqa: F401 (fixture)
from tests.integration.stream.helpers import fast_settings, read_all

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

INTERVAL_S = 0.2


async def test_polls_keep_their_grid_while_a_frozen_kafka_is_detected(gateway, free_port, tmp_path):  # noqa: F811
    await gateway(units=(1, 2))
    site = gateway_site(free_port, racks=2, interval=INTERVAL_S)
    with procs.tansu() as broker:
        topic = "stall.telemetry"
        await ensure_topics(broker.address, topics={topic: 2})
        # delivery timeout 2 s = 10 poll intervals: awaiting each send skipped ~10 ticks per device
        producer = TelemetryProducer(fast_settings(broker.address), tmp_path / "spool", site.id,
                                     health_instance=f"stall-{free_port}", telemetry_topic=topic)
        kafka = producer.health
        collector = ModbusCollector(site, producer)
        counters = collector.health.counters
        overruns0, dropped0 = counters["overruns"], counters["dropped"]
        async with producer:
            stop = asyncio.Event()
            task = asyncio.create_task(collector.run(stop))
            await wait_until(lambda: kafka.counters["sent"] >= 6, 15, what="direct sends before the stall")
            paused_ms = time.time() * 1000
            broker.pause()  # SIGSTOP: connections stay open, nothing answers
            try:
                await wait_until(lambda: producer.mode == "spool", 20, what="the producer to spool after its timeout")
                detected_ms = time.time() * 1000
            finally:
                broker.resume()
            await wait_until(lambda: producer.mode == "direct", 30, what="the spool drained")
            sent = kafka.counters["sent"]
            await wait_until(lambda: kafka.counters["sent"] >= sent + 4, 10, what="direct sends after the stall")
            stop.set()
            await task
            assert await producer.wait_drained(20)
        assert counters["overruns"] - overruns0 == 0
        assert counters["dropped"] - dropped0 == 0
        handed_over = kafka.counters["received"]
        records = await read_all(broker.address, topic, handed_over)
        by_device: dict[str, dict[int, int]] = {}
        for record in records:
            env = decode_envelope(record.value)
            by_device.setdefault(env["device"], {})[env["seq"]] = env["ts"]  # duplicates: same (seq, ts)
        assert set(by_device) == {"pdu-r1-a", "pdu-r2-a"}
        assert sum(len(s) for s in by_device.values()) == handed_over  # every reading, once after dedup
        for device, ts_by_seq in by_device.items():
            seqs = sorted(ts_by_seq)
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), device  # no reading lost
            ts = [ts_by_seq[s] for s in seqs]
            gaps = [b - a for a, b in zip(ts, ts[1:])]
            assert max(gaps) < 1.5 * INTERVAL_S * 1000, (device, max(gaps))  # no tick left unpolled
            # the seconds before the stall was detected are in the time line, every tick of them
            assert detected_ms - paused_ms >= 1900
            in_stall = [t for t in ts if paused_ms <= t <= detected_ms]
            assert len(in_stall) >= (detected_ms - paused_ms) / (INTERVAL_S * 1000) - 1, device
