"""Sites sharing one Kafka cluster: `collect --topic` and `serve --topic` keep each site's readings
on its own topic and in its own file."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from podwatch.collectors.commands import _ensure_topics, _make_producer
from podwatch.samples import Reading
from tests.conftest import wait_until
from tests.integration.storage.helpers import serve_answers

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PODWATCH = str(Path(sys.executable).parent / "podwatch")


@pytest.mark.timeout(90)
async def test_collect_and_serve_on_a_site_topic(tansu_broker, tmp_path, free_port):
    topic = f"podwatch.telemetry.v1.edge-{uuid.uuid4().hex[:6]}"
    await _ensure_topics(tansu_broker, topic)
    producer = _make_producer(tansu_broker, "edge5", tmp_path / "spool", topic)
    assert producer.telemetry_topic == topic
    await producer.start()
    try:
        readings = [Reading(site="edge5", device=f"pdu-{d}", seq=s, ts_ms=1_764_000_000_000 + s * 1000,
                            points={"pdu.power_kw": 50.0 + s, "pdu.l1.current_a": 70.0}) for d in range(3) for s in range(10)]
        assert await producer.send_many(readings) == len(readings)
    finally:
        await producer.stop()

    db = tmp_path / "edge5.duckdb"
    proc = await asyncio.create_subprocess_exec(
        PODWATCH, "serve", "--db", str(db), "--kafka", tansu_broker, "--topic", topic, "--port", str(free_port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env={**os.environ})
    try:
        async def all_points_stored(client: httpx.AsyncClient) -> bool:
            pipeline = (await client.get("/api/pipeline")).json()
            return sum(p.get("points_total", 0) for p in pipeline) == 60

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{free_port}", timeout=5) as client:
            await wait_until(serve_answers(proc, client, all_points_stored), timeout=60,
                             what="serve --topic stored the site's 60 points")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        assert con.execute("SELECT count(*), count(DISTINCT device) FROM samples").fetchone() == (60, 3)
        assert con.execute("SELECT value FROM podwatch_meta WHERE key = 'site'").fetchone() == ("edge5",)
    finally:
        con.close()
