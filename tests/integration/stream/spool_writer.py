"""Subprocess of the kill-and-restart test: a producer whose Kafka is unreachable writes readings
to its spool and prints "<device> <seq>" after each send() returned (= durable), until killed.

    python -m tests.integration.stream.spool_writer BOOTSTRAP SPOOL_DIR TOPIC
"""

from __future__ import annotations

import asyncio
import sys

from podwatch.stream.config import KafkaSettings
from podwatch.stream.producer import TelemetryProducer
from tests.integration.stream.helpers import reading

DEVICES = ("pdu-01", "pdu-02", "cdu-01", "meter-01")


async def main(bootstrap: str, spool_dir: str, topic: str) -> None:
    settings = KafkaSettings(bootstrap_servers=bootstrap, delivery_timeout_s=1.0, retry_backoff_max_s=1.0)
    producer = TelemetryProducer(settings, spool_dir, "test", health_instance="spool-writer", telemetry_topic=topic)
    await producer.start()
    print("STARTED", producer.mode, flush=True)
    seq = 0
    while True:  # until SIGKILL
        results = await asyncio.gather(*(producer.send(reading(device, seq)) for device in DEVICES))
        for device, durable in zip(DEVICES, results):
            if durable:
                sys.stdout.write(f"{device} {seq}\n")
        sys.stdout.flush()
        seq += 1


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
