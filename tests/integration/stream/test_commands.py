"""`podwatch broker` (a real process, stopped by SIGTERM), `podwatch topics create|list` and
`podwatch tail` against a real Tansu."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from podwatch import procs
from podwatch.cli import app
from podwatch.stream.topics import ALL_TOPICS, ensure_topics
from tests.integration.stream.helpers import reading

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
REPO = Path(__file__).resolve().parents[3]


async def _topic_names(bootstrap: str) -> set[str]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return await consumer.topics()
    finally:
        await consumer.stop()


def test_broker_command_serves_the_topics_and_stops_on_sigterm():
    port = procs.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "podwatch", "broker", "--port", str(port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"broker exited early: {''.join(lines)}"
            lines.append(line)
            if "bootstrap:" in line:
                break
        assert lines[-1].strip().endswith(f"bootstrap: 127.0.0.1:{port}")
        assert set(ALL_TOPICS) <= asyncio.run(_topic_names(f"127.0.0.1:{port}"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not procs.port_open("127.0.0.1", port)  # Tansu was stopped too
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_topics_create_and_list():
    # Its own broker: on the shared one another test's consumer may already have auto-created
    # podwatch.telemetry.v1 (Tansu auto-creates with 4 partitions), and this test checks creation.
    runner = CliRunner()
    with procs.tansu() as broker:
        first = runner.invoke(app, ["topics", "create", "--kafka", broker.address])
        assert first.exit_code == 0, first.output
        assert all(f"{t}: created" in first.output for t in ALL_TOPICS)
        again = runner.invoke(app, ["topics", "create", "--kafka", broker.address])
        assert again.exit_code == 0 and again.output.count(": exists") == 3
        listing = runner.invoke(app, ["topics", "list", "--kafka", broker.address])
    assert "podwatch.telemetry.v1\t6 partitions" in listing.output


def test_topics_create_against_nothing_is_a_clear_error():
    result = CliRunner().invoke(app, ["topics", "create", "--kafka", f"127.0.0.1:{procs.free_port()}"])
    assert result.exit_code != 0
    assert "cannot reach Kafka" in str(result.exception)


def test_tail_prints_envelopes_and_marks_invalid_ones(tansu_broker, tmp_path):
    topic = f"t.{uuid.uuid4().hex[:8]}.telemetry"

    async def produce() -> None:
        from aiokafka import AIOKafkaProducer

        await ensure_topics(tansu_broker, topics={topic: 1})
        producer = AIOKafkaProducer(bootstrap_servers=tansu_broker)
        await producer.start()
        try:
            from podwatch.stream.envelope import encode_reading

            for seq in range(3):
                await producer.send_and_wait(topic, encode_reading(reading("pdu-01", seq)), key=b"pdu-01")
            await producer.send_and_wait(topic, b'{"v": 2}', key=b"odd")
        finally:
            await producer.stop()

    asyncio.run(produce())
    result = CliRunner().invoke(app, ["tail", "--kafka", tansu_broker, "--topic", topic, "--count", "4", "--meta"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert [line["value"].get("seq") for line in lines[:3]] == [0, 1, 2]
    assert lines[0]["key"] == "pdu-01" and lines[0]["partition"] == 0
    assert "schema version 2 is newer" in lines[3]["value"]["invalid"]


def test_broker_refuses_a_busy_port():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["broker", "--port", str(port)])
    assert result.exit_code != 0
    assert "already in use" in str(result.exception)
