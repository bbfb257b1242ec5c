"""The sink's write pipeline against a real broker and file: batches commit in order with their
offsets, and a failed write stops the sink before any later batch is committed."""

from __future__ import annotations

import asyncio
import uuid

import polars as pl
import pytest

from podwatch.storage.db import Database
from podwatch.storage.sink import DuckDBSink, SinkSettings
from tests.conftest import wait_until
from tests.integration.storage.helpers import create_topics, envelope_bytes, produce, reading, sink_reaches

pytestmark = pytest.mark.integration

DEVICES = 10
READINGS_PER_DEVICE = 30
POINTS = 2


async def _topic_with_readings(bootstrap: str, partitions: int) -> tuple[str, str, int]:
    topic, dl_topic = f"t.pipe.{uuid.uuid4().hex[:8]}", f"t.pipe.dl.{uuid.uuid4().hex[:8]}"
    await create_topics(bootstrap, (topic, partitions), (dl_topic, 1))
    messages = [(r.device.encode(), envelope_bytes(r))
                for seq in range(READINGS_PER_DEVICE) for d in range(DEVICES) for r in [reading(d, seq, POINTS)]]
    await produce(bootstrap, topic, messages)
    return topic, dl_topic, len(messages)


def _committed(db: Database, topic: str) -> tuple[int, int]:
    """(rows stored, sum of the stored next offsets), read through a cursor of its own."""
    cur = db.cursor()
    try:
        rows = cur.execute("SELECT count(*) FROM sample_rows").fetchone()[0]
        offsets = cur.execute("SELECT coalesce(sum(next_offset), 0) FROM ingest_offsets WHERE topic = ?",
                              [topic]).fetchone()[0]
    finally:
        cur.close()
    return rows, int(offsets)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("decode_process", [True, False], ids=["fetch-process", "in-process"])
async def test_each_batch_commits_its_rows_with_its_offsets_in_order(tansu_broker, tmp_path, decode_process):
    topic, dl_topic, total = await _topic_with_readings(tansu_broker, partitions=3)
    db = Database(tmp_path / "pipe.duckdb")
    sink = DuckDBSink(db, SinkSettings(kafka=tansu_broker, topic=topic, dead_letter_topic=dl_topic, group_id=None,
                                       max_batch_messages=40, decode_process=decode_process))
    seen: list[pl.DataFrame] = []
    at_commit: list[tuple[int, int, int]] = []  # (rows listeners saw so far, rows stored, offsets stored)

    def listener(rows: pl.DataFrame) -> None:
        # Called after the batch's commit and before the next write starts: the file holds
        # exactly the batches seen so far, and the offsets that pass exactly their messages.
        seen.append(rows)
        at_commit.append((sum(b.height for b in seen), *_committed(db, topic)))

    sink.add_batch_listener(listener)
    await sink.start()
    task = asyncio.create_task(sink.run())
    try:
        await sink_reaches(task, lambda: sink.stats.readings == total and sink._pending_write is None,
                           "all readings committed")
    finally:
        await sink.stop()
        await task
    try:
        assert len(at_commit) >= total // 40, "expected many small batches"
        for listened_rows, stored_rows, stored_offsets in at_commit:
            assert stored_rows == listened_rows
            assert stored_offsets * POINTS == stored_rows  # no dedup drops here: one message = one reading
        assert at_commit[-1][1] == total * POINTS
        # batches reach listeners in commit order: per device, seqs only grow across batches
        listened = pl.concat([b.with_columns(pl.lit(i).alias("batch")) for i, b in enumerate(seen)])
        per_device = listened.group_by("device", maintain_order=True).agg(pl.col("ts"), pl.col("batch"))
        for ts, batch in zip(per_device["ts"], per_device["batch"]):
            assert list(ts) == sorted(ts) and list(batch) == sorted(batch)
        assert listened.height == total * POINTS
    finally:
        db.close()


@pytest.mark.timeout(60)
async def test_a_failed_write_stops_the_sink_and_no_later_batch_is_committed(tansu_broker, tmp_path):
    topic, dl_topic, total = await _topic_with_readings(tansu_broker, partitions=1)
    db_path = tmp_path / "fail.duckdb"
    db = Database(db_path)
    settings = SinkSettings(kafka=tansu_broker, topic=topic, dead_letter_topic=dl_topic, group_id=None,
                            max_batch_messages=20)
    sink = DuckDBSink(db, settings)
    listened: list[int] = []
    sink.add_batch_listener(lambda rows: listened.append(rows.height))
    writes = 0
    write_transaction = sink._write_transaction

    def third_write_fails(batch, keep, dedup_rows, next_offsets):
        nonlocal writes
        writes += 1
        if writes == 3:
            raise OSError("disk full (injected into the third write)")
        return write_transaction(batch, keep, dedup_rows, next_offsets)

    sink._write_transaction = third_write_fails
    await sink.start()
    task = asyncio.create_task(sink.run())
    try:
        with pytest.raises(OSError, match="disk full"):
            await asyncio.wait_for(task, 30)
    finally:
        await sink.stop()
    try:
        assert writes == 3  # nothing was written after the failure
        stored_rows, stored_offsets = _committed(db, topic)
        assert len(listened) == 2 and stored_rows == sum(listened) > 0
        assert stored_offsets * POINTS == stored_rows < total * POINTS
        assert sink.stats.batches == 2
    finally:
        db.close()

    # A restart on the same file resumes from the stored offsets: every reading exactly once.
    db = Database(db_path)
    try:
        sink = DuckDBSink(db, settings)
        await sink.start()
        task = asyncio.create_task(sink.run())
        try:
            await wait_until(lambda: _committed(db, topic)[1] == total or task.done(), timeout=30,
                             what="restarted sink caught up")
            if task.done():
                task.result()
        finally:
            await sink.stop()
            await task
        assert db.query("SELECT count(*), count(DISTINCT (device, seq)), sum(n_points) FROM readings") == [
            (total, total, total * POINTS)]
        assert db.query("SELECT count(*), count(DISTINCT (device, ts, metric)) FROM samples") == [
            (total * POINTS, total * POINTS)]
    finally:
        db.close()
