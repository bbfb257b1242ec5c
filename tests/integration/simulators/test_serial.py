"""Modbus RTU on a serial line: the simulator serves one end of a socat pty pair."""

from __future__ import annotations

import subprocess

import pytest
from pymodbus.client import AsyncModbusSerialClient

from podwatch.collectors.profiles import load_profile
from podwatch.simulators.modbus_server import DeviceRegisters, serve_serial
from tests.conftest import wait_until

pytestmark = [pytest.mark.timeout(30)]


async def test_serial_rtu_server_on_a_pty(small_site, tmp_path):
    a, b = tmp_path / "sim", tmp_path / "client"
    socat = subprocess.Popen(["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = client = None
    try:
        await wait_until(lambda: a.exists() and b.exists(), 5, what="socat pty pair")
        device = small_site.device("cdu-1")
        regs = DeviceRegisters(device, load_profile(device.profile))
        server, endpoint = await serve_serial(str(a), [regs], baudrate=19200, parity="N")
        await endpoint.update({"cdu-1": {"cdu.supply_temp_c": 31.7, "cdu.flow_lpm": 612.5}})
        client = AsyncModbusSerialClient(str(b), baudrate=19200, parity="N", timeout=1, retries=1)
        assert await client.connect()
        rr = await client.read_input_registers(0, count=1, device_id=200)
        assert not rr.isError() and rr.registers == [317]
        rr = await client.read_input_registers(32, count=2, device_id=200)
        assert client.convert_from_registers(rr.registers, client.DATATYPE.FLOAT32, word_order="little") == 612.5
    finally:
        if client is not None:
            client.close()
        if server is not None:
            await server.shutdown()
        socat.terminate()
        socat.wait(5)
