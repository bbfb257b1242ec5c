"""Modbus RTU over a serial line: a pty pair made by Debian's socat, a pymodbus serial server on
one end, the collector on the other. Needs pyserial (pymodbus' serial transport)."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess

import pytest

from podwatch.collectors.modbus import ModbusCollector
from podwatch.samples import Quality
from podwatch.site import SerialSettings
from tests.conftest import wait_until
from tests.integration.collectors.modbus_server import ProfileServer
from tests.integration.collectors.sites import MemorySink, pdu_values, rack_site, raritan

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30),
              pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")]


@pytest.fixture
def pty_pair(tmp_path):
    server_end, client_end = tmp_path / "server", tmp_path / "client"
    proc = subprocess.Popen(["socat", f"pty,raw,echo=0,link={server_end}", f"pty,raw,echo=0,link={client_end}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        asyncio.run(wait_until(lambda: server_end.exists() and client_end.exists(), 5, what="socat ptys"))
        yield str(server_end), str(client_end)
    finally:
        proc.terminate()
        proc.wait(5)


async def test_rtu_serial_units_are_polled_through_a_pty_pair(pty_pair):
    server_end, client_end = pty_pair
    srv = await ProfileServer({u: (raritan(), pdu_values(u)) for u in (1, 2)}, 0, serial_port=server_end,
                              baudrate=115200, parity="N").start()
    serial = SerialSettings(port=client_end, baudrate=115200, parity="N")
    site = rack_site(2, [], pdu_a={"host": "127.0.0.1", "port": 1502, "unit_id": "{i}"},
                     defaults={"poll_interval_s": 1.0, "timeout_s": 0.5})
    # the site model's serial form (protocol modbus-rtu + serial settings) for both PDUs
    site.devices = [dataclasses.replace(d, protocol="modbus-rtu", serial=serial, host=None, port=None) for d in site.devices]
    collector = ModbusCollector(site, MemorySink())
    try:
        assert len(collector.endpoints) == 1 and next(iter(collector.endpoints)) == f"serial:{client_end}"
        for unit in (1, 2):
            reading = await collector.poll_once(f"pdu-r{unit}-a")
            assert reading.quality is Quality.GOOD
            assert reading.points == pytest.approx(pdu_values(unit), rel=1e-6)
    finally:
        collector.close()
        await srv.stop()
