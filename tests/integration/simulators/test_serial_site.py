"""Serial (`modbus-rtu`) devices declared in a site file: the simulator serves them on a socat pty
pair whose collector end is the port path the site names; the real collector (pymodbus serial
client) and mbpoll read them; a unit silenced by a device fault times out while its neighbours
on the line keep answering."""

from __future__ import annotations

import asyncio
import re

import pytest

from podwatch.collectors.modbus import ModbusCollector
from podwatch.errors import PodwatchError
from podwatch.samples import Quality
from podwatch.simulators.engine import Simulator
from podwatch.simulators.scenario import Scenario
from podwatch.site import parse_site
from tests.conftest import wait_until
from tests.integration.collectors.sites import MemorySink

pytestmark = pytest.mark.timeout(40)


def serial_site(port: str) -> dict:
    # parity N: Linux ptys refuse even parity with some termios settings (pyserial: EINVAL); real lines use E
    line = {"port": port, "baudrate": 38400, "parity": "N"}
    return {
        "site": {"id": "lab"},
        "defaults": {"poll_interval_s": 1.0, "timeout_s": 0.3},
        "power": {"transformers": [{"id": "t1", "rating_kva": 500}],
                  "feeders": [{"id": "a", "transformer": "t1", "side": "a", "rating_a": 400},
                              {"id": "b", "transformer": "t1", "side": "b", "rating_a": 400}]},
        "modules": [{"id": "m1",
                     "cdus": [{"id": "cdu1", "capacity_kw": 300, "racks": ["r1", "r2"],
                               "device": {"id": "cdu1", "profile": "podwatch-cdu", "protocol": "modbus-rtu",
                                          "unit_id": 200, "serial": line}}],
                     "racks": [{"template": {"id": "r{i}", "rated_kw": 120, "feeds": {"a": "a", "b": "b"},
                                             "pdus": {"a": {"id": "pdu-r{i}-a", "profile": "raritan-px3",
                                                            "protocol": "modbus-rtu", "unit_id": "{i}", "serial": line}}},
                                "range": [1, 2]}]}],
    }


async def mbpoll(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec("mbpoll", *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=10)
    return proc.returncode, out.decode()


async def test_site_serial_line_served_on_a_pty_pair(tmp_path):
    port = str(tmp_path / "rs485-1")
    site = parse_site(serial_site(port))
    scenario = Scenario.parse({"faults": [{"kind": "device_fault", "target": "pdu-r2-a", "mode": "silent", "onset_s": 0}]},
                              site=site)
    sim = Simulator(site, scenario, seed=1, speed=1e-6, start_time=1_763_000_000_000, mqtt_url=None)
    collector = None
    try:
        await sim.start()
        await wait_until(lambda: sim.updates >= 2, 5, what="the simulator's first register updates")
        served = {e.protocol: e for e in sim.served()}
        assert served["modbus-rtu"].address == port and set(served["modbus-rtu"].units) == {1, 2, 200}
        obs = sim.last_observation
        # an independent client on the collector's end of the line: 38400 8N1
        rc, out = await mbpoll("-m", "rtu", "-b", "38400", "-P", "none", "-a", "1", "-0", "-r", "12306", "-c", "1",
                               "-t", "4:float", "-B", "-1", port)
        assert rc == 0, out
        watts = float(re.search(r"^\[12306\]:\s+(\S+)", out, re.M).group(1))
        assert watts == pytest.approx(obs.device_points("pdu-r1-a")["pdu.power_kw"] * 1000, rel=1e-5)
        collector = ModbusCollector(site, MemorySink())
        cdu = await collector.poll_once("cdu1")
        assert cdu.quality == Quality.GOOD
        assert cdu.points["cdu.flow_lpm"] == pytest.approx(obs.device_points("cdu1")["cdu.flow_lpm"], rel=1e-5)
        silent = await collector.poll_once("pdu-r2-a")
        assert silent.quality == Quality.BAD  # timed out on the shared line ...
        healthy = await collector.poll_once("pdu-r1-a")
        assert healthy.quality == Quality.GOOD  # ... and the neighbour still answers
    finally:
        if collector is not None:
            collector.close()
        await sim.stop()
    await wait_until(lambda: not (tmp_path / "rs485-1").exists(), 5, what="socat removed the pty link")


async def test_a_serial_port_that_refuses_its_settings_is_a_connection_failure_not_a_crash(tmp_path):
    """Found on the way: a pty refuses even parity with termios.error (not an OSError), which
    escaped the collector's poll instead of counting as a failed connection."""
    from podwatch.simulators.engine import SerialLink

    link = SerialLink(str(tmp_path / "rs485-e"))
    await link.start()
    try:
        data = serial_site(str(tmp_path / "rs485-e"))
        for dev in (data["modules"][0]["cdus"][0]["device"], data["modules"][0]["racks"][0]["template"]["pdus"]["a"]):
            dev["serial"] = {**dev["serial"], "parity": "E"}
        collector = ModbusCollector(parse_site(data), MemorySink())
        try:
            reading = await collector.poll_once("pdu-r1-a")
        finally:
            collector.close()
    finally:
        link.stop()
    assert reading.quality == Quality.BAD


async def test_a_real_file_at_the_port_path_is_a_clear_error(tmp_path):
    port = tmp_path / "ttyUSB0"
    port.write_text("not a tty")
    sim = Simulator(parse_site(serial_site(str(port))), seed=1, speed=1e-6, mqtt_url=None)
    with pytest.raises(PodwatchError, match="exists and is not a pty link"):
        await sim.start()
    assert sim.endpoints == []


def test_one_line_one_framing():
    data = serial_site("/tmp/podwatch-never-opened")
    data["modules"][0]["cdus"][0]["device"]["serial"] = {"port": "/tmp/podwatch-never-opened", "baudrate": 9600}
    data["modules"][0]["racks"][0]["template"]["pdus"]["a"]["unit_id"] = "{i+199}"  # r1 -> 200, taken by the CDU
    with pytest.raises(Exception) as exc:
        parse_site(data)
    text = "\n".join(exc.value.errors)
    assert "is 38400 8N1 here but 9600 8E1 at modules[0].cdus[0].device" in text
    assert "/tmp/podwatch-never-opened unit 200 is already used by" in text
