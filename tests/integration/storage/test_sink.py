"""The sink against a real broker: dead letters, listeners, a recreated topic, rollups."""

from __future__ import annotations

import asyncio
import base64
import uuid

import orjson
import polars as pl
import pytest

from podwatch.storage.db import Database
from podwatch.storage.sink import DuckDBSink, SinkSettings
from tests.conftest import wait_until
from tests.integration.storage.helpers import create_topics, envelope_bytes, produce, read_all, reading, readings_check

pytestmark = pytest.mark.integration


def _settings(bootstrap: str, topic: str, dl_topic: str, **kw) -> SinkSettings:
    return SinkSettings(kafka=bootstrap, topic=topic, dead_letter_topic=dl_topic, group_id=None, **kw)


async def _run_until(sink: DuckDBSink, predicate, what: str, timeout: float = 20) -> None:
    task = asyncio.create_task(sink.run())
    try:
        await wait_until(lambda: predicate() or task.done(), timeout=timeout, what=what)
        if task.done():
            task.result()
    finally:
        await sink.stop()
        await task


@pytest.mark.timeout(60)
@pytest.mark.parametrize("decode_process", [True, False], ids=["fetch-process", "in-process"])
async def test_undecodable_messages_go_to_dead_letters_and_ingest_continues(tansu_broker, tmp_path, decode_process):
    topic, dl_topic = f"t.dl.{uuid.uuid4().hex[:8]}", f"t.dl.out.{uuid.uuid4().hex[:8]}"
    await create_topics(tansu_broker, (topic, 1), (dl_topic, 1))
    good = [envelope_bytes(reading(1, seq)) for seq in range(10)]
    future_env = reading(1, 100).to_envelope() | {"v": 2}
    old_env = reading(1, 101).to_envelope() | {"v": 0}
    bad_value = reading(1, 102).to_envelope()
    bad_value["points"]["pdu.l1.power_kw"] = "high"
    bad = {
        b"\x00\xff\x13garbage": "not valid JSON",
        good[0][: len(good[0]) // 2]: "not valid JSON",  # truncated
        orjson.dumps(future_env): "schema version 2 is newer",
        orjson.dumps(old_env): "unsupported schema version 0",
        orjson.dumps(bad_value): "point 'pdu.l1.power_kw' has value 'high'",
        orjson.dumps([1, 2]): "must be a JSON object",
        orjson.dumps(reading(1, 103).to_envelope() | {"seq": -1}): "field 'seq'",
    }
    messages = [(b"pdu-001", v) for v in good[:5]] + [(b"x", v) for v in bad] + [(b"pdu-001", v) for v in good[5:]]
    await produce(tansu_broker, topic, messages)

    db = Database(tmp_path / "dl.duckdb")
    seen_batches: list[pl.DataFrame] = []
    sink = DuckDBSink(db, _settings(tansu_broker, topic, dl_topic, decode_process=decode_process))
    sink.add_batch_listener(seen_batches.append)
    await sink.start()
    await _run_until(sink, lambda: sink.stats.messages == len(messages) and sink.stats.batches > 0
                     and sink._pending_write is None, "all messages handled")
    try:
        assert db.query("SELECT count(DISTINCT seq), sum(n_points) FROM readings") == [(10, 50)]
        assert readings_check(db) == {"readings": 10, "distinct_device_seq": 10, "readings_with_wrong_points": 0,
                                      "orphan_point_groups": 0, "points": 50}
        assert sink.stats.dead_letters == len(bad)
        letters = [orjson.loads(r.value) for r in await read_all(tansu_broker, dl_topic, len(bad))]
        assert len(letters) == len(bad)
        by_payload = {base64.b64decode(letter["payload_b64"]): letter for letter in letters}
        for payload, reason in bad.items():
            letter = by_payload[payload]
            assert reason in letter["reason"], (reason, letter["reason"])
            assert letter["v"] == 1 and letter["source"] == "duckdb_sink" and letter["topic"] == topic
            assert letter["offset"] == messages.index((b"x", payload))
        # the listener saw exactly the committed rows, with the documented columns
        listened = pl.concat(seen_batches)
        assert listened.columns == ["ts", "device", "metric", "value", "quality"]
        assert listened.height == 50
        assert str(listened["ts"].dtype.time_zone) == "UTC"
    finally:
        db.close()


@pytest.mark.timeout(60)
async def test_offset_beyond_partition_end_resumes_from_earliest_without_duplicates(tansu_broker, tmp_path):
    """A recreated topic (Tansu restart) is shorter than the stored offset: re-read it all and
    skip what is stored by (device, seq)."""
    topic, dl_topic = f"t.rs.{uuid.uuid4().hex[:8]}", f"t.rs.dl.{uuid.uuid4().hex[:8]}"
    await create_topics(tansu_broker, (topic, 1), (dl_topic, 1))
    first = [envelope_bytes(reading(2, seq)) for seq in range(20)]
    await produce(tansu_broker, topic, [(b"pdu-002", v) for v in first])
    db = Database(tmp_path / "rs.duckdb")
    try:
        # Pretend an earlier topic incarnation left us at offset 5000.
        db.query("INSERT INTO ingest_offsets VALUES (?, 0, 5000, now())", [topic])
        # Some of these readings were stored before the "restart".
        sink = DuckDBSink(db, _settings(tansu_broker, topic, dl_topic))
        await sink.start()
        await _run_until(sink, lambda: sink.stats.readings == 20 and sink._pending_write is None, "re-read from earliest")
        assert sink.stats.topic_resets >= 1
        assert db.query("SELECT count(*) FROM samples") == [(100,)]
        # Restart: now the producer re-sends 10 old readings and 10 new ones after the broker came back.
        again = [envelope_bytes(reading(2, seq)) for seq in range(10, 30)]
        await produce(tansu_broker, topic, [(b"pdu-002", v) for v in again])
        sink = DuckDBSink(db, _settings(tansu_broker, topic, dl_topic))
        await sink.start()
        await _run_until(sink, lambda: sink.stats.messages == 20 and sink._pending_write is None, "second run")
        assert sink.stats.duplicates == 10
        assert db.query("SELECT count(*), count(DISTINCT seq), sum(n_points) FROM readings") == [(30, 30, 150)]
        assert readings_check(db) == {"readings": 30, "distinct_device_seq": 30, "readings_with_wrong_points": 0,
                                      "orphan_point_groups": 0, "points": 150}
        assert db.query("SELECT next_offset FROM ingest_offsets WHERE topic = ?", [topic]) == [(40,)]
    finally:
        db.close()


@pytest.mark.timeout(60)
async def test_rollups_follow_ingest_and_late_samples(tansu_broker, tmp_path):
    topic, dl_topic = f"t.ru.{uuid.uuid4().hex[:8]}", f"t.ru.dl.{uuid.uuid4().hex[:8]}"
    await create_topics(tansu_broker, (topic, 1), (dl_topic, 1))
    # 10 minutes of 1 Hz readings for one device, minus seq 30..39 which come late.
    early = [reading(3, seq, 2) for seq in range(600) if not 30 <= seq < 40]
    late = [reading(3, seq, 2) for seq in range(30, 40)]
    await produce(tansu_broker, topic, [(b"pdu-003", envelope_bytes(r)) for r in early])
    db = Database(tmp_path / "ru.duckdb")
    try:
        sink = DuckDBSink(db, _settings(tansu_broker, topic, dl_topic))
        await sink.start()

        def rolled_minutes() -> int:
            return db.query("SELECT count(DISTINCT ts) FROM rollup_1m")[0][0]

        await _run_until(sink, lambda: sink.stats.readings == len(early) and rolled_minutes() >= 7, "1-min rollups")
        await produce(tansu_broker, topic, [(b"pdu-003", envelope_bytes(r)) for r in late])
        sink = DuckDBSink(db, _settings(tansu_broker, topic, dl_topic))
        await sink.start()
        await _run_until(sink, lambda: sink.stats.readings == len(late) and sink._pending_write is None, "late readings")
        # Every closed bucket agrees with the raw table, including the one the late readings hit.
        mismatches = db.query("""
            SELECT count(*) FROM rollup_1m r JOIN (
                SELECT time_bucket(INTERVAL '1 minute', ts) AS ts, device, metric, count(*) AS n,
                       avg(value) AS a, max(value) AS mx, arg_max(value, ts) AS last
                FROM samples GROUP BY ALL) s USING (ts, device, metric)
            WHERE r.n <> s.n OR abs(r.value_avg - s.a) > 1e-9 OR r.value_max <> s.mx OR r.value_last <> s.last""")
        assert mismatches == [(0,)]
        assert db.query("SELECT n FROM rollup_1m WHERE metric = 'pdu.l0.power_kw' ORDER BY ts LIMIT 1") == [(60,)]
    finally:
        db.close()


@pytest.mark.timeout(60)
async def test_sequence_numbers_beyond_int64_are_stored_and_deduplicated(tansu_broker, tmp_path):
    """seq is uint64 in the envelope: values >= 2^63 are stored, a retry of one is dropped, and
    a restarted sink rebuilds its dedup state from them."""
    topic, dl_topic = f"t.u64.{uuid.uuid4().hex[:8]}", f"t.u64.dl.{uuid.uuid4().hex[:8]}"
    await create_topics(tansu_broker, (topic, 1), (dl_topic, 1))
    seqs = [2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
    envs = []
    for i, seq in enumerate(seqs):
        env = reading(1, i).to_envelope() | {"seq": seq}
        envs.append(orjson.dumps(env))
    await produce(tansu_broker, topic, [(b"pdu-001", v) for v in envs + envs[1:2]])  # one retry

    db_path = tmp_path / "u64.duckdb"
    for run in range(2):  # the second run re-reads nothing new but must load state with huge seqs
        db = Database(db_path)
        sink = DuckDBSink(db, _settings(tansu_broker, topic, dl_topic))
        await sink.start()
        if run == 0:
            await _run_until(sink, lambda: sink.stats.messages == 5 and sink._pending_write is None, "all handled")
        else:
            await sink.stop()
        try:
            assert sorted(int(s) for (s,) in db.query("SELECT seq FROM readings")) == seqs
            assert sink.stats.dead_letters == 0
        finally:
            db.close()


@pytest.mark.timeout(60)
async def test_readings_of_another_site_are_dead_letters_not_merged(tansu_broker, tmp_path):
    """Device ids repeat across sites; one file holds one site. The first readings claim the file
    (no site file given); another site's readings go to dead letters naming both sites."""
    topic, dl_topic = f"t.site.{uuid.uuid4().hex[:8]}", f"t.site.dl.{uuid.uuid4().hex[:8]}"
    await create_topics(tansu_broker, (topic, 1), (dl_topic, 1))
    ours = [envelope_bytes(reading(1, seq)) for seq in range(6)]
    theirs = [orjson.dumps(reading(1, seq).to_envelope() | {"site": "edge5"}) for seq in range(100, 104)]
    mixed = [ours[0], theirs[0], ours[1], theirs[1], ours[2], ours[3], theirs[2], theirs[3], ours[4], ours[5]]
    await produce(tansu_broker, topic, [(b"pdu-001", v) for v in mixed])

    db = Database(tmp_path / "site.duckdb")
    sink = DuckDBSink(db, _settings(tansu_broker, topic, dl_topic))
    await sink.start()
    await _run_until(sink, lambda: sink.stats.messages == len(mixed) and sink._pending_write is None, "all handled")
    try:
        assert sorted(s for (s,) in db.query("SELECT seq FROM readings")) == list(range(6))
        assert db.query("SELECT value FROM podwatch_meta WHERE key = 'site'") == [("test",)]
        assert sink.stats.dead_letters == 4
        letters = [orjson.loads(r.value) for r in await read_all(tansu_broker, dl_topic, 4)]
        assert sorted(letter["offset"] for letter in letters) == [1, 3, 6, 7]
        assert all("site 'edge5' is not the site of this DuckDB file ('test')" in letter["reason"]
                   for letter in letters)
    finally:
        db.close()


def test_a_file_holds_one_site_file(tmp_path):
    from pathlib import Path

    from podwatch.errors import PodwatchError
    from podwatch.storage.topology import load_topology_file

    root = Path(__file__).parents[3]
    db = Database(tmp_path / "one.duckdb")
    try:
        load_topology_file(db.connection, str(root / "examples/sites/demo.yaml"))
        load_topology_file(db.connection, str(root / "examples/sites/demo.yaml"))  # reloading the same site is fine
        with pytest.raises(PodwatchError, match="holds site 'demo'.*describes site"):
            load_topology_file(db.connection, str(root / "examples/sites/edge-5mw.yaml"))
        assert db.query("SELECT count(*) FROM topo_racks")[0][0] == 16  # the failed load changed nothing
    finally:
        db.close()
