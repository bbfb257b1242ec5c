"""Accelerated runs: with the simulator's scaled clock, a 1 s poll interval at speed 10 is 0.1 s of
wall time, and reading timestamps advance in simulated time (about 1 s apart)."""

from __future__ import annotations

import asyncio
import time

import pytest

from podwatch.clock import ScaledClock
from podwatch.collectors.modbus import ModbusCollector, ModbusSettings
from podwatch.procs import free_port
from tests.conftest import wait_until
from tests.integration.collectors.modbus_server import ProfileServer
from tests.integration.collectors.sites import MemorySink, pdu_values, rack_site, raritan

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def test_scaled_clock_sets_interval_and_timestamps():
    port = free_port()
    site = rack_site(1, [{"id": "gw", "host": "127.0.0.1", "port": port, "timeout_s": 0.05}],
                     pdu_a={"gateway": "gw", "unit_id": "{i}"}, pdu_b={"gateway": "gw", "unit_id": "{i+100}"},
                     defaults={"poll_interval_s": 1.0, "timeout_s": 0.05})
    server = await ProfileServer({1: (raritan(), pdu_values(1)), 101: (raritan(), pdu_values(101))}, port).start()
    sim_start_ms = 1_700_000_000_000
    clock = ScaledClock(10.0, time.time_ns() // 1_000_000, sim_start_ms)
    sink = MemorySink()
    collector = ModbusCollector(site, sink, ModbusSettings(stale_after_polls=0), clock=clock)
    stop = asyncio.Event()
    started = time.monotonic()
    task = asyncio.create_task(collector.run(stop))
    try:
        await wait_until(lambda: sum(1 for r in sink.readings if r.device == "pdu-r1-a") >= 6, timeout=5.0,
                         what="six polls of one device")
        wall = time.monotonic() - started
    finally:
        stop.set()
        await task
        await server.stop()
    ts = [r.ts_ms for r in sink.readings if r.device == "pdu-r1-a"][:6]
    assert wall < 3.0  # six 1 s intervals at speed 10 take ~0.6 s of wall time, not 6 s
    assert all(t >= sim_start_ms for t in ts) and ts[0] < sim_start_ms + 60_000  # simulated epoch, not wall time
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    assert all(700 <= g <= 1300 for g in gaps), gaps  # ~1 s of simulated time apart
