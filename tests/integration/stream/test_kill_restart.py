"""Kill -9 a producer that is spooling (Kafka unreachable) in the middle of its writes; a new
producer on the same spool directory drains it: every reading reported durable arrives, in order,
with no hole."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from podwatch import procs
from podwatch.health import REGISTRY
from podwatch.stream.envelope import decode_envelope
from podwatch.stream.producer import TelemetryProducer
from tests.integration.stream.helpers import fast_settings, read_all
from tests.integration.stream.spool_writer import DEVICES

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
REPO = Path(__file__).resolve().parents[3]


async def test_killed_producer_loses_nothing_its_successor_drains_the_spool(tansu_broker, topics, tmp_path):
    spool_dir = tmp_path / "spool"
    dead_bootstrap = f"127.0.0.1:{procs.free_port()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.stream.spool_writer", dead_bootstrap, str(spool_dir),
        topics["telemetry"], cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    durable: dict[str, list[int]] = {d: [] for d in DEVICES}
    try:
        assert (await asyncio.wait_for(proc.stdout.readline(), 20)).split()[:2] == [b"STARTED", b"spool"]

        async def read_until(n: int) -> None:
            while sum(map(len, durable.values())) < n:
                line = await proc.stdout.readline()
                if not line:
                    raise AssertionError("spool writer exited early")
                device, seq = line.decode().split()
                durable[device].append(int(seq))

        await asyncio.wait_for(read_until(400), 30)
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)  # mid-stream: no stop(), no flush
        rest, _ = await asyncio.wait_for(proc.communicate(), 10)
    for line in rest.decode().splitlines():  # lines printed just before the kill
        device, seq = line.split()
        durable[device].append(int(seq))
    assert proc.returncode == -signal.SIGKILL

    successor = TelemetryProducer(fast_settings(tansu_broker), spool_dir, "test", health_instance="successor",
                                  telemetry_topic=topics["telemetry"])
    async with successor:
        assert successor.spool_records >= sum(map(len, durable.values()))
        assert await successor.wait_drained(30)
    health = REGISTRY.component("kafka_producer", "successor")
    records = await read_all(tansu_broker, topics["telemetry"], health.counters["sent"])
    got: dict[str, list[int]] = {d: [] for d in DEVICES}
    for record in records:
        env = decode_envelope(record.value)
        got[env["device"]].append(env["seq"])
    for device in DEVICES:
        assert durable[device], device
        assert got[device][: len(durable[device])] == durable[device], device  # nothing reported durable is lost
        assert got[device] == list(range(len(got[device]))), device  # FIFO: no hole, no reordering
