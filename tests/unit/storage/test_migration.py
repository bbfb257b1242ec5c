"""Files of the older layout (`seq` on every row of `sample_rows`, a stored `value_avg` in the
rollups) are migrated on open: one `reading_rows` row per reading, the column dropped, the
rollups rebuilt with a computed average; a failed migration is a clear error and leaves the
file as it was."""

from __future__ import annotations

import duckdb
import pytest

from podwatch.errors import PodwatchError
from podwatch.storage import db as db_module
from podwatch.storage.db import Database
from podwatch.storage.dedup import SeqDeduper

OLD_LAYOUT = [
    """CREATE TABLE sample_rows (ts TIMESTAMP NOT NULL, device_id UINTEGER NOT NULL, metric_id UINTEGER NOT NULL,
                                value DOUBLE, quality UTINYINT NOT NULL, seq UBIGINT NOT NULL)""",
    "CREATE TABLE device_ids (device_id UINTEGER PRIMARY KEY, device VARCHAR NOT NULL UNIQUE)",
    "CREATE TABLE metric_ids (metric_id UINTEGER PRIMARY KEY, metric VARCHAR NOT NULL UNIQUE)",
    "CREATE TABLE dedup_state (device VARCHAR PRIMARY KEY, max_seq UBIGINT NOT NULL, max_ts TIMESTAMP NOT NULL)",
    """CREATE VIEW samples AS SELECT r.ts, d.device, m.metric, r.value, r.quality, r.seq FROM sample_rows r
       JOIN device_ids d ON d.device_id = r.device_id JOIN metric_ids m ON m.metric_id = r.metric_id""",
    "INSERT INTO device_ids VALUES (0, 'pdu-a'), (1, 'pdu-b')",
    "INSERT INTO metric_ids VALUES (0, 'pdu.power_kw'), (1, 'pdu.l1.current_a'), (2, 'pdu.l2.current_a')",
    # 50 readings per device, 3 points each, seq 100.. at 1 s
    """INSERT INTO sample_rows SELECT TIMESTAMP '2026-01-01' + to_seconds(i) + to_milliseconds(d), d, m,
                                      i + m / 10, 0, 100 + i
       FROM range(50) a(i), range(2) b(d), range(3) c(m) ORDER BY d, i, m""",
    "INSERT INTO dedup_state SELECT device, max(seq), max(ts) FROM samples GROUP BY device",
    """CREATE TABLE rollup_1m (ts TIMESTAMP NOT NULL, device VARCHAR NOT NULL, metric VARCHAR NOT NULL,
                               value_min DOUBLE, value_max DOUBLE, value_avg DOUBLE, value_sum DOUBLE,
                               value_last DOUBLE, last_ts TIMESTAMP, n UBIGINT NOT NULL, n_values UBIGINT NOT NULL,
                               quality_max UTINYINT NOT NULL)""",
    """INSERT INTO rollup_1m SELECT time_bucket(INTERVAL 1 MINUTE, ts), device, metric, min(value), max(value),
                                    avg(value), sum(value), arg_max(value, ts), max(ts), count(*), count(value),
                                    max(quality)
       FROM samples GROUP BY ALL""",
]


def _old_file(path, *extra: str) -> None:
    con = duckdb.connect(str(path))
    for sql in OLD_LAYOUT + list(extra):
        con.execute(sql)
    con.close()


def test_old_layout_is_migrated_on_open_and_dedup_state_loads_from_readings(tmp_path):
    path = tmp_path / "old.duckdb"
    _old_file(path)
    db = Database(path)
    try:
        columns = [r[0] for r in db.query("SELECT column_name FROM duckdb_columns() WHERE table_name = 'sample_rows'")]
        assert columns == ["ts", "device_id", "metric_id", "value", "quality"]
        assert db.query("SELECT count(*), count(DISTINCT (device, seq)), sum(n_points), min(seq), max(seq) "
                        "FROM readings") == [(100, 100, 300, 100, 149)]
        assert db.query("SELECT ts, seq, n_points FROM readings WHERE device = 'pdu-b' ORDER BY ts LIMIT 1")[0][1:] == (100, 3)
        assert db.query("SELECT count(*), sum(value) FROM samples")[0] == (300, pytest.approx(2 * (3 * 1225 + 50 * 0.3)))
        rollup_columns = db.query("SELECT column_name, column_default IS NOT NULL FROM duckdb_columns() "
                                  "WHERE table_name = 'rollup_1m' AND column_name IN ('value_avg', 'value_sum')")
        assert sorted(rollup_columns) == [("value_avg", True), ("value_sum", False)]  # avg computed now
        assert db.query("SELECT count(*), sum(n), round(sum(value_avg), 6), round(sum(value_sum / n_values), 6) "
                        "FROM rollup_1m") == [(6, 300, *[round(2 * (3 * 24.5 + 0.3), 6)] * 2)]
        dedup = SeqDeduper(window=64)
        dedup.load(db.connection)
        # the newest stored readings are duplicates now, the next one is new
        outcome = dedup.check(["pdu-a", "pdu-a"], [149, 150], [1_767_225_600_000 + 49_000, 1_767_225_600_000 + 50_000])
        assert outcome.keep.tolist() == [False, True]
    finally:
        db.close()
    again = Database(path)  # idempotent: nothing left to migrate
    try:
        assert again.query("SELECT count(*) FROM readings") == [(100,)]
    finally:
        again.close()


def test_failed_migration_is_a_clear_error_and_leaves_the_file_unchanged(tmp_path):
    path = tmp_path / "old.duckdb"
    _old_file(path, "CREATE TABLE reading_rows (something_else VARCHAR)")  # in the way: the INSERT fails
    with pytest.raises(PodwatchError, match=r"cannot migrate .*old layout.*reading_rows.*file is unchanged"):
        Database(path)
    con = duckdb.connect(str(path), read_only=True)  # the failed open closed its connection
    try:
        assert con.execute("SELECT count(*), count(DISTINCT seq) FROM sample_rows").fetchone() == (300, 50)
    finally:
        con.close()


def test_read_only_open_of_an_old_file_names_the_migration_command(tmp_path):
    path = tmp_path / "old.duckdb"
    _old_file(path)
    with pytest.raises(PodwatchError, match=r"older podwatch .*sample_rows.seq -> reading_rows.*"
                                            r"rollup_1m.value_avg -> generated.*python -m podwatch.storage.db migrate"):
        Database(path, read_only=True)


def test_migrate_command_migrates_once_and_reports_errors_without_traceback(tmp_path, capsys):
    """`python -m podwatch.storage.db migrate FILE` (its `_main`, run in-process)."""
    path = tmp_path / "old.duckdb"
    _old_file(path)
    assert db_module._main(["migrate", str(path)]) == 0
    assert "sample_rows.seq -> reading_rows; rollup_1m.value_avg -> generated" in capsys.readouterr().out
    assert db_module._main(["migrate", str(path)]) == 0
    assert "already the current layout" in capsys.readouterr().out
    db = Database(path, read_only=True)  # current layout: read-only opens work again
    try:
        assert db.query("SELECT count(*) FROM readings") == [(100,)]
    finally:
        db.close()
    assert db_module._main(["migrate", str(tmp_path / "nope.duckdb")]) == 1
    assert "no such DuckDB file" in capsys.readouterr().err
    broken = tmp_path / "broken.duckdb"
    _old_file(broken, "CREATE TABLE reading_rows (something_else VARCHAR)")
    assert db_module._main(["migrate", str(broken)]) == 1
    assert "error: cannot migrate this DuckDB file" in capsys.readouterr().err
