"""MQTT collector against a real mosquitto: BMS per-point messages batched into readings,
generic JSON, malformed payloads dead-lettered with reasons while the collector keeps running,
and QoS 1 messages acknowledged only after the sink accepted them."""

from __future__ import annotations

import asyncio
import json
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from podwatch.collectors.mqtt import MqttCollector, MqttCollectorSettings, build_route
from podwatch.collectors.profiles import load_profile
from podwatch.samples import Quality
from tests.conftest import wait_until
from tests.integration.collectors.sites import MemorySink, rack_site

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

TS = 1_732_240_000_123


def bms_site(broker, protocol="5"):
    host, port = broker
    return rack_site(2, [], sensors={"enabled": True}, site_id="t1",
                     mqtt={"url": f"mqtt://{host}:{port}", "protocol": protocol, "client_id": f"c-{uuid.uuid4().hex[:8]}"})


@pytest.fixture
def publisher(mosquitto_broker):
    host, port = mosquitto_broker
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    client.connect(host, port)
    client.loop_start()

    def publish(topic, payload, qos=1):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        client.publish(topic, body, qos=qos).wait_for_publish(5)

    yield publish
    client.loop_stop()
    client.disconnect()


async def start(collector):
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    await asyncio.wait_for(collector.connected.wait(), 10)
    return stop, task


def bms(point, rack, value, **extra):
    return f"BMS/v1/PUB/Value/Rack/{point}/t1/m1/{rack}", {"value": value, "timestamp": TS, "quality": 1, **extra}


def test_routes_from_topic_templates():
    route = build_route(load_profile("nvidia-bms-rack"), "t1")
    assert route.subscription == "BMS/v1/PUB/Value/Rack/+/#"
    m = route.pattern.match("BMS/v1/PUB/Value/Rack/RackPower/t1/m1/r1")
    assert m.group("point") == "RackPower" and m.group("tag_path") == "t1/m1/r1"
    generic = build_route(load_profile("generic-json-rack"), "dc1")
    assert generic.subscription == "podwatch/dc1/telemetry/+"
    assert generic.pattern.match("podwatch/dc1/telemetry/rs-1").group("device") == "rs-1"
    assert generic.pattern.match("podwatch/dc2/telemetry/rs-1") is None


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_bms_points_are_batched_into_one_reading_per_device(mosquitto_broker, publisher, protocol):
    sink = MemorySink()
    collector = MqttCollector(bms_site(mosquitto_broker, protocol), sink)
    sent_before = collector.health.counters["sent"]
    stop, task = await start(collector)
    profile = load_profile("nvidia-bms-rack")
    values = {p.point: 10.0 + i for i, p in enumerate(profile.points)}
    for point, value in values.items():  # every point of r1: flushed as soon as all arrived
        publisher(*bms(point, "r1", value))
    publisher(*bms("RackLiquidFlow", "r2", 151.5))  # only one point of r2: flushed after the window
    publisher(*bms("RackPower", "r2", 120000, quality=0))  # BMS says not good: no value kept
    await wait_until(lambda: {r.device for r in sink.readings} == {"bms-r1", "bms-r2"}, 5, what="two readings")
    stop.set()
    await task
    r1 = sink.of("bms-r1")
    assert len(r1) == 1
    expected = {p.metric: values[p.point] * p.scale + p.offset for p in profile.points}
    assert r1[0].points == pytest.approx(expected)
    assert r1[0].points["rack.power_kw"] == pytest.approx(values["RackPower"] / 1000)
    assert r1[0].ts_ms == TS and r1[0].quality is Quality.GOOD and r1[0].site == "t1"
    r2 = sink.of("bms-r2")[0]
    assert r2.points == {"rack.liquid_flow_lpm": 151.5, "rack.power_kw": None}
    assert r2.point_quality == {"rack.power_kw": Quality.BAD}
    assert collector.health.counters["sent"] - sent_before == 2


MALFORMED = [
    ("bad_json", "BMS/v1/PUB/Value/Rack/RackPower/t1/m1/r1", b"{not json"),
    ("not_object", "BMS/v1/PUB/Value/Rack/RackPower/t1/m1/r1", b"[1, 2]"),
    ("missing_field", "BMS/v1/PUB/Value/Rack/RackPower/t1/m1/r1", b'{"timestamp": 1}'),
    ("wrong_type", "BMS/v1/PUB/Value/Rack/RackPower/t1/m1/r1", b'{"value": "41.2"}'),
    ("non_finite", "BMS/v1/PUB/Value/Rack/RackPower/t1/m1/r1", b'{"value": NaN}'),
    # seconds instead of milliseconds: the envelope would break the telemetry schema (ts in 2000..2100)
    ("bad_timestamp", "BMS/v1/PUB/Value/Rack/RackPower/t1/m1/r1", b'{"value": 1, "timestamp": 1795373500}'),
    ("bad_timestamp", "BMS/v1/PUB/Value/Rack/RackPower/t1/m1/r1", b'{"value": 1, "timestamp": 4102444800000}'),
    ("too_large", "BMS/v1/PUB/Value/Rack/RackPower/t1/m1/r1", b'{"value": 1, "pad": "' + b"x" * 1_000_000 + b'"}'),
    ("unknown_device", "BMS/v1/PUB/Value/Rack/RackPower/t1/m9/r77", b'{"value": 1}'),
    ("unknown_point", "BMS/v1/PUB/Value/Rack/RackColour/t1/m1/r1", b'{"value": 1}'),
]


async def test_malformed_payloads_are_dead_lettered_and_the_collector_keeps_running(mosquitto_broker, publisher):
    sink = MemorySink()
    collector = MqttCollector(bms_site(mosquitto_broker), sink)
    too_large_before = collector.health.counters.get("dead_letter_too_large", 0)
    stop, task = await start(collector)
    for _, topic, payload in MALFORMED:
        publisher(topic, payload)
    publisher(*bms("RackLiquidFlow", "r1", 99.0))  # a good message after all the bad ones
    await wait_until(lambda: len(sink.dead_letters) == len(MALFORMED) and sink.readings, 10, what="dead letters + reading")
    stop.set()
    await task
    assert [d["reason"] for d in sink.dead_letters] == [reason for reason, _, _ in MALFORMED]
    for dl, (_, topic, payload) in zip(sink.dead_letters, MALFORMED):
        assert dl["topic"] == topic and dl["source"] == "mqtt"
        assert dl["payload"] == payload and dl["detail"]
    assert sink.readings[0].points == {"rack.liquid_flow_lpm": 99.0}
    assert collector.health.counters["dead_letter_too_large"] - too_large_before == 1


async def test_unknown_topic_under_the_subscription_is_dead_lettered(mosquitto_broker, publisher):
    host, port = mosquitto_broker
    site = rack_site(1, [], sensors={"profile": "generic-json-rack", "id": "rs-{i}"}, site_id="dc1",
                     mqtt={"url": f"mqtt://{host}:{port}", "client_id": f"c-{uuid.uuid4().hex[:8]}"})
    sink = MemorySink()
    collector = MqttCollector(site, sink)
    stop, task = await start(collector)
    publisher("podwatch/dc1/telemetry/rs-1", {"supply_temp_c": 30.5, "flow_lpm": 140, "ts": TS, "extra": "ignored"})
    publisher("podwatch/dc1/telemetry/nobody", {"supply_temp_c": 30.5})
    publisher("podwatch/dc1/telemetry/rs-1", {"other": 1})
    publisher("podwatch/dc1/telemetry/rs-1", {"supply_temp_c": 30.5, "ts": 1795373500})  # seconds, not ms
    await wait_until(lambda: len(sink.dead_letters) == 3 and sink.readings, 5, what="generic reading + dead letters")
    # a handed-in message on a topic no profile maps (as a bridged/misconfigured subscription would deliver)
    await collector.handle("podwatch/dc1/status/rs-1", b"{}")
    stop.set()
    await task
    assert sink.readings[0].device == "rs-1" and sink.readings[0].ts_ms == TS
    assert sink.readings[0].points == {"rack.liquid_supply_temp_c": 30.5, "rack.liquid_flow_lpm": 140.0}
    assert [d["reason"] for d in sink.dead_letters] == ["unknown_device", "missing_field", "bad_timestamp", "unknown_topic"]


class FailingOnceSink(MemorySink):
    def __init__(self):
        super().__init__()
        self.fail = True

    async def send(self, reading):
        if self.fail:
            self.fail = False
            raise ConnectionError("kafka down and spool full")
        await super().send(reading)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_qos1_message_is_not_acknowledged_until_the_sink_accepted_it(mosquitto_broker, publisher, protocol):
    """The first delivery fails in the sink -> no PUBACK; after a reconnect with the persistent
    session (3.1.1: clean_session False; 5: clean_start False + session expiry) the broker
    redelivers it, and this time it is accepted."""
    host, port = mosquitto_broker
    site = rack_site(1, [], sensors={"enabled": True}, site_id="t1",
                     mqtt={"url": f"mqtt://{host}:{port}", "protocol": protocol, "client_id": f"c-{uuid.uuid4().hex[:8]}"})
    sink = FailingOnceSink()
    settings = MqttCollectorSettings(batch_window_s=0.05)
    collector = MqttCollector(site, sink, settings)
    dropped_before = collector.health.counters["dropped"]  # health is per site id, shared across tests
    stop, task = await start(collector)
    publisher(*bms("RackLiquidFlow", "r1", 77.0))
    await wait_until(lambda: collector.health.counters["dropped"] - dropped_before == 1, 5, what="sink failure")
    stop.set()
    await task
    assert sink.readings == []
    collector2 = MqttCollector(site, sink, settings)  # same client id: same session
    stop2, task2 = await start(collector2)
    await wait_until(lambda: sink.readings, 5, what="redelivery")
    stop2.set()
    await task2
    assert sink.readings[0].points == {"rack.liquid_flow_lpm": 77.0}


async def test_collector_started_before_the_broker_connects_when_it_comes_up(tmp_path, caplog):
    import logging

    from podwatch import procs
    from podwatch.procs import free_port

    port = free_port()
    site = rack_site(1, [], sensors={"enabled": True}, site_id="t1",
                     mqtt={"url": f"mqtt://127.0.0.1:{port}", "client_id": f"c-{uuid.uuid4().hex[:8]}"})
    sink = MemorySink()
    collector = MqttCollector(site, sink, MqttCollectorSettings(reconnect_max_s=1.0))  # retry every second
    stop = asyncio.Event()
    with caplog.at_level(logging.WARNING, logger="podwatch.collectors.mqtt"):
        task = asyncio.create_task(collector.run(stop))
        try:
            await wait_until(lambda: any("Cannot reach the MQTT broker" in r.getMessage() for r in caplog.records), 5,
                             what="unreachable broker logged")
            with procs.mosquitto(port=port, workdir=tmp_path) as broker:
                await asyncio.wait_for(collector.connected.wait(), 10)
                pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
                pub.connect("127.0.0.1", broker.port)
                pub.loop_start()
                try:
                    topic, body = bms("RackLiquidFlow", "r1", 42.0)
                    pub.publish(topic, json.dumps(body), qos=1).wait_for_publish(5)
                    await wait_until(lambda: sink.readings, 5, what="reading after the broker came up")
                finally:
                    pub.loop_stop()
                    stop.set()
                    await task
        finally:
            stop.set()
    assert sink.readings[0].points == {"rack.liquid_flow_lpm": 42.0}


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_second_client_with_the_collectors_client_id_is_named_as_the_cause(mosquitto_broker, protocol, caplog):
    """Two collectors for one site (same default client id) throw each other off at every reconnect;
    after 3 sessions in a row closed within seconds of connecting, the collector names the likely cause once."""
    host, port = mosquitto_broker
    site = bms_site(mosquitto_broker, protocol)
    collector = MqttCollector(site, MemorySink())
    stop, task = await start(collector)
    rivals = []
    try:
        for _ in range(4):
            collector.connected.clear()
            rival = paho.Client(CallbackAPIVersion.VERSION2, client_id=site.spec.mqtt.client_id,
                                protocol=paho.MQTTv5 if protocol == "5" else paho.MQTTv311)
            rival.connect(host, port)
            rival.loop_start()
            rivals.append(rival)
            await wait_until(lambda: sum("connection lost" in r.getMessage() for r in caplog.records) >= len(rivals),
                             10, what="the collector to lose its session")
            rival.disconnect()
            rival.loop_stop()
            await asyncio.wait_for(collector.connected.wait(), 10)  # back, once the rival left
        hints = [r for r in caplog.records if "mqtt.client_id" in r.getMessage()]
        assert len(hints) == 1 and hints[0].fields["client_id"] == site.spec.mqtt.client_id
    finally:
        stop.set()
        await task
