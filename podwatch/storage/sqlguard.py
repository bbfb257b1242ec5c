"""The guarded read-only SQL of `POST /api/sql` and `podwatch sql`.

A query is executed only when DuckDB's own parser says it is exactly one SELECT (or WITH ...
SELECT) statement, and its syntax tree (`json_serialize_sql`) reads nothing but this
database's tables and views: no table functions except a few generators (so no read_csv,
read_parquet, read_json, glob, read_text, ...), no replacement scans of file names
(`FROM 'x.csv'`), no other catalogs or schemas, no functions that reach outside (getenv).
Everything else is rejected before execution: 400 (not one statement / unparsable) or 403
(not a SELECT, or it reads outside the database). Execution has a time limit (the query is
cancelled with `interrupt()` from a timer) and a row cap.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import duckdb

from podwatch.errors import PodwatchError

ALLOWED_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})
DENIED_FUNCTIONS = frozenset({"getenv", "current_setting", "read_text", "read_blob", "query", "query_table"})
ALLOWED_SCHEMAS = frozenset({"", "main"})


class SqlRejected(PodwatchError):
    """The statement was not executed; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class SqlTimeout(PodwatchError):
    status = 408


@dataclass
class SqlResult:
    columns: list[str]
    rows: list[tuple]
    truncated: bool
    elapsed_s: float

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def relations_of(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE NOT internal UNION SELECT view_name FROM duckdb_views() WHERE NOT internal"
    ).fetchall()
    return {r[0].lower() for r in rows}


def check_select(sql: str, con: duckdb.DuckDBPyConnection) -> None:
    """Raise SqlRejected unless `sql` is one read-only SELECT over this database's relations."""
    if not sql or not sql.strip():
        raise SqlRejected("empty query", 400)
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise SqlRejected(f"cannot parse the query: {exc}", 400) from None
    if len(statements) != 1:
        raise SqlRejected(f"exactly one statement is allowed, got {len(statements)}", 400)
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise SqlRejected(f"only SELECT / WITH queries are allowed, got {kind.name}", 403)
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
    if tree.get("error"):
        raise SqlRejected(f"query cannot be verified as read-only: {tree.get('error_message')}", 403)
    known = relations_of(con)
    catalog = _catalog(con)
    _check_scoped(tree, frozenset(), known, catalog)


def _check_scoped(node: Any, ctes: frozenset[str], known: set[str], catalog: str) -> None:
    """Walk the tree with the CTE names IN SCOPE at each node: a query's CTEs are visible in
    that query and its subqueries, each CTE's body sees only the CTEs declared before it (a
    recursive CTE also itself). A name used outside its CTE's scope is what DuckDB resolves as
    a table or a replacement scan (`FROM 'x.csv'`), so it must be a known relation there."""
    if isinstance(node, list):
        for value in node:
            _check_scoped(value, ctes, known, catalog)
        return
    if not isinstance(node, dict):
        return
    cte_map = node.get("cte_map")
    if isinstance(cte_map, dict) and cte_map.get("map"):
        declared = set(ctes)
        for entry in cte_map["map"]:
            _check_scoped(entry.get("value"), frozenset(declared), known, catalog)
            declared.add(str(entry["key"]).lower())
        ctes = frozenset(declared)
    if node.get("type") == "RECURSIVE_CTE_NODE" and node.get("cte_name"):
        ctes = ctes | {str(node["cte_name"]).lower()}
    _check_node(node, ctes, known, catalog)
    for key, value in node.items():
        if key != "cte_map":
            _check_scoped(value, ctes, known, catalog)


def _check_node(node: dict, ctes: frozenset[str], known: set[str], catalog_name: str) -> None:
    node_type = node.get("type")
    if node_type == "TABLE_FUNCTION":
        name = str(node.get("function", {}).get("function_name", "")).lower()
        if name not in ALLOWED_TABLE_FUNCTIONS:
            raise SqlRejected(f"table function {name}() is not allowed (only {', '.join(sorted(ALLOWED_TABLE_FUNCTIONS))})", 403)
    elif node_type == "BASE_TABLE":
        table = str(node.get("table_name", ""))
        schema = str(node.get("schema_name", "")).lower()
        catalog = str(node.get("catalog_name", "")).lower()
        if schema not in ALLOWED_SCHEMAS or catalog not in ("", "memory") and catalog != catalog_name:
            raise SqlRejected(f"relation {catalog}.{schema}.{table} is outside this database", 403)
        in_scope_cte = not schema and not catalog and table.lower() in ctes
        if table.lower() not in known and not in_scope_cte:
            raise SqlRejected(f"unknown relation {table!r} (files and other sources cannot be read)", 403)
    elif node.get("class") == "FUNCTION" and str(node.get("function_name", "")).lower() in DENIED_FUNCTIONS:
        raise SqlRejected(f"function {node['function_name']}() is not allowed", 403)


def _catalog(con: duckdb.DuckDBPyConnection) -> str:
    return str(con.execute("SELECT current_database()").fetchone()[0]).lower()


def run_guarded(con: duckdb.DuckDBPyConnection, sql: str, timeout_s: float = 10.0, max_rows: int = 10_000) -> SqlResult:
    """Check and run `sql` on cursor `con` (blocking; call it from a worker thread)."""
    try:
        check_select(sql, con)
    except duckdb.InterruptException:  # Ctrl-C while the guard looks up the catalog
        raise KeyboardInterrupt from None
    done = threading.Event()
    limit_reached = threading.Event()

    def cancel_at_limit() -> None:
        # DuckDB can drop an interrupt that lands between the execution phases of a query (seen
        # under load: a query then ran to its end); interrupting again until it stops makes the
        # limit hold.
        if not done.wait(timeout_s):
            limit_reached.set()
            while True:
                con.interrupt()
                if done.wait(0.2):
                    break

    timer = threading.Thread(target=cancel_at_limit, name="sql-time-limit", daemon=True)
    started = time.perf_counter()
    timer.start()
    try:
        from podwatch.storage.queries import fetch_rows

        columns, rows = fetch_rows(con.execute(sql), max_rows)
    except (duckdb.Error, RuntimeError) as exc:
        # an interrupt while the Arrow reader streams surfaces as RuntimeError "Query interrupted"
        if limit_reached.is_set() or time.perf_counter() - started >= timeout_s:
            raise SqlTimeout(f"query cancelled after the {timeout_s:g} s time limit") from None
        if isinstance(exc, duckdb.InterruptException) or "interrupted" in str(exc).lower():
            # interrupted before the limit, by someone else: Ctrl-C (DuckDB turns SIGINT into an
            # interrupt of the running query) -> the CLI exits 130 without a traceback
            raise KeyboardInterrupt from None
        if isinstance(exc, duckdb.Error):
            raise SqlRejected(f"query failed: {exc}", 400) from None
        raise
    finally:
        done.set()
        timer.join()
    truncated = len(rows) > max_rows
    return SqlResult(_unique(columns), rows[:max_rows], truncated, time.perf_counter() - started)


def run_guarded_foreground(con: duckdb.DuckDBPyConnection, sql: str, timeout_s: float = 10.0,
                           max_rows: int = 10_000) -> SqlResult:
    """`run_guarded` for a terminal (`podwatch sql --db`): Ctrl-C stops the query at once.

    Python runs a signal handler in the main thread between bytecodes, never while DuckDB executes
    there, so a query on the main thread ignored Ctrl-C until its time limit. The query runs in a
    worker thread; the main thread waits, takes the KeyboardInterrupt, interrupts the query and
    waits for the worker before it re-raises (a process that exits while DuckDB still runs in
    another thread aborts)."""
    outcome: dict[str, Any] = {}
    finished = threading.Event()  # not Thread.join/is_alive: a join cut by Ctrl-C can leave is_alive() False (3.11)

    def work() -> None:
        try:
            outcome["result"] = run_guarded(con, sql, timeout_s, max_rows)
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc
        finally:
            finished.set()

    worker = threading.Thread(target=work, name="sql-query", daemon=True)
    worker.start()
    try:
        while not finished.wait(0.1):
            pass
    except KeyboardInterrupt:
        while not finished.is_set():
            try:
                con.interrupt()
                finished.wait(0.2)
            except KeyboardInterrupt:  # pressed again: keep stopping the query first
                pass
        raise
    finally:
        worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _unique(columns: list[str]) -> list[str]:
    """Column names made unique (x, x_1, ...): a self-join's `SELECT *` repeats names, and the JSON
    rows (one key per name) kept only the last column of each name."""
    seen = set(columns)
    out: list[str] = []
    for name in columns:
        if name in out:
            n = 1
            while f"{name}_{n}" in seen:
                n += 1
            name = f"{name}_{n}"
            seen.add(name)
        out.append(name)
    return out
