"""Per-device / per-gateway read limits from the site file (`max_registers_per_read`, `max_gap`):
the simulator answers over-long reads with exception 03 and reads across undefined registers with
exception 02, as limited hardware does; the collector's plan respects the limits, so every point
of every device reads good and equals what the simulator serves."""

from __future__ import annotations

import pytest
from pymodbus.client import AsyncModbusTcpClient

from podwatch import procs
from podwatch.collectors.modbus import ModbusCollector
from podwatch.samples import Quality
from podwatch.simulators.engine import Simulator
from podwatch.site import load_site
from tests.conftest import wait_until
from tests.integration.collectors.sites import MemorySink

pytestmark = pytest.mark.timeout(30)

SITE = """
site: {{id: lim, timezone: UTC}}
gateways:
  - {{id: serial-gw, host: 127.0.0.1, port: {port}, max_registers_per_read: 16, max_gap: 2}}
power:
  transformers:
    - {{id: x1, rating_kva: 2000, meter: {{id: meter-x1, profile: schneider-pm5560, gateway: serial-gw, unit_id: 9,
                                          max_registers_per_read: 8}}}}
  feeders:
    - {{id: fa, transformer: x1, side: a, rating_a: 2000}}
    - {{id: fb, transformer: x1, side: b, rating_a: 2000}}
modules:
  - id: m1
    cdus: [{{id: c1, capacity_kw: 600, pumps: 2, pump_flow_lpm: 600, racks: [r1]}}]
    racks:
      - id: r1
        rated_kw: 132
        feeds: {{a: fa, b: fb}}
        pdus:
          a: {{id: pdu-a, profile: raritan-px3, gateway: serial-gw, unit_id: 1}}
          b: {{id: pdu-b, profile: raritan-px3, gateway: serial-gw, unit_id: 2, max_gap: 0}}
"""


@pytest.fixture
async def limited(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(SITE.format(port=procs.free_port()))
    site = load_site(path)
    sim = Simulator(site, seed=2, speed=1e-6, start_time=1_763_000_000_000, mqtt_url=None)
    await sim.start()
    await wait_until(lambda: sim.updates >= 1, 5, what="first register update")
    yield site, sim
    await sim.stop()


async def test_limited_hardware_rejects_long_reads_and_gaps(limited):
    site, sim = limited
    port = site.spec.gateways[0].port
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    await client.connect()
    try:
        too_long = await client.read_holding_registers(12296, count=17, device_id=1)  # gateway: 16
        assert too_long.isError() and too_long.exception_code == 3
        wide_gap = await client.read_holding_registers(12296, count=16, device_id=1)  # spans 6 undefined, gateway: 2
        assert wide_gap.isError() and wide_gap.exception_code == 2
        ok = await client.read_holding_registers(12306, count=6, device_id=1)
        assert not ok.isError() and len(ok.registers) == 6
        meter = await client.read_holding_registers(2999, count=10, device_id=9)  # device: 8
        assert meter.isError() and meter.exception_code == 3
        gap = await client.read_holding_registers(12296, count=12, device_id=2)  # 12300..12305 undefined
        assert gap.isError() and gap.exception_code == 2
        dense = await client.read_holding_registers(12296, count=4, device_id=2)
        assert not dense.isError()
    finally:
        client.close()


async def test_collector_plans_within_the_limits_and_reads_every_point(limited):
    site, sim = limited
    collector = ModbusCollector(site, MemorySink())
    try:
        plans = {d: collector.plan_of(d) for d in ("pdu-a", "pdu-b", "meter-x1")}
        assert max(r.count for r in plans["pdu-a"].requests) <= 16
        assert max(r.count for r in plans["meter-x1"].requests) <= 8
        assert all(r.gap_registers == 0 for r in plans["pdu-b"].requests)
        assert all(r.gap_registers <= 2 for r in plans["pdu-a"].requests)
        obs = sim.last_observation
        for device in plans:
            reading = await collector.poll_once(device)
            assert reading.quality == Quality.GOOD, (device, reading)
            assert all(v is not None for v in reading.points.values()), reading.points
            for metric, value in reading.points.items():
                assert value == pytest.approx(obs.device_points(device)[metric], rel=1e-4, abs=1e-3), (device, metric)
        largest = sim.endpoints[0].largest_read  # what the collector really asked the simulator for
        assert largest[1] <= 16 and largest[9] <= 8 and largest[2] <= 16
    finally:
        collector.close()
