"""BMS-style MQTT publishing against a real mosquitto, read by Debian's mosquitto_sub."""

from __future__ import annotations

import asyncio
import json

import pytest

from podwatch.simulators.engine import Simulator

pytestmark = pytest.mark.timeout(30)

POINTS = {"RackLiquidSupplyTemperature", "RackLiquidReturnTemperature", "RackLiquidFlow",
          "RackLiquidDifferentialPressure", "RackControlValvePosition", "RackPower", "RackLeakDetect"}


async def test_mosquitto_sub_receives_documented_bms_payloads(small_site, mosquitto_broker):
    host, port = mosquitto_broker
    # two full rounds of rack r1's points (7 per round), whatever point the subscription starts at
    sub = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-h", host, "-p", str(port), "-t", "BMS/v1/PUB/Value/Rack/+/t1/m1/r1", "-v", "-C", "14",
        "-W", "20", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    sim = Simulator(small_site, seed=2, speed=5.0, mqtt_url=f"mqtt://{host}:{port}", serve_modbus=False)
    await sim.start()
    try:
        out, err = await asyncio.wait_for(sub.communicate(), timeout=25)
    finally:
        await sim.stop()
    assert sub.returncode == 0, err.decode()
    seen = {}
    for line in out.decode().splitlines():
        topic, payload = line.split(" ", 1)
        prefix, point, tag_path = topic.rsplit("/", 4)[0], topic.split("/")[5], "/".join(topic.split("/")[6:])
        assert prefix.startswith("BMS/v1/PUB/Value/Rack") and tag_path == "t1/m1/r1"
        body = json.loads(payload)
        assert set(body) == {"value", "timestamp", "quality"}
        assert body["quality"] == 1
        assert abs(body["timestamp"] - sim.start_ms) < 3_600_000  # simulated-time milliseconds
        seen[point] = body["value"]
    assert set(seen) == POINTS
    assert 30_000 < seen["RackPower"] < 160_000  # published in W (profile scale 0.001 -> kW)
    assert 30 < seen["RackLiquidReturnTemperature"] < 55
    assert seen["RackLeakDetect"] == 0
