"""Chaos: a TCP proxy between the producer and Tansu (Tansu advertises the proxy) is cut for 30 s
mid-stream — every connection dropped, new ones refused — then restored. Every reading arrives
once per (device, seq) after dedup, none missing, in order per device."""

from __future__ import annotations

import asyncio
import time

import pytest

from podwatch import procs
from podwatch.health import REGISTRY
from podwatch.stream.envelope import decode_envelope
from podwatch.stream.producer import TelemetryProducer
from podwatch.stream.topics import ensure_topics
from tests.conftest import wait_until
from tests.integration.stream.helpers import TcpProxy, fast_settings, read_all, reading, tansu_advertising

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(120)]

OUTAGE_S = 30.0
DEVICES = [f"rack-{i:02d}" for i in range(6)]
POLL_INTERVAL_S = 0.05  # each device loop: one reading per 50 ms, like a fast collector


async def test_30s_broker_outage_through_a_cut_proxy_loses_nothing(tmp_path):
    proxy_port, broker_port = procs.free_port(), procs.free_port()
    bootstrap = f"127.0.0.1:{proxy_port}"
    topic = "chaos.telemetry"
    with tansu_advertising(broker_port, proxy_port):
        proxy = TcpProxy(proxy_port, "127.0.0.1", broker_port)
        await proxy.start()
        try:
            await ensure_topics(bootstrap, topics={topic: 6})
            producer = TelemetryProducer(fast_settings(bootstrap), tmp_path / "spool", "test",
                                         health_instance="chaos", telemetry_topic=topic)
            health = REGISTRY.component("kafka_producer", "chaos")
            next_seq = dict.fromkeys(DEVICES, 0)
            not_durable: list[tuple[str, int]] = []
            stop = asyncio.Event()

            async def device_loop(device: str) -> None:
                while not stop.is_set():
                    if not await producer.send(reading(device, next_seq[device])):
                        not_durable.append((device, next_seq[device]))
                    next_seq[device] += 1
                    await asyncio.sleep(POLL_INTERVAL_S)  # the device's poll interval, not a sync point

            def total() -> int:
                return sum(next_seq.values())

            async with producer:
                loops = [asyncio.create_task(device_loop(d)) for d in DEVICES]
                await wait_until(lambda: health.counters["sent"] >= 100, timeout=15, what="direct sends before the cut")
                assert producer.mode == "direct"

                await proxy.cut()
                cut_at, before_cut = time.monotonic(), total()
                await wait_until(lambda: producer.mode == "spool", timeout=10, what="the producer to notice the outage")
                # the outage lasts OUTAGE_S while every device keeps producing into the spool
                await wait_until(lambda: time.monotonic() - cut_at >= OUTAGE_S, timeout=OUTAGE_S + 5,
                                 interval=0.5, what="the end of the outage")
                assert producer.mode == "spool"
                assert producer.spool_records >= total() - before_cut - 2 * len(DEVICES) > 0
                spooled_during_outage = health.counters["spooled"]

                await proxy.restore()
                await wait_until(lambda: producer.mode == "direct", timeout=30, what="spool drained after restore")
                after_restore = total()
                await wait_until(lambda: total() >= after_restore + 10 * len(DEVICES), timeout=15,
                                 what="direct sends after restore")
                stop.set()
                await asyncio.wait_for(asyncio.gather(*loops), 10)
                assert await producer.wait_drained(20)

            produced = total()
            assert not_durable == []
            assert health.counters["dropped"] == 0
            assert spooled_during_outage >= (produced - before_cut) // 2
            assert health.counters["sent"] >= produced
            records = await read_all(bootstrap, topic, produced, timeout_s=30)
            first_seen: dict[str, list[int]] = {d: [] for d in DEVICES}
            seen: set[tuple[str, int]] = set()
            duplicates = 0
            for record in records:
                env = decode_envelope(record.value)
                assert record.key.decode() == env["device"]
                key = (env["device"], env["seq"])
                if key in seen:
                    duplicates += 1  # at-least-once: the sink drops these by (device, seq)
                    continue
                seen.add(key)
                first_seen[env["device"]].append(env["seq"])
            for device in DEVICES:
                assert first_seen[device] == list(range(next_seq[device])), device  # complete, in order
            assert len(seen) == produced
            print(f"chaos: produced={produced} spooled={spooled_during_outage} duplicates={duplicates} "
                  f"retries={health.counters['retries']}")
        finally:
            await proxy.cut()


async def test_frozen_broker_sigstop_is_an_outage_too(tmp_path):
    """SIGSTOP keeps the broker's sockets open but answers nothing (no reset, connects still
    succeed): only the producer's own timeouts can detect it. Nothing is lost or reordered."""
    with procs.tansu() as broker:
        topic = "frozen.telemetry"
        await ensure_topics(broker.address, topics={topic: 3})
        producer = TelemetryProducer(fast_settings(broker.address), tmp_path / "spool", "test",
                                     health_instance="frozen", telemetry_topic=topic)
        health = REGISTRY.component("kafka_producer", "frozen")
        devices = ["cdu-01", "cdu-02"]
        seq = 0
        async with producer:
            async def produce_until(predicate, timeout_s: float) -> None:
                nonlocal seq
                deadline = time.monotonic() + timeout_s
                while not predicate():
                    assert time.monotonic() < deadline, "condition not reached while producing"
                    assert all(await asyncio.gather(*(producer.send(reading(d, seq)) for d in devices)))
                    seq += 1
                    await asyncio.sleep(POLL_INTERVAL_S)

            await produce_until(lambda: seq >= 10, 10)
            broker.pause()
            try:
                await produce_until(lambda: producer.mode == "spool" and health.counters["spooled"] >= 40, 20)
            finally:
                broker.resume()
            await produce_until(lambda: producer.mode == "direct", 30)
            await produce_until(lambda: health.counters["sent"] >= seq * len(devices) - 2, 10)
            assert await producer.wait_drained(20)
        records = await read_all(broker.address, topic, seq * len(devices))
        first_seen: dict[str, list[int]] = {d: [] for d in devices}
        for record in records:
            env = decode_envelope(record.value)
            if env["seq"] not in first_seen[env["device"]]:
                first_seen[env["device"]].append(env["seq"])
        assert first_seen == {d: list(range(seq)) for d in devices}
        assert health.counters["dropped"] == 0
