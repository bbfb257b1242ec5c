"""Retention counts back from the newest stored sample and leaves kept-forever rollups alone."""

from __future__ import annotations

import duckdb

from podwatch.storage.rollups import StorageSettings, advance_rollups, apply_retention
from podwatch.storage.schema import ensure_schema


def test_retention_per_relation(tmp_path):
    con = duckdb.connect(str(tmp_path / "r.duckdb"))
    ensure_schema(con)
    # 10 days of hourly samples for one series
    con.execute("""INSERT INTO samples SELECT TIMESTAMP '2026-01-01' + to_hours(h), 'd', 'm_kw', h, 0, h FROM range(240) r(h)""")
    con.execute("INSERT INTO dedup_state SELECT device, max(seq), max(ts) FROM samples GROUP BY device")
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
    con.execute("""INSERT INTO samples SELECT TIMESTAMP '2026-01-01' + to_minutes(m), 'd', 'm_kw', m, 0, m FROM range(600) r(m)""")
    con.execute("INSERT INTO dedup_state SELECT device, max(seq), max(ts) FROM samples GROUP BY device")
    while advance_rollups(con, 0):
        pass
    before = con.execute("SELECT count(*), sum(n) FROM rollup_1h").fetchall()
    con.execute("DELETE FROM samples WHERE ts < TIMESTAMP '2026-01-01 05:00:00'")  # raw retention ran
    con.execute("INSERT INTO samples VALUES (TIMESTAMP '2026-01-01 00:30:30', 'd', 'm_kw', 1, 0, 9999)")  # very late
    n = recompute_buckets(con, datetime(2026, 1, 1, 0, 30, 30), datetime(2026, 1, 1, 0, 30, 30), done_until(con),
                          raw_kept_since=datetime(2026, 1, 1, 5))
    assert n == 0
    assert con.execute("SELECT count(*), sum(n) FROM rollup_1h").fetchall() == before
    # a late sample inside the kept raw range is merged into its buckets
    con.execute("INSERT INTO samples VALUES (TIMESTAMP '2026-01-01 07:30:30', 'd', 'm_kw', 1, 0, 9998)")
    assert recompute_buckets(con, datetime(2026, 1, 1, 7, 30, 30), datetime(2026, 1, 1, 7, 30, 30), done_until(con),
                             raw_kept_since=datetime(2026, 1, 1, 5)) == 3
    assert con.execute("SELECT n FROM rollup_1m WHERE ts = TIMESTAMP '2026-01-01 07:30:00'").fetchone()[0] == 2
    assert con.execute("SELECT n FROM rollup_1h WHERE ts = TIMESTAMP '2026-01-01 07:00:00'").fetchone()[0] == 61
