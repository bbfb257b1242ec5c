"""Isolation on the real simulator: the demo site with ~10 % of its Modbus devices faulted by
the simulator itself — two units silent on shared gateways (requests dropped: the collector
times out on the shared connection) and two answering exception 0x0B. Every healthy device
still delivers a good reading every interval; a silent neighbour costs a shared gateway at most
its timeout, and only on the (backed-off) polls of the silent unit."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
from pathlib import Path

import pytest

from podwatch.collectors.modbus import ModbusCollector, ModbusSettings
from podwatch.samples import Quality
from podwatch.site import load_site
from tests.integration.collectors.sites import MemorySink
from tests.integration.collectors.test_site_pipeline import DEMO, free_offset

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(60)]

INTERVAL_S, TIMEOUT_S, POLLS = 0.5, 0.2, 8
SILENT = ("pdu-m1-r02-a", "pdu-m2-r05-b")
EXCEPTION = ("pdu-m1-r07-b", "pdu-m2-r03-a")


class TimedSink(MemorySink):
    def __init__(self):
        super().__init__()
        self.arrived: dict[str, list[float]] = {}

    async def send(self, reading):
        await super().send(reading)
        if reading.quality is not Quality.BAD:
            self.arrived.setdefault(reading.device, []).append(asyncio.get_running_loop().time())


async def test_healthy_devices_keep_their_interval_beside_faulted_simulator_units():
    from podwatch.simulators.engine import Simulator

    site = load_site(DEMO, port_offset=free_offset(DEMO))
    sim = Simulator(site)
    await sim.start()
    for device in SILENT:
        sim.inject({"kind": "device_fault", "target": device, "mode": "silent"})
    for device in EXCEPTION:
        sim.inject({"kind": "device_fault", "target": device, "mode": "exception", "exception_code": 11})
    site.devices = [dataclasses.replace(d, poll_interval_s=INTERVAL_S, timeout_s=TIMEOUT_S) for d in site.devices]
    modbus = [d for d in site.devices if d.protocol != "mqtt"]
    assert (len(SILENT) + len(EXCEPTION)) / len(modbus) >= 0.10
    sink = TimedSink()
    collector = ModbusCollector(site, sink, ModbusSettings(stale_after_polls=0))
    stop = asyncio.Event()
    healthy = [d.id for d in modbus if d.id not in SILENT + EXCEPTION]
    try:
        task = asyncio.create_task(collector.run(stop))
        deadline = asyncio.get_running_loop().time() + POLLS * INTERVAL_S + 10
        while any(len(sink.arrived.get(d, [])) < POLLS for d in healthy):
            assert asyncio.get_running_loop().time() < deadline, "healthy devices fell behind"
            await asyncio.sleep(INTERVAL_S / 2)  # pacing of the check, not synchronisation
        stop.set()
        await task
    finally:
        stop.set()
        await sim.stop()

    worst = 0.0
    for device in healthy:
        times = sink.arrived[device][:POLLS]
        gaps = [b - a for a, b in zip(times, times[1:])]
        worst = max(worst, max(abs(g - INTERVAL_S) for g in gaps))
        assert statistics.mean(gaps) == pytest.approx(INTERVAL_S, abs=0.05), device
        assert all(r.quality is Quality.GOOD for r in sink.of(device)), device
    print(f"worst deviation of a healthy device's reading-to-reading time: {worst * 1000:.0f} ms")
    assert worst <= TIMEOUT_S + 0.1  # at most one timeout of a silent neighbour, plus scheduling slack
    for device in SILENT + EXCEPTION:
        assert sink.of(device) and all(r.quality is Quality.BAD for r in sink.of(device)), device
        assert collector.devices[device].state == "bad"
    assert collector.health.counters["overruns"] == 0
