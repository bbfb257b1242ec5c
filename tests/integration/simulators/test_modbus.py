"""The simulator's Modbus servers against independent clients: Debian's mbpoll and pymodbus."""

from __future__ import annotations

import asyncio
import re

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.framer import FramerType

from podwatch.simulators.engine import Simulator
from podwatch.simulators.scenario import Scenario
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(30)
FROZEN = 1e-6  # speed so slow that the physics does not move and registers keep their first values


async def mbpoll(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec("mbpoll", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=10)
    return proc.returncode, out.decode()


def mbpoll_values(text: str) -> dict[int, float]:
    return {int(a): float(v) for a, v in re.findall(r"^\[(\d+)\]:\s+(\S+)", text, re.M)}


@pytest.fixture
async def frozen_sim(small_site):
    sim = Simulator(small_site, seed=4, speed=FROZEN, start_time=1_763_000_000_000)
    await sim.start()
    await wait_until(lambda: sim.updates >= 2, 5, what="the simulator's first register updates")
    yield sim
    await sim.stop()


async def test_mbpoll_reads_documented_registers(frozen_sim, small_site):
    gw = next(g for g in small_site.spec.gateways if g.id == "gw")
    port = str(gw.port)
    obs = frozen_sim.last_observation
    # PDU active power: holding 12306, float32 ABCD, watts (profile scale 0.001 -> kW)
    rc, out = await mbpoll("-m", "tcp", "-p", port, "-a", "1", "-0", "-r", "12306", "-c", "1", "-t", "4:float",
                           "-B", "-1", "127.0.0.1")
    assert rc == 0, out
    power_w = mbpoll_values(out)[12306]
    assert power_w == pytest.approx(obs.device_points("pdu-r1-a")["pdu.power_kw"] * 1000.0, rel=1e-5)
    assert power_w > 10_000  # a 132 kW rack's A side draws tens of kW
    # CDU flow: input 32, float32 CDAB (mbpoll's default word order)
    rc, out = await mbpoll("-m", "tcp", "-p", port, "-a", "200", "-0", "-r", "32", "-c", "1", "-t", "3:float",
                           "-1", "127.0.0.1")
    assert rc == 0, out
    assert mbpoll_values(out)[32] == pytest.approx(obs.device_points("cdu-1")["cdu.flow_lpm"], rel=1e-5)
    # CDU supply temperature: input 0, int16 x 0.1 degC
    rc, out = await mbpoll("-m", "tcp", "-p", port, "-a", "200", "-0", "-r", "0", "-c", "1", "-t", "3", "-1",
                           "127.0.0.1")
    assert rc == 0, out
    raw = mbpoll_values(out)[0]
    assert raw * 0.1 == pytest.approx(obs.device_points("cdu-1")["cdu.supply_temp_c"], abs=0.05 + 1e-9)
    # Schneider meter numbers registers from 1: total power 3060 travels as wire address 3059
    rc, out = await mbpoll("-m", "tcp", "-p", port, "-a", "50", "-0", "-r", "3059", "-c", "1", "-t", "4:float",
                           "-B", "-1", "127.0.0.1")
    assert rc == 0, out
    assert mbpoll_values(out)[3059] == pytest.approx(obs.device_points("meter-fa")["meter.power_kw"], rel=1e-5)
    # an address no profile uses is an illegal data address, as on a real device
    rc, out = await mbpoll("-m", "tcp", "-p", port, "-a", "1", "-0", "-r", "100", "-c", "1", "-t", "4", "-1",
                           "127.0.0.1")
    assert rc != 0 and "Illegal data address" in out


async def test_rtu_over_tcp_gateway_serves_sunspec(frozen_sim, small_site):
    gw = next(g for g in small_site.spec.gateways if g.id == "gw-rtu")
    client = AsyncModbusTcpClient("127.0.0.1", port=gw.port, framer=FramerType.RTU, timeout=2, retries=0)
    await client.connect()
    try:
        marker = await client.read_holding_registers(40000, count=4, device_id=5)
        assert not marker.isError()
        assert marker.registers == [0x5375, 0x6E53, 1, 65]  # "SunS", common model 1, length 65
        rr = await client.read_holding_registers(40097, count=2, device_id=5)
        watts = client.convert_from_registers(rr.registers, client.DATATYPE.FLOAT32, word_order="big")
        expected = frozen_sim.last_observation.device_points("meter-x1")["meter.power_kw"] * 1000.0
        assert watts == pytest.approx(expected, rel=1e-5)
    finally:
        client.close()


async def test_device_fault_exception_0x0b_and_silent_device(small_site):
    scenario = Scenario.parse({"name": "df", "faults": [
        {"kind": "device_fault", "target": "pdu-r1-a", "mode": "exception", "exception_code": 11, "onset_s": 0},
        {"kind": "device_fault", "target": "pdu-r2-a", "mode": "silent", "onset_s": 0}]}, site=small_site)
    sim = Simulator(small_site, scenario, seed=1, speed=FROZEN, start_time=1_763_000_000_000)
    await sim.start()
    gw = next(g for g in small_site.spec.gateways if g.id == "gw")
    client = AsyncModbusTcpClient("127.0.0.1", port=gw.port, timeout=0.5, retries=0)
    try:
        await wait_until(lambda: sim.updates >= 2, 5, what="register updates")
        await client.connect()
        bad = await client.read_holding_registers(12296, count=2, device_id=1)
        assert bad.isError() and bad.exception_code == 11
        good = await client.read_holding_registers(12296, count=2, device_id=101)  # pdu-r1-b, same gateway
        assert not good.isError()
        volts = client.convert_from_registers(good.registers, client.DATATYPE.FLOAT32, word_order="big")
        assert 220 < volts < 260
        unknown = await client.read_holding_registers(12296, count=2, device_id=77)  # no such unit on the gateway
        assert unknown.isError() and unknown.exception_code == 11
        with pytest.raises(ModbusIOException):
            await client.read_holding_registers(12296, count=2, device_id=2)  # silent: times out
    finally:
        client.close()
        await sim.stop()
        await sim.stop()  # idempotent
    assert sim.endpoints == []


async def test_port_in_use_is_a_clear_error(small_site):
    from podwatch.errors import PodwatchError

    gw = next(g for g in small_site.spec.gateways if g.id == "gw")
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", gw.port)
    sim = Simulator(small_site, seed=1, speed=FROZEN)
    try:
        with pytest.raises(PodwatchError, match=f"127.0.0.1:{gw.port}"):
            await sim.start()
        assert sim.endpoints == []  # what did start was stopped again
    finally:
        blocker.close()
        await blocker.wait_closed()
        await sim.stop()
