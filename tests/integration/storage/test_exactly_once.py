"""Exactly once: SIGKILL the sink process at random points, restart it, and check that every
(device, seq) is stored exactly once in `readings`, with all its points in `samples` exactly
once, and nothing is missing."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from podwatch.storage.db import Database
from podwatch.storage.sink import DuckDBSink, SinkSettings
from tests.conftest import wait_until
from tests.integration.storage.helpers import create_topics, envelope_bytes, produce, reading, readings_check

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICES = 40
READINGS_PER_DEVICE = 100
POINTS = 5
PARTITIONS = 3
KILLS = 4


def _spawn_sink(bootstrap: str, db: Path, topic: str, dl_topic: str, log_path: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "podwatch.storage.sink", "--kafka", bootstrap, "--db", str(db), "--topic", topic,
            "--dead-letter-topic", dl_topic, "--group", "none", "--max-batch", "25"]
    log = open(log_path, "ab")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[3],
                            start_new_session=True)


@pytest.mark.timeout(90)
async def test_sigkill_at_random_points_neither_loses_nor_duplicates(tansu_broker, tmp_path):
    topic, dl_topic = f"t.eo.{uuid.uuid4().hex[:8]}", f"t.eo.dl.{uuid.uuid4().hex[:8]}"
    await create_topics(tansu_broker, (topic, PARTITIONS), (dl_topic, 1))
    rng = random.Random(4)
    messages = []
    for seq in range(READINGS_PER_DEVICE):
        for device in range(DEVICES):
            r = reading(device, seq, POINTS)
            messages.append((r.device.encode(), envelope_bytes(r)))
    # Producer retries without idempotence: the same reading again, later in the topic.
    duplicates = rng.sample(messages, 400)
    for dup in duplicates:
        messages.insert(rng.randrange(messages.index(dup) + 1, len(messages) + 1), dup)
    await produce(tansu_broker, topic, messages)

    db_path = tmp_path / "eo.duckdb"
    log_path = tmp_path / "sink.log"
    total = DEVICES * READINGS_PER_DEVICE * POINTS
    kills, mid_ingest_kills, stored = 0, 0, 0
    # Kill at random instants until at least KILLS kills landed mid-ingest (some rows stored, not all).
    # The delay range grows per attempt so that a loaded machine (slow start, slow first batch) still
    # gets kills after the first commits; progress is read between runs, when no process holds the file.
    for attempt in range(KILLS * 6):
        proc = _spawn_sink(tansu_broker, db_path, topic, dl_topic, log_path)
        try:
            await wait_until(lambda: b"DuckDB sink started" in log_path.read_bytes().split(b"--- run")[-1]
                             or proc.poll() is not None, timeout=30, what="sink subprocess start")
            assert proc.poll() is None, log_path.read_text()[-3000:]
            # The kill instant is the random variable of this test (not a synchronisation).
            try:
                proc.wait(timeout=rng.uniform(0.05, 0.6) + 0.25 * attempt)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        with open(log_path, "ab") as f:
            f.write(f"\n--- run {attempt + 1}\n".encode())
        if db_path.exists():
            check = Database(db_path)
            try:
                stored = check.query("SELECT count(*) FROM samples")[0][0]
            finally:
                check.close()
        if 0 < stored < total:
            mid_ingest_kills += 1
        if mid_ingest_kills >= KILLS or stored >= total:
            break
    assert mid_ingest_kills >= 2, f"only {mid_ingest_kills} kill(s) landed mid-ingest ({kills} kills); make the topic bigger"

    # Final run in-process, as a consumer-group member: drain everything, then check.
    db = Database(db_path)
    try:
        stored_before = db.query("SELECT count(*) FROM samples")[0][0]
        assert 0 < stored_before <= total
        sink = DuckDBSink(db, SinkSettings(kafka=tansu_broker, topic=topic, dead_letter_topic=dl_topic,
                                           group_id=f"g-{uuid.uuid4().hex[:6]}", session_timeout_ms=6000))
        await sink.start()
        task = asyncio.create_task(sink.run())
        try:
            await wait_until(lambda: len(sink.stats.lag) == PARTITIONS and sink.stats.total_lag == 0
                             and sink._pending_write is None, timeout=40, what="sink caught up")
        finally:
            await sink.stop()
            await task
        # every (device, seq) once in `readings`, each reading's points all present exactly once
        assert readings_check(db) == {
            "readings": DEVICES * READINGS_PER_DEVICE, "distinct_device_seq": DEVICES * READINGS_PER_DEVICE,
            "readings_with_wrong_points": 0, "orphan_point_groups": 0,
            "points": DEVICES * READINGS_PER_DEVICE * POINTS}
        assert db.query("SELECT count(DISTINCT (device, ts, metric)) FROM samples")[0][0] == total
        expected = {(f"pdu-{d:03d}", s) for d in range(DEVICES) for s in range(READINGS_PER_DEVICE)}
        assert set(db.query("SELECT device, seq FROM readings")) == expected
        # offsets stored match the end of each partition
        stored = dict(db.query('SELECT "partition", next_offset FROM ingest_offsets WHERE topic = ?', [topic]))
        assert sum(stored.values()) == len(messages)
        assert db.query("SELECT count(*) FROM samples WHERE value IS NULL")[0][0] == 0
    finally:
        db.close()
