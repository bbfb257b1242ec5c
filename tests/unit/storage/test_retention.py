"""Retention counts back from the newest stored sample and leaves kept-forever rollups alone."""

from __future__ import annotations

import duckdb

from podwatch.storage.rollups import StorageSettings, advance_rollups, apply_retention
from podwatch.storage.ids import insert_named_samples
from podwatch.storage.schema import ensure_schema


def test_retention_per_relation(tmp_path):
    con = duckdb.connect(str(tmp_path / "r.duckdb"))
    ensure_schema(con)
    # 10 days of hourly samples for one series
    insert_named_samples(con, "SELECT TIMESTAMP '2026-01-01' + to_hours(h) AS ts, 'd' AS device, 'm_kw' AS metric, "
                              "h::DOUBLE AS value, 0 AS quality, h AS seq FROM range(240) r(h)")
    con.execute("INSERT INTO dedup_state SELECT device, max(seq), max(ts) FROM readings GROUP BY device")
    while advance_rollups(con, 0):
        pass
    assert con.execute("SELECT count(*) FROM rollup_1h").fetchone()[0] == 239  # the newest hour is still open
    settings = StorageSettings(raw_retention_days=2, rollup_1m_retention_days=5, rollup_15m_retention_days=5,
                               rollup_1h_retention_days=None)
    deleted = apply_retention(con, settings)
    assert deleted["samples"] == 240 - 49  # newest is hour 239: keep hours >= 191
    assert con.execute("SELECT min(ts) FROM samples").fetchone()[0].isoformat() == "2026-01-08T23:00:00"
    assert con.execute("SELECT count(*) FROM rollup_1h").fetchone()[0] == 239
    assert con.execute("SELECT count(*) FROM rollup_1m").fetchone()[0] == 5 * 24 + 1 - 1


def test_late_samples_past_raw_retention_do_not_wipe_rollups(tmp_path):
    from datetime import datetime

    from podwatch.storage.rollups import done_until, recompute_buckets

    con = duckdb.connect(str(tmp_path / "late.duckdb"))
    ensure_schema(con)
    insert_named_samples(con, "SELECT TIMESTAMP '2026-01-01' + to_minutes(m) AS ts, 'd' AS device, 'm_kw' AS metric, "
                              "m::DOUBLE AS value, 0 AS quality, m AS seq FROM range(600) r(m)")
    con.execute("INSERT INTO dedup_state SELECT device, max(seq), max(ts) FROM readings GROUP BY device")
    while advance_rollups(con, 0):
        pass
    before = con.execute("SELECT count(*), sum(n) FROM rollup_1h").fetchall()
    con.execute("DELETE FROM sample_rows WHERE ts < TIMESTAMP '2026-01-01 05:00:00'")  # raw retention ran
    insert_named_samples(con, "SELECT TIMESTAMP '2026-01-01 00:30:30' AS ts, 'd' AS device, 'm_kw' AS metric, "
                              "1.0 AS value, 0 AS quality, 9999 AS seq")  # very late
    n = recompute_buckets(con, datetime(2026, 1, 1, 0, 30, 30), datetime(2026, 1, 1, 0, 30, 30), done_until(con),
                          raw_kept_since=datetime(2026, 1, 1, 5))
    assert n == 0
    assert con.execute("SELECT count(*), sum(n) FROM rollup_1h").fetchall() == before
    # a late sample inside the kept raw range is merged into its buckets
    insert_named_samples(con, "SELECT TIMESTAMP '2026-01-01 07:30:30' AS ts, 'd' AS device, 'm_kw' AS metric, "
                              "1.0 AS value, 0 AS quality, 9998 AS seq")
    assert recompute_buckets(con, datetime(2026, 1, 1, 7, 30, 30), datetime(2026, 1, 1, 7, 30, 30), done_until(con),
                             raw_kept_since=datetime(2026, 1, 1, 5)) == 3
    assert con.execute("SELECT n FROM rollup_1m WHERE ts = TIMESTAMP '2026-01-01 07:30:00'").fetchone()[0] == 2
    assert con.execute("SELECT n FROM rollup_1h WHERE ts = TIMESTAMP '2026-01-01 07:00:00'").fetchone()[0] == 61


def test_id_map_assigns_new_ids_and_survives_a_reload(tmp_path):
    import numpy as np

    from podwatch.storage.ids import IdMap

    con = duckdb.connect(str(tmp_path / "ids.duckdb"))
    ensure_schema(con)
    insert_named_samples(con, "SELECT TIMESTAMP '2026-01-01' AS ts, 'dev-a' AS device, 'm_kw' AS metric, 1.0 AS value, "
                              "0 AS quality, 1 AS seq")
    ids = IdMap("device")
    ids.load(con)
    mapped, new = ids.ids_of(["dev-b", "dev-a", "dev-b", "dev-c"])
    assert new == [(1, "dev-b"), (2, "dev-c")]
    assert mapped.tolist() == [1, 0, 1, 2] and mapped.dtype == np.uint32
    ids.insert_new(con, new)
    again = IdMap("device")
    again.load(con)
    assert again.ids == ids.ids
