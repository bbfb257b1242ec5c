"""The whole collect path on the demo site: the simulator (Modbus TCP servers + MQTT BMS
publisher) -> collectors -> the stream stage's TelemetryProducer -> a real Tansu broker.
Every device of the site arrives in Kafka with schema-valid envelopes and consecutive sequence
numbers; then the same through the `podwatch collect` CLI process, stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import jsonschema
import pytest

from podwatch.collectors.runner import CollectorRunner
from podwatch.procs import free_port, port_open
from podwatch.samples import Quality
from podwatch.site import MqttSettings, load_site
from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "sites" / "demo.yaml"


def free_offset(site_file: Path) -> int:
    """A port offset that puts every gateway of the site on a free loopback port."""
    base = load_site(site_file)
    ports = sorted({g.port for g in base.spec.gateways})
    for _ in range(50):
        offset = free_port() - ports[0]
        if all(1024 < p + offset < 65536 and not port_open("127.0.0.1", p + offset) for p in ports):
            return offset
    raise RuntimeError("no free port range")


async def consume(bootstrap: str, topic: str, until, timeout_s: float = 30.0) -> list[dict]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    messages: list[dict] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not until(messages):
            assert asyncio.get_running_loop().time() < deadline, f"only {len(messages)} messages in {topic}"
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for rec in records:
                    env = json.loads(rec.value)
                    assert rec.key.decode() == env["device"]  # keyed by device: order per device
                    messages.append(env)
    finally:
        await consumer.stop()
    return messages


def check_messages(messages: list[dict], device_ids: set[str]) -> None:
    from podwatch.stream.envelope import load_schema

    schema = load_schema("telemetry")
    by_device = defaultdict(list)
    for env in messages:
        jsonschema.validate(env, schema)
        by_device[env["device"]].append(env)
    assert set(by_device) == device_ids
    for device, envs in by_device.items():
        seqs = [e["seq"] for e in envs]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{device}: sequence gap or reorder"
        assert any(e["quality"] == Quality.GOOD for e in envs)


async def make_topics(tansu: str) -> tuple[str, str]:
    from podwatch.stream.topics import ensure_topics

    telemetry, deadletter = f"test.telemetry.{uuid.uuid4().hex[:8]}", f"test.dl.{uuid.uuid4().hex[:8]}"
    await ensure_topics(tansu, topics={telemetry: 3, deadletter: 1})
    return telemetry, deadletter


async def test_demo_site_from_simulator_into_kafka(tansu_broker, mosquitto_broker, tmp_path):
    from podwatch.simulators.engine import Simulator
    from podwatch.stream.config import KafkaSettings
    from podwatch.stream.producer import TelemetryProducer

    site = load_site(DEMO, port_offset=free_offset(DEMO))
    mqtt_url = f"mqtt://{mosquitto_broker[0]}:{mosquitto_broker[1]}"
    telemetry, deadletter = await make_topics(tansu_broker)
    sim = Simulator(site, mqtt_url=mqtt_url)
    await sim.start()
    producer = TelemetryProducer(KafkaSettings(bootstrap_servers=tansu_broker), tmp_path / "spool", site=site.id,
                                 telemetry_topic=telemetry, deadletter_topic=deadletter)
    await producer.start()
    mqtt = MqttSettings(url=mqtt_url, client_id=f"collect-{uuid.uuid4().hex[:8]}")
    runner = CollectorRunner(site, producer, mqtt_settings=mqtt)
    # health records are per site id and process-wide: compare with the values before this run
    before = {name: dict(c.health.counters) for name, c in (("modbus", runner.modbus), ("mqtt", runner.mqtt))}
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    device_ids = {d.id for d in site.devices if d.enabled}

    def delta(collector: str, counter: str) -> int:
        return getattr(runner, collector).health.counters[counter] - before[collector][counter]
    try:
        await wait_until(lambda: delta("modbus", "sent") >= 3 * len(runner.modbus.devices), 20,
                         what="three polls per Modbus device")
        await wait_until(lambda: delta("mqtt", "sent") >= 2 * len(runner.mqtt.devices), 20,
                         what="two BMS readings per rack")
    finally:
        stop.set()
        await task
        await producer.stop()
        await sim.stop()
    assert delta("modbus", "errors") == 0 and delta("mqtt", "errors") == 0
    sent = delta("modbus", "sent") + delta("mqtt", "sent")
    messages = await consume(tansu_broker, telemetry, lambda m: {e["device"] for e in m} >= device_ids and len(m) >= sent)
    assert len(messages) == sent  # every reading the collectors handed over is in Kafka, once
    check_messages(messages, device_ids)
    pdu = next(e for e in messages if e["device"] == "pdu-m1-r01-a" and e["quality"] == "good")
    assert 0 < pdu["points"]["pdu.power_kw"] < 132 and 200 < pdu["points"]["pdu.l1.voltage_v"] < 280
    profile_points = 7  # nvidia-bms-rack
    complete = [e for e in messages if e["device"] == "bms-m1-r01" and len(e["points"]) == profile_points]
    assert complete, "no BMS reading carried all points of its batch"
    assert 15 < complete[0]["points"]["rack.liquid_supply_temp_c"] < 60


async def test_collect_cli_runs_into_kafka_and_stops_cleanly_on_sigterm(tansu_broker, tmp_path):
    """`podwatch collect` as a user runs it (Modbus only, topics are the real podwatch names)."""
    from podwatch.simulators.engine import Simulator
    from podwatch.stream.topics import TELEMETRY_TOPIC

    offset = free_offset(DEMO)
    site = load_site(DEMO, port_offset=offset)
    sim = Simulator(site)
    await sim.start()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "podwatch", "collect", "--site", str(DEMO), "--kafka", tansu_broker,
                             "--no-mqtt", "--port-offset", str(offset), "--spool-dir", str(tmp_path / "spool"),
                             "--health-interval", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    modbus_ids = {d.id for d in site.devices if d.protocol != "mqtt"}
    try:
        await consume(tansu_broker, TELEMETRY_TOPIC, lambda m: {e["device"] for e in m if e["site"] == site.id} >= modbus_ids,
                      timeout_s=40)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        await sim.stop()
    assert proc.returncode == 0, err[-2000:]
    assert "Collector health" in err and "Flushing the producer" in err
