"""The sink's fetch process (`SinkSettings.decode_process`, the default) against a real broker
and file: a killed fetch process loses and duplicates nothing, a killed sink leaves no fetch
process behind, and consumer-group rebalances seek the fetch process to the stored offsets."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from podwatch.errors import PodwatchError
from podwatch.storage import fetch_process
from podwatch.storage.db import Database
from podwatch.storage.sink import DuckDBSink, SinkSettings
from tests.conftest import wait_until
from tests.integration.storage.helpers import (create_topics, envelope_bytes, produce, reading, readings_check,
                                               sink_reaches)

pytestmark = pytest.mark.integration

POINTS = 3


async def _topic(bootstrap: str, partitions: int, devices: int, readings_per_device: int,
                 retries: int = 0) -> tuple[str, str, list]:
    """A topic of `devices x readings_per_device` readings, plus `retries` re-sent ones."""
    topic, dl_topic = f"t.fp.{uuid.uuid4().hex[:8]}", f"t.fp.dl.{uuid.uuid4().hex[:8]}"
    await create_topics(bootstrap, (topic, partitions), (dl_topic, 1))
    messages = [(r.device.encode(), envelope_bytes(r))
                for seq in range(readings_per_device) for d in range(devices) for r in [reading(d, seq, POINTS)]]
    messages += messages[: retries * 7 : 7]  # a producer retrying without idempotence
    await produce(bootstrap, topic, messages)
    return topic, dl_topic, messages


def _assert_each_reading_once(db: Database, devices: int, readings_per_device: int) -> None:
    total = devices * readings_per_device
    assert readings_check(db) == {"readings": total, "distinct_device_seq": total, "readings_with_wrong_points": 0,
                                  "orphan_point_groups": 0, "points": total * POINTS}
    expected = {(f"pdu-{d:03d}", s) for d in range(devices) for s in range(readings_per_device)}
    assert set(db.query("SELECT device, seq FROM readings")) == expected


def _stored_offsets_total(db: Database, topic: str) -> int:
    cur = db.cursor()
    try:
        return int(cur.execute("SELECT coalesce(sum(next_offset), 0) FROM ingest_offsets WHERE topic = ?",
                               [topic]).fetchone()[0])
    finally:
        cur.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_killed_fetch_process_is_restarted_and_nothing_is_lost_or_duplicated(tansu_broker, tmp_path):
    devices, per_device = 40, 60
    topic, dl_topic, messages = await _topic(tansu_broker, 3, devices, per_device, retries=150)
    db = Database(tmp_path / "kill-child.duckdb")
    # Small batches: many frames cross the pipe, so the kills land between and inside them.
    sink = DuckDBSink(db, SinkSettings(kafka=tansu_broker, topic=topic, dead_letter_topic=dl_topic, group_id=None,
                                       max_batch_messages=20))
    await sink.start()
    task = asyncio.create_task(sink.run())
    try:
        killed = []
        committed_at_kill = []
        for kill in range(3):
            pid = sink._fetch_process.pid
            progress = sink.stats.messages
            await wait_until(lambda: sink.stats.messages > progress or task.done(), timeout=20,
                             what="ingest progress before the kill")
            assert not task.done()
            committed_at_kill.append(_stored_offsets_total(db, topic))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            await wait_until(lambda: sink.stats.fetch_restarts == kill + 1 or task.done(), timeout=20,
                             what="fetch process restarted")
            assert not task.done()
            assert sink._fetch_process.pid not in killed
        # the first kill lands mid-ingest (later ones may come after the last batch: the sink is fast)
        assert committed_at_kill[0] < len(messages)
        await sink_reaches(task, lambda: _stored_offsets_total(db, topic) == len(messages)
                           and sink._pending_write is None, "all messages committed", timeout=40)
    finally:
        await sink.stop()
        await task
    try:
        _assert_each_reading_once(db, devices, per_device)
        assert sink.stats.duplicates >= 150  # the retries, and whatever was re-read after a kill
        assert not any(_alive(pid) for pid in killed)
    finally:
        db.close()


@pytest.mark.timeout(60)
async def test_a_fetch_process_that_keeps_dying_stops_the_sink_loudly(tansu_broker, tmp_path, monkeypatch):
    topic, dl_topic, _ = await _topic(tansu_broker, 1, 5, 10)
    monkeypatch.setattr(fetch_process, "RESTARTS_ALLOWED", 0)
    db = Database(tmp_path / "dying.duckdb")
    sink = DuckDBSink(db, SinkSettings(kafka=tansu_broker, topic=topic, dead_letter_topic=dl_topic, group_id=None))
    await sink.start()
    task = asyncio.create_task(sink.run())
    try:
        os.kill(sink._fetch_process.pid, signal.SIGKILL)
        with pytest.raises(PodwatchError, match="fetch process died 1 times"):
            await asyncio.wait_for(task, 20)
        assert "sink is not running" in sink.health_problems()
    finally:
        await sink.stop()
        db.close()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task_dir in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = {int(c) for c in (task_dir / "children").read_text().split()}
            except OSError:
                continue
            todo.extend(children - found)
            found |= children
    return found


@pytest.mark.timeout(60)
async def test_a_killed_sink_leaves_no_fetch_process_behind(tansu_broker, tmp_path):
    topic, dl_topic, _ = await _topic(tansu_broker, 2, 5, 10)
    log_path = tmp_path / "sink.log"
    argv = [sys.executable, "-m", "podwatch.storage.sink", "--kafka", tansu_broker, "--db", str(tmp_path / "k.duckdb"),
            "--topic", topic, "--dead-letter-topic", dl_topic, "--group", "none"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[3],
                                start_new_session=True)
    try:
        await wait_until(lambda: b"DuckDB sink started" in log_path.read_bytes() or proc.poll() is not None,
                         timeout=30, what="sink subprocess start")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        fetch_pid = int(re.search(rb"DuckDB sink started.*fetch_pid=(\d+)", log_path.read_bytes()).group(1))
        family = _descendants(proc.pid)
        assert fetch_pid in family and _alive(fetch_pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        await wait_until(lambda: not any(_alive(pid) for pid in family), timeout=15,
                         what=f"the sink's child processes {sorted(family)} to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_rebalances_seek_the_fetch_process_to_the_stored_offsets(tansu_broker, tmp_path):
    """A second group member takes partitions away and gives them back: each assignment the
    fetch process gets is answered with the offsets in DuckDB (after the batches before it are
    committed), so every reading is stored once though the other member read them too."""
    devices, per_device, partitions = 12, 40, 4
    topic, dl_topic, messages = await _topic(tansu_broker, partitions, devices, per_device)
    group = f"g-{uuid.uuid4().hex[:6]}"
    db = Database(tmp_path / "rebalance.duckdb")
    sink = DuckDBSink(db, SinkSettings(kafka=tansu_broker, topic=topic, dead_letter_topic=dl_topic, group_id=group,
                                       session_timeout_ms=6000, max_batch_messages=10))
    assignments: list[tuple[list[int], dict[int, int]]] = []
    on_assigned = sink._on_assigned

    async def recording(assigned: list[int]) -> dict[int, int]:
        stored = await on_assigned(assigned)
        assignments.append((sorted(assigned), stored))
        return stored

    sink._on_assigned = recording
    await sink.start()
    task = asyncio.create_task(sink.run())
    other = AIOKafkaConsumer(topic, bootstrap_servers=tansu_broker, group_id=group, enable_auto_commit=False,
                             auto_offset_reset="earliest", session_timeout_ms=6000, heartbeat_interval_ms=1000)
    try:
        await wait_until(lambda: assignments and len(assignments[-1][0]) == partitions or task.done(), timeout=30,
                         what="the sink owns every partition")
        await other.start()
        await wait_until(lambda: other.assignment() or task.done(), timeout=30, what="the other member got partitions")
        await other.getmany(timeout_ms=500)  # it reads some messages (and commits nothing)
        await wait_until(lambda: 0 < len(assignments[-1][0]) < partitions or task.done(), timeout=30,
                         what="the sink's share after the rebalance")
        await other.stop()
        await wait_until(lambda: len(assignments[-1][0]) == partitions and len(assignments) >= 3 or task.done(),
                         timeout=30, what="the sink owns every partition again")
        await sink_reaches(task, lambda: _stored_offsets_total(db, topic) == len(messages)
                           and sink._pending_write is None, "all messages committed")
    finally:
        await other.stop()
        await sink.stop()
        await task
    try:
        _assert_each_reading_once(db, devices, per_device)
        assert [len(assigned) for assigned, _ in assignments][:1] == [partitions]
        assert any(0 < len(assigned) < partitions for assigned, _ in assignments)
        # the later assignments were answered with positions stored by the earlier ones
        assert any(stored for _, stored in assignments[1:])
        assert sink.stats.readings == devices * per_device
    finally:
        db.close()


@pytest.mark.timeout(60)
async def test_a_sink_stopped_while_its_group_is_joining_stops_its_fetch_process_cleanly(tansu_broker, tmp_path):
    """The rebalance after a join asks the writer for positions; a stopping writer no longer
    answers, so the fetch process must not wait for it (it did, until it was killed)."""
    topic, dl_topic, _ = await _topic(tansu_broker, 2, 3, 5)
    db = Database(tmp_path / "join.duckdb")
    sink = DuckDBSink(db, SinkSettings(kafka=tansu_broker, topic=topic, dead_letter_topic=dl_topic,
                                       group_id=f"g-{uuid.uuid4().hex[:6]}", session_timeout_ms=6000))
    try:
        await sink.start()
        task = asyncio.create_task(sink.run())
        process = sink._fetch_process.process
        await sink.stop()  # the group join (~3-5 s on Tansu) is still under way
        await task
        assert process.exitcode == 0  # it stopped by itself, it was not killed after the grace period
        assert not _alive(process.pid)
    finally:
        db.close()
