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
