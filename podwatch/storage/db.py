"""The one place a podwatch process opens its DuckDB file.

DuckDB allows one writer process and no reader process beside it, so the process that owns
the file (`podwatch serve` / `podwatch ingest`) holds one `Database`; everything in it gets a
cursor from `Database.cursor()` (one per thread / request) and runs blocking queries through
`Database.run()` in a worker thread, so the event loop is never blocked. Other processes read
through the HTTP API, `podwatch sql` or the Parquet export.

`<db file>.serve.json` next to the file says which process owns it and where its API listens
(written by the service), so `podwatch sql` can go through the API without being told.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import duckdb

from podwatch.errors import PodwatchError
from podwatch.storage.schema import configure_connection, ensure_schema, pending_migrations

T = TypeVar("T")

# Block size of files this module creates (an existing file keeps its own). DuckDB's default
# 256 KiB leaves ~10 % of the file as slack where a column segment does not fill its block;
# 128 KiB measured -0.22 B per point (benchmarks/ingest.py), with the same query times.
BLOCK_SIZE = 128 * 1024


class DatabaseLocked(PodwatchError):
    """Another process holds the DuckDB file."""


class OldLayoutError(PodwatchError):
    """A read-only open of a file that still needs a layout migration (which needs a writer)."""


def is_lock_error(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower()


def owner_file(path: str | Path) -> Path:
    return Path(f"{path}.serve.json")


def read_owner(path: str | Path) -> dict | None:
    """The owner record of a DuckDB file ({"pid", "api_url", "token"}), if its process is alive."""
    try:
        info = json.loads(owner_file(path).read_text())
        os.kill(int(info["pid"]), 0)
        return info
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_owner(path: str | Path, api_url: str | None, token: str | None = None) -> None:
    """Owner record, readable only by the user (it holds the SQL endpoint's token)."""
    target = owner_file(path)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "api_url": api_url, "token": token}, f)


def remove_owner(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        info = json.loads(owner_file(path).read_text())
        if int(info.get("pid", -1)) == os.getpid():
            owner_file(path).unlink()


class Database:
    """The read-write connection of the owning process. `close()` is idempotent."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        self.path = str(path)
        self.read_only = read_only
        try:
            self._con = duckdb.connect(self.path, read_only=read_only, config={"default_block_size": str(BLOCK_SIZE)})
        except duckdb.Error as exc:
            if is_lock_error(exc):
                raise DatabaseLocked(f"{self.path} is in use by another process: {exc}") from None
            raise PodwatchError(f"cannot open DuckDB file {self.path}: {exc}") from None
        try:
            if read_only:
                configure_connection(self._con)
                pending = pending_migrations(self._con)
                if pending:
                    raise OldLayoutError(
                        f"{self.path} was written by an older podwatch (layout changes pending: {'; '.join(pending)}); "
                        f"migrate it once with `python -m podwatch.storage.db migrate {self.path}` (or open it with "
                        "`podwatch ingest` / `podwatch serve`, which migrate it), then run this again")
            else:
                ensure_schema(self._con)  # also migrates a file of an older layout (schema.py)
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                self._con.close()
            raise
        self._closed = False
        self._lock = threading.Lock()

    @property
    def connection(self) -> duckdb.DuckDBPyConnection:
        return self._con

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor (its own session on the same database); use one per thread/request."""
        cur = self._con.cursor()
        configure_connection(cur)
        return cur

    async def run(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run `fn(cursor)` in a worker thread with a fresh cursor, closed afterwards."""

        def call() -> T:
            cur = self.cursor()
            try:
                return fn(cur)
            finally:
                cur.close()

        return await asyncio.to_thread(call)

    def query(self, sql: str, params: Any = None) -> list[tuple]:
        cur = self.cursor()
        try:
            return cur.execute(sql, params).fetchall()
        finally:
            cur.close()

    def file_size_bytes(self) -> int:
        try:
            return os.path.getsize(self.path) + (os.path.getsize(self.path + ".wal") if os.path.exists(self.path + ".wal") else 0)
        except OSError:
            return 0

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(duckdb.Error):
            self._con.close()


def _main(argv: list[str] | None = None) -> int:
    """`python -m podwatch.storage.db migrate FILE`: bring a file to the current layout."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "migrate":
        print("usage: python -m podwatch.storage.db migrate FILE", file=sys.stderr)
        return 2
    path = args[1]
    if not os.path.exists(path):
        print(f"error: {path}: no such DuckDB file", file=sys.stderr)
        return 1
    try:
        con = duckdb.connect(path)
    except duckdb.Error as exc:
        reason = "in use by another process" if is_lock_error(exc) else "cannot be opened"
        print(f"error: {path} {reason}: {exc}", file=sys.stderr)
        return 1
    try:
        from podwatch.storage.schema import migrate_old_layout

        configure_connection(con)
        done = migrate_old_layout(con)
        ensure_schema(con)
    except PodwatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        con.close()
    print(f"{path}: " + ("; ".join(done) if done else "already the current layout"))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
