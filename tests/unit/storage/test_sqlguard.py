"""The SQL guard decides on DuckDB's parse tree, before anything runs."""

from __future__ import annotations

import duckdb
import pytest

from podwatch.storage.schema import ensure_schema
from podwatch.storage.sqlguard import SqlRejected, SqlTimeout, check_select, run_guarded


@pytest.fixture(scope="module")
def con(tmp_path_factory):
    con = duckdb.connect(str(tmp_path_factory.mktemp("guard") / "g.duckdb"))
    ensure_schema(con)
    yield con
    con.close()


@pytest.mark.parametrize("sql", [
    "SELECT * FROM samples",
    "with recent AS (SELECT * FROM samples WHERE ts > now() - INTERVAL 1 HOUR) SELECT device, avg(value) FROM recent GROUP BY 1",
    "SELECT * FROM rack_power JOIN topo_racks USING (rack)",
    "SELECT count(*) FROM range(10)",
    "SELECT * FROM main.samples",
])
def test_read_only_selects_pass(con, sql):
    check_select(sql, con)


@pytest.mark.parametrize("sql, status, words", [
    ("INSERT INTO samples VALUES (now(), 'd', 'm', 1, 0, 1)", 403, "INSERT"),
    ("UPDATE samples SET value = 1", 403, "UPDATE"),
    ("DELETE FROM samples", 403, "DELETE"),
    ("ATTACH 'x.duckdb'", 403, "ATTACH"),
    ("COPY samples TO 'x.csv'", 403, "COPY"),
    ("PRAGMA version", 403, "PRAGMA"),
    ("INSTALL httpfs", 403, "only SELECT"),
    ("LOAD httpfs", 403, "LOAD"),
    ("SET threads = 1", 403, "SET"),
    ("CALL pragma_version()", 403, "CALL"),
    ("SELECT 1; SELECT 2", 400, "exactly one statement"),
    ("SELEC 1", 400, "cannot parse"),
    ("", 400, "empty"),
    ("SELECT * FROM read_csv('/etc/passwd')", 403, "read_csv"),
    ("SELECT * FROM read_csv_auto('/etc/passwd')", 403, "read_csv_auto"),
    ("SELECT * FROM read_parquet('x.parquet')", 403, "read_parquet"),
    ("SELECT * FROM parquet_scan('x.parquet')", 403, "parquet_scan"),
    ("SELECT * FROM read_json('x.json')", 403, "read_json"),
    ("SELECT * FROM glob('/*')", 403, "glob"),
    ("SELECT * FROM read_text('/etc/hostname')", 403, "read_text"),
    ("SELECT * FROM read_blob('/etc/hostname')", 403, "read_blob"),
    ("SELECT * FROM '/etc/passwd'", 403, "unknown relation"),
    ("SELECT * FROM samples WHERE device IN (SELECT column0 FROM read_csv('/etc/passwd'))", 403, "read_csv"),
    ("SELECT getenv('HOME')", 403, "getenv"),
    ("SELECT * FROM information_schema.tables", 403, "outside this database"),
    ("SELECT * FROM duckdb_settings()", 403, "duckdb_settings"),
])
def test_everything_else_is_rejected(con, sql, status, words):
    with pytest.raises(SqlRejected) as info:
        check_select(sql, con)
    assert info.value.status == status
    assert words in str(info.value)


def test_time_limit_cancels_and_row_cap_truncates(con):
    with pytest.raises(SqlTimeout):
        run_guarded(con, "SELECT count(*) FROM range(100000000000) a, range(10) b", timeout_s=0.3)
    result = run_guarded(con, "SELECT * FROM range(100) r(i)", max_rows=10)
    assert result.truncated and len(result.rows) == 10 and result.columns == ["i"]
    assert run_guarded(con, "SELECT 42 AS answer").records() == [{"answer": 42}]
