"""Producer throughput: podwatch's TelemetryProducer next to a raw aiokafka loop measured in the
same run, against a local Tansu broker (client and broker share the machine's cores).

    python benchmarks/produce.py [--readings 50000] [--points 12] [--compression zstd]

Prints readings/s for:
- raw aiokafka: send() futures + gather (the reference: no spool, no bookkeeping);
- podwatch send_many() in batches of 1000 (the bulk path);
- podwatch send() from 500 concurrent callers (how the MQTT collector calls it: one await per reading);
- podwatch submit() from 500 device loops (how the Modbus collector calls it: no await per reading,
  at most 64 of a device's readings not yet durable);
- the spool: send() while Kafka is unreachable (append + group-commit fsync), then the drain
  of that backlog once the broker is up.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import logging

from aiokafka import AIOKafkaProducer

import sys

from podwatch import procs
from podwatch.samples import Reading
from podwatch.stream.config import KafkaSettings
from podwatch.stream.envelope import encode_reading
from podwatch.stream.producer import TelemetryProducer
from podwatch.stream.topics import ensure_topics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import record  # noqa: E402


def make_readings(n: int, points: int, devices: int = 500) -> list[Reading]:
    names = [f"pdu.outlet{i:02d}.power_kw" for i in range(points)]
    return [Reading("bench", f"pdu-{i % devices:04d}", i // devices, 1_764_000_000_000 + i,
                    {name: 1.0 + i * 0.001 + j for j, name in enumerate(names)}) for i in range(n)]


async def raw_aiokafka(settings: KafkaSettings, topic: str, readings: list[Reading]) -> float:
    producer = AIOKafkaProducer(**settings.producer_kwargs())
    await producer.start()
    try:
        start = time.perf_counter()
        for i in range(0, len(readings), 1000):
            futures = [await producer.send(topic, encode_reading(r), key=r.device.encode()) for r in readings[i:i + 1000]]
            await asyncio.gather(*futures)
        return len(readings) / (time.perf_counter() - start)
    finally:
        await producer.stop()


async def podwatch_bulk(settings: KafkaSettings, spool: Path, topic: str, readings: list[Reading]) -> float:
    async with TelemetryProducer(settings, spool, "bench", health_instance="bench-bulk", telemetry_topic=topic) as p:
        start = time.perf_counter()
        for i in range(0, len(readings), 1000):
            assert await p.send_many(readings[i:i + 1000]) == len(readings[i:i + 1000])
        return len(readings) / (time.perf_counter() - start)


async def podwatch_concurrent(settings: KafkaSettings, spool: Path, topic: str, readings: list[Reading]) -> float:
    async with TelemetryProducer(settings, spool, "bench", health_instance="bench-conc", telemetry_topic=topic) as p:
        start = time.perf_counter()
        for i in range(0, len(readings), 500):
            results = await asyncio.gather(*(p.send(r) for r in readings[i:i + 500]))
            assert all(results)
        return len(readings) / (time.perf_counter() - start)


async def podwatch_submit(settings: KafkaSettings, spool: Path, topic: str, readings: list[Reading],
                          window: int = 64) -> float:
    """How the Modbus collector calls it: every device hands its reading over and goes on (submit),
    at most `window` of a device's readings not yet durable (the collector's max_unacked_readings)."""
    async with TelemetryProducer(settings, spool, "bench", health_instance="bench-submit", telemetry_topic=topic) as p:
        start = time.perf_counter()
        rounds: list[list[asyncio.Future]] = []  # one reading per device and round (500 devices)
        for i in range(0, len(readings), 500):
            rounds.append([p.submit(r) for r in readings[i:i + 500]])
            if len(rounds) > window:
                assert all(await asyncio.gather(*rounds.pop(0)))
            else:
                await asyncio.sleep(0)  # a poll loop yields between readings
        for futures in rounds:
            assert all(await asyncio.gather(*futures))
        return len(readings) / (time.perf_counter() - start)


async def spool_then_drain(settings: KafkaSettings, spool: Path, topic: str, readings: list[Reading]) -> tuple[float, float]:
    port = procs.free_port()
    down = settings.model_copy(update={"bootstrap_servers": f"127.0.0.1:{port}", "retry_backoff_max_s": 0.5})
    async with TelemetryProducer(down, spool, "bench", health_instance="bench-spool", telemetry_topic=topic) as p:
        start = time.perf_counter()
        for i in range(0, len(readings), 500):
            assert all(await asyncio.gather(*(p.send(r) for r in readings[i:i + 500])))
        spool_rate = len(readings) / (time.perf_counter() - start)
        with procs.tansu(port=port) as broker:
            await ensure_topics(broker.address, topics={topic: 6})
            start = time.perf_counter()
            assert await p.wait_drained(300)
            drain_rate = len(readings) / (time.perf_counter() - start)
    return spool_rate, drain_rate


async def main() -> None:
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # connection-refused noise of the spool phase
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readings", type=int, default=50_000)
    parser.add_argument("--points", type=int, default=12, help="points per reading")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many interleaved runs")
    parser.add_argument("--compression", default="zstd", choices=["zstd", "lz4", "gzip", "snappy", "none"])
    args = parser.parse_args()
    readings = make_readings(args.readings, args.points)
    size = len(encode_reading(readings[0]))
    compression = None if args.compression == "none" else args.compression
    with procs.tansu() as broker, tempfile.TemporaryDirectory() as tmp:
        settings = KafkaSettings(bootstrap_servers=broker.address, compression_type=compression)
        await ensure_topics(broker.address, topics={"bench.raw": 6, "bench.podwatch": 6})
        print(f"{args.readings} readings x {args.points} points ({size} B each), compression={args.compression}, "
              f"6 partitions, acks=all, Tansu on the same machine")
        # best of `--rounds`, interleaved: the machine is shared, so single runs are noisy
        raw = bulk = conc = sub = 0.0
        for _ in range(args.rounds):
            raw = max(raw, await raw_aiokafka(settings, "bench.raw", readings))
            bulk = max(bulk, await podwatch_bulk(settings, Path(tmp) / "a", "bench.podwatch", readings))
            conc = max(conc, await podwatch_concurrent(settings, Path(tmp) / "b", "bench.podwatch", readings))
            sub = max(sub, await podwatch_submit(settings, Path(tmp) / "d", "bench.podwatch", readings))
        print(f"  raw aiokafka send()+gather (reference)   {raw:10,.0f} readings/s")
        print(f"  podwatch send_many(1000)                 {bulk:10,.0f} readings/s  ({bulk / raw:.0%} of raw)")
        print(f"  podwatch send() x 500 concurrent         {conc:10,.0f} readings/s  ({conc / raw:.0%} of raw)")
        print(f"  podwatch submit() x 500 device loops     {sub:10,.0f} readings/s  ({sub / raw:.0%} of raw)")
        spool_rate, drain_rate = await spool_then_drain(settings, Path(tmp) / "c", "bench.spooled", readings)
        print(f"  spool: send() while Kafka is down (fsync) {spool_rate:9,.0f} readings/s")
        print(f"  spool: drain of that backlog              {drain_rate:9,.0f} readings/s")
        record("producer send_many: readings to Kafka (acks=all, zstd)", bulk, "readings/s", reference=raw,
               reference_label="raw aiokafka send()+gather, same messages")
        record("producer send() from 500 concurrent callers", conc, "readings/s", reference=raw,
               reference_label="raw aiokafka send()+gather")
        record("producer submit() from 500 device loops (Modbus collector, <= 64 unacked each)", sub, "readings/s",
               reference=raw, reference_label="raw aiokafka send()+gather")
        record("spool while Kafka is down (fsync before ack)", spool_rate, "readings/s")
        record("spool drain after the outage", drain_rate, "readings/s", reference=raw, reference_label="raw aiokafka")


if __name__ == "__main__":
    asyncio.run(main())
