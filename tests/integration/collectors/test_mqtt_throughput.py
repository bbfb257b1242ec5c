"""MQTT collector under a slow sink and a busy broker (found running the 20 MW example site):
readings go to the sink concurrently (bounded), per-device order holds, and stop() returns
promptly while a publisher keeps publishing."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from podwatch.collectors.mqtt import MqttCollector, MqttCollectorSettings
from podwatch.samples import Reading
from tests.conftest import wait_until
from tests.integration.collectors.sites import rack_site

pytestmark = [pytest.mark.integration, pytest.mark.timeout(40)]


class SlowSink:
    """Each send takes `delay_s` (a Kafka round trip on a busy broker); records concurrency."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.readings: list[Reading] = []
        self.concurrent = 0
        self.max_concurrent = 0

    async def send(self, reading: Reading) -> bool:
        self.readings.append(reading)  # call order = the order a producer would append
        self.concurrent += 1
        self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            await asyncio.sleep(self.delay_s)  # the sink's latency, not a synchronisation
        finally:
            self.concurrent -= 1
        return True

    async def send_dead_letter(self, payload, reason, source, **meta) -> bool:
        return True


def site(broker, racks):
    host, port = broker
    return rack_site(racks, [], sensors={"profile": "generic-json-rack"}, site_id="tp",
                     mqtt={"url": f"mqtt://{host}:{port}", "client_id": f"c-{uuid.uuid4().hex[:8]}"})


def publisher(broker):
    host, port = broker
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    client.connect(host, port)
    client.loop_start()
    return client


async def test_a_slow_sink_does_not_serialise_readings(mosquitto_broker):
    racks, rounds = 40, 5
    sink = SlowSink(delay_s=0.05)  # serialised: 200 readings x 50 ms = 10 s
    collector = MqttCollector(site(mosquitto_broker, racks), sink, MqttCollectorSettings(max_in_flight=64))
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    await asyncio.wait_for(collector.connected.wait(), 10)
    pub = publisher(mosquitto_broker)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for n in range(rounds):
            for i in range(1, racks + 1):
                body = {"ts": 1_732_240_000_000 + n, "power_kw": float(n), "flow_lpm": 100.0}
                pub.publish(f"podwatch/tp/telemetry/bms-r{i}", json.dumps(body), qos=1)
        await wait_until(lambda: len(sink.readings) == racks * rounds and sink.concurrent == 0, 8,
                         what="every reading delivered")
        elapsed = loop.time() - started
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        pub.loop_stop()
        pub.disconnect()
    assert elapsed < 5.0, f"{racks * rounds} readings took {elapsed:.1f} s: sends are serialised"
    assert 1 < sink.max_concurrent <= 64
    for i in range(1, racks + 1):  # per-device order kept (the order send() was called)
        values = [r.points["rack.power_kw"] for r in sink.readings if r.device == f"bms-r{i}"]
        assert values == [float(n) for n in range(rounds)]


async def test_stop_returns_while_the_broker_keeps_publishing(mosquitto_broker):
    sink = SlowSink(delay_s=0.01)
    collector = MqttCollector(site(mosquitto_broker, 5), sink)
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    await asyncio.wait_for(collector.connected.wait(), 10)
    pub = publisher(mosquitto_broker)
    flooding = threading.Event()
    flooding.set()

    def flood():  # a site that publishes faster than one slow sink can take
        n = 0
        while flooding.is_set():
            n += 1
            pub.publish(f"podwatch/tp/telemetry/bms-r{n % 5 + 1}", json.dumps({"power_kw": 1.0}), qos=0)
            if n % 200 == 0:
                flooding.wait(0.001)  # yield the GIL

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        await wait_until(lambda: len(sink.readings) > 50, 10, what="readings while flooded")
        loop = asyncio.get_running_loop()
        asked = loop.time()
        stop.set()
        await asyncio.wait_for(task, 10)
        took = loop.time() - asked
    finally:
        flooding.clear()
        thread.join(5)
        pub.loop_stop()
        pub.disconnect()
    assert took < 3.0, f"stop took {took:.1f} s while the broker kept publishing"
