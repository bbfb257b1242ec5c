"""The producer against a real Tansu broker: schema-valid messages, an independent client
(confluent-kafka / librdkafka) reads them back, start with Kafka down, drops are counted."""

from __future__ import annotations

import asyncio
import logging
import time

import jsonschema
import orjson
import pytest

from podwatch import procs
from podwatch.errors import PodwatchError
from podwatch.health import REGISTRY, STANDARD_COUNTERS
from podwatch.stream.envelope import decode_envelope, load_schema
from podwatch.stream.producer import TelemetryProducer
from podwatch.stream.spool import Spool
from podwatch.stream.topics import ensure_topics
from tests.conftest import wait_until
from tests.integration.stream.helpers import fast_settings, read_all, reading

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def producer(bootstrap, tmp_path, topics, instance, **settings) -> TelemetryProducer:
    return TelemetryProducer(fast_settings(bootstrap, **settings), tmp_path / "spool", "test",
                             health_instance=instance, telemetry_topic=topics["telemetry"],
                             alerts_topic=topics["alerts"], deadletter_topic=topics["deadletter"])


ALERT = {"alert_id": "3f1c", "rule": "cdu_supply_temp_high", "target": "cdu-m1-01", "state": "firing",
         "previous_state": "pending", "severity": "critical", "labels": {"site": "test"},
         "annotations": {"summary": "hot"}, "value": 41.2, "reasons": ["supply 41.2 C > 40 C"],
         "flapping": False, "startsAt": "2026-11-22T03:00:00+00:00", "endsAt": None,
         "firedAt": "2026-11-22T03:02:00+00:00", "ts": "2026-11-22T03:02:00+00:00"}


async def test_produced_messages_validate_against_the_json_schemas(tansu_broker, topics, tmp_path):
    readings = [reading("pdu-01", 1), reading("cdu-01", 7, **{"cdu.flow_lpm": 120.5, "cdu.supply_temp_c": None}),
                reading("meter-01", 3, **{"meter.l1.voltage_v": float("nan")})]
    readings[1].point_quality = {"cdu.supply_temp_c": "bad"}
    async with producer(tansu_broker, tmp_path, topics, "schema") as p:
        assert p.mode == "direct"
        assert await p.send_many(readings) == 3
        assert await p.send_alert_event(ALERT)
        assert await p.send_dead_letter(b"\xffnot json" * 10_000, "payload is not JSON", "mqtt_collector",
                                        topic="podwatch/test/telemetry/cdu-01", device="cdu-01")
    telemetry = await read_all(tansu_broker, topics["telemetry"], 3)
    alerts = await read_all(tansu_broker, topics["alerts"], 1)
    letters = await read_all(tansu_broker, topics["deadletter"], 1)
    assert (len(telemetry), len(alerts), len(letters)) == (3, 1, 1)
    for kind, records in (("telemetry", telemetry), ("alert", alerts), ("deadletter", letters)):
        validator = jsonschema.Draft202012Validator(load_schema(kind), format_checker=jsonschema.FormatChecker())
        for record in records:
            validator.validate(orjson.loads(record.value))
    by_device = {r.key.decode(): decode_envelope(r.value) for r in telemetry}
    assert by_device["cdu-01"]["points"] == {"cdu.flow_lpm": 120.5, "cdu.supply_temp_c": None}
    assert by_device["cdu-01"]["pq"] == {"cdu.supply_temp_c": "bad"}
    assert by_device["meter-01"]["points"] == {"meter.l1.voltage_v": None}  # NaN never reaches the wire
    assert alerts[0].key == b"3f1c"
    letter = orjson.loads(letters[0].value)
    assert letter["payload_truncated"] is True and letter["payload_bytes"] == 90_000
    assert letter["meta"] == {"device": "cdu-01", "site": "test"}
    health = REGISTRY.component("kafka_producer", "schema").snapshot()
    assert set(STANDARD_COUNTERS) <= set(health) and {"spool_records", "spool_bytes", "spooling"} <= set(health)
    assert (health["received"], health["sent"], health["spooled"], health["dropped"]) == (5, 5, 0, 0)


async def test_confluent_kafka_reads_what_podwatch_produced(tansu_broker, topics, tmp_path):
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    devices = [f"pdu-{i:02d}" for i in range(8)]
    async with producer(tansu_broker, tmp_path, topics, "librdkafka", compression_type="lz4") as p:
        sent = await asyncio.gather(*(p.send(reading(d, seq)) for seq in range(1, 41) for d in devices))
    assert all(sent)

    def consume_all() -> list:
        consumer = Consumer({"bootstrap.servers": tansu_broker, "group.id": "podwatch-test-librdkafka",
                             "enable.auto.commit": False})
        try:
            consumer.assign([TopicPartition(topics["telemetry"], p, OFFSET_BEGINNING) for p in range(6)])
            messages = []
            end = time.monotonic() + 20
            while len(messages) < len(devices) * 40 and time.monotonic() < end:
                msg = consumer.poll(0.2)
                if msg is not None and msg.error() is None:
                    messages.append((msg.key(), msg.value(), msg.partition()))
            return messages
        finally:
            consumer.close()

    messages = await asyncio.to_thread(consume_all)
    assert len(messages) == len(devices) * 40
    partitions: dict[str, set[int]] = {}
    seqs: dict[str, list[int]] = {}
    for key, value, partition in messages:
        env = decode_envelope(value)
        assert key.decode() == env["device"]  # key = device id
        partitions.setdefault(env["device"], set()).add(partition)
        seqs.setdefault(env["device"], []).append(env["seq"])
    assert all(len(p) == 1 for p in partitions.values())  # one partition per device
    assert seqs == {d: list(range(1, 41)) for d in devices}  # complete and in order per device


async def test_starts_with_kafka_down_spools_and_drains_when_it_appears(tmp_path):
    port = procs.free_port()
    bootstrap = f"127.0.0.1:{port}"
    topics = {"telemetry": "late.telemetry", "alerts": "late.alerts", "deadletter": "late.deadletter"}
    p = producer(bootstrap, tmp_path, topics, "late-broker")
    await asyncio.wait_for(p.start(), 10)  # must not fail: collectors start and spool
    try:
        assert p.mode == "spool"
        assert all([await p.send(reading("cdu-01", seq)) for seq in range(50)])
        health = REGISTRY.component("kafka_producer", "late-broker")
        assert health.counters["spooled"] == 50 and health.gauges["spool_records"] == 50
        with procs.tansu(port=port):
            await ensure_topics(bootstrap, topics={topics["telemetry"]: 6, topics["alerts"]: 1, topics["deadletter"]: 1})
            await wait_until(lambda: p.spool_records == 0, timeout=20, what="spool drained")
            await wait_until(lambda: p.mode == "direct", timeout=5, what="direct mode")
            assert await p.send(reading("cdu-01", 50))
            records = await read_all(bootstrap, topics["telemetry"], 51)
            assert [decode_envelope(r.value)["seq"] for r in records] == list(range(51))
            assert health.counters["sent"] == 51 and health.counters["retries"] >= 1
            await p.stop()
    finally:
        await p.stop()


async def test_spool_overflow_and_oversized_records_are_counted_drops(tansu_broker, topics, tmp_path):
    bootstrap = f"127.0.0.1:{procs.free_port()}"  # nothing listens: everything goes to the spool
    p = producer(bootstrap, tmp_path, topics, "overflow", spool_max_bytes=4096, spool_segment_bytes=1024)
    async with p:
        results = [await p.send(reading("pdu-01", seq)) for seq in range(60)]
    health = REGISTRY.component("kafka_producer", "overflow")
    accepted = results.count(True)
    assert 0 < accepted < 60 and results == [True] * accepted + [False] * (60 - accepted)
    assert health.counters["dropped"] == 60 - accepted and health.counters["spooled"] == accepted
    with Spool(tmp_path / "spool") as left:  # stop() left the unacked records on disk for the next start
        assert left.pending_records == accepted

    big = producer(tansu_broker, tmp_path / "big", topics, "oversize", max_request_size=2000)
    async with big:
        huge = reading("pdu-02", 1, **{f"pdu.outlet{i}.power_kw": float(i) for i in range(200)})
        assert await big.send(huge) is False  # permanent: never retried, never spooled
        assert await big.send(reading("pdu-02", 2))
        assert big.spool_records == 0
    health = REGISTRY.component("kafka_producer", "oversize")
    assert (health.counters["dropped"], health.counters["sent"], health.counters["spooled"]) == (1, 1, 0)


async def test_submit_hands_over_without_waiting_and_resolves_once_durable(topics, tmp_path):
    """submit() returns a future at once (the Modbus collector keeps polling meanwhile); in spool
    mode one fsync resolves every future appended before it; stop() resolves the rest; order holds."""
    bootstrap = f"127.0.0.1:{procs.free_port()}"  # nothing listens: everything goes to the spool
    p = producer(bootstrap, tmp_path, topics, "submit")
    async with p:
        futures = [p.submit(reading("pdu-01", seq)) for seq in range(30)]
        assert not any(f.done() for f in futures)  # handed over, not yet fsynced
        assert await asyncio.gather(*futures) == [1] * 30
        late = [p.submit(reading("pdu-01", seq)) for seq in range(30, 35)]
    assert [f.result() for f in late] == [1] * 5  # stop() waited for their fsync
    with pytest.raises(PodwatchError, match="not running"):
        p.submit(reading("pdu-01", 35))
    with Spool(tmp_path / "spool") as left:
        batch = left.read_batch()
        assert [decode_envelope(r.value)["seq"] for r in batch.records] == list(range(35))


async def test_stop_is_idempotent_and_send_after_stop_is_refused(tansu_broker, topics, tmp_path, caplog):
    p = producer(tansu_broker, tmp_path, topics, "lifecycle", health_log_interval_s=0.05)
    caplog.set_level(logging.INFO, logger="podwatch.stream.producer")
    await p.start()
    assert await p.send(reading("pdu-01", 1))
    await wait_until(lambda: any(r.getMessage() == "Kafka producer health" and r.fields["sent"] == 1
                                 for r in caplog.records), timeout=5, what="a periodic health log line")
    await asyncio.gather(p.stop(), p.stop())
    await p.stop()
    with pytest.raises(PodwatchError, match="not running"):
        await p.send(reading("pdu-01", 2))


async def test_concurrent_sends_of_one_device_keep_their_order(tansu_broker, topics, tmp_path):
    """Many concurrent send()/send_many() calls for the same devices while batches fill up
    (small max_batch_size makes aiokafka wait for drains mid-group): order per device holds."""
    devices = ["pdu-01", "pdu-02"]
    seq = 0

    async def sender(p: TelemetryProducer, turns: int) -> int:
        nonlocal seq
        for _ in range(turns):  # start in a later event-loop turn: a separate group in flight
            await asyncio.sleep(0)
        group = [reading(d, seq + i) for i in range(5) for d in devices]
        seq += 5  # seqs are assigned in submission order
        return await p.send_many(group)

    async with producer(tansu_broker, tmp_path, topics, "concurrent", max_batch_size=2048, linger_ms=0) as p:
        for _ in range(5):
            results = await asyncio.gather(*(sender(p, turns) for turns in range(40)))
            assert sum(results) == 40 * 5 * len(devices)
    records = await read_all(tansu_broker, topics["telemetry"], seq * len(devices))
    got: dict[str, list[int]] = {d: [] for d in devices}
    for record in records:
        env = decode_envelope(record.value)
        got[env["device"]].append(env["seq"])
    assert got == {d: list(range(seq)) for d in devices}
