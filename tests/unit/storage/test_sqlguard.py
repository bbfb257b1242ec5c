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


@pytest.mark.parametrize("template", [
    # a CTE of an inner query is not in scope outside it: DuckDB reads the file there
    'SELECT * FROM (WITH "{f}" AS (SELECT 1 AS z) SELECT 1 AS q) a, "{f}" b',
    "SELECT * FROM (WITH \"{f}\" AS (SELECT 1 AS z) SELECT 1 AS q) a, '{f}' b",
    'SELECT * FROM samples WHERE device IN (SELECT * FROM (WITH "{f}" AS (SELECT 1) SELECT 1)) UNION ALL SELECT * FROM "{f}"',
    # a non-recursive CTE does not see itself: the name inside its body is the file
    'WITH "{f}" AS (SELECT * FROM "{f}") SELECT * FROM "{f}"',
    # a CTE sees only the CTEs declared before it
    'WITH a AS (SELECT * FROM "{f}"), "{f}" AS (SELECT 1 AS z) SELECT * FROM a',
])
def test_cte_names_do_not_whitelist_files_outside_their_scope(con, tmp_path, template):
    secret = tmp_path / "secret.csv"
    secret.write_text("user,password\nroot,hunter2\n")
    with pytest.raises(SqlRejected) as info:
        run_guarded(con, template.format(f=secret))
    assert info.value.status == 403 and "unknown relation" in str(info.value)


@pytest.mark.parametrize("sql, rows", [
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT count(*) FROM r", [(3,)]),
    ("WITH a AS (SELECT 1 AS x), b AS (SELECT x + 1 AS y FROM a) SELECT y FROM b", [(2,)]),
    ("WITH a AS (SELECT 2 AS x) SELECT (SELECT max(x) FROM a) + (SELECT count(*) FROM (SELECT * FROM a))", [(3,)]),
])
def test_ctes_in_scope_still_pass(con, sql, rows):
    assert run_guarded(con, sql).rows == rows


def test_an_interrupt_before_the_limit_is_a_keyboard_interrupt_not_a_runtime_error(tmp_path):
    """Ctrl-C on `podwatch sql --db` reaches DuckDB as an interrupt of the running query; it was a
    RuntimeError('Query interrupted') traceback (or a false 'time limit' message), not exit 130."""
    import threading

    own = duckdb.connect(str(tmp_path / "i.duckdb"))
    started = threading.Event()

    def ctrl_c() -> None:
        started.wait(5)
        while not stop.is_set():
            own.interrupt()
            stop.wait(0.05)

    stop = threading.Event()
    thread = threading.Thread(target=ctrl_c, daemon=True)
    thread.start()
    try:
        started.set()
        with pytest.raises(KeyboardInterrupt):
            run_guarded(own, "SELECT count(*) FROM range(100000000000) a, range(10) b", timeout_s=60)
    finally:
        stop.set()
        thread.join()
        own.close()


def test_times_python_cannot_hold_come_back_as_text_not_an_error(con):
    """'infinity' timestamps/dates and years past 9999 made to_pylist raise OverflowError: a 500 on /api/sql."""
    result = run_guarded(con, "SELECT 'infinity'::TIMESTAMP AS a, '-infinity'::DATE AS b, "
                              "'10000-01-01'::TIMESTAMP AS c, TIMESTAMP '2026-03-01 12:00:00' AS d, 1 AS e")
    a, b, c, d, e = result.rows[0]
    assert (a, b) == ("infinity", "-infinity")
    assert c.startswith("10000-01-01")
    assert d.isoformat() == "2026-03-01T12:00:00" and e == 1


def test_duplicate_column_names_are_made_unique_so_json_keeps_every_column(con):
    """`SELECT *` over a self-join names columns twice; the JSON rows kept only the last of each."""
    result = run_guarded(con, "SELECT * FROM (SELECT 1 AS x, 3 AS ts, 5 AS x_1) a JOIN (SELECT 2 AS x, 4 AS ts) b ON true")
    assert result.columns == ["x", "ts", "x_1", "x_2", "ts_1"]
    assert result.records() == [{"x": 1, "ts": 3, "x_1": 5, "x_2": 2, "ts_1": 4}]
