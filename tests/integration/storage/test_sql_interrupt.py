"""Ctrl-C stops `podwatch sql --db` at once. Python runs signal handlers in the main thread between
bytecodes, never while DuckDB executes there, so a query on the main thread ran on to its time
limit; a query in a worker thread stopped by Ctrl-C used to abort the process (SIGABRT, "exception
not rethrown") when Python exited while DuckDB still ran in the other thread."""

from __future__ import annotations

import _thread
import os
import signal
import subprocess
import sys
import threading
import time

import duckdb
import pytest

from podwatch.storage.sqlguard import run_guarded_foreground
from podwatch.procs import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ENDLESS = "SELECT count(*) FROM t a, t b, t c WHERE a.x * b.x < c.x + 0.5"  # ~10^15 rows: hours


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "t.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE t AS SELECT random() AS x FROM range(100000)")
    return path


def test_ctrl_c_interrupts_a_foreground_query_and_waits_for_it(db):
    con = duckdb.connect(str(db), read_only=True)
    started = time.monotonic()

    def press_ctrl_c() -> None:  # as the terminal does, once the query is under way
        wait_for(lambda: any(t.name == "sql-query" for t in threading.enumerate()), 10, what="the query thread")
        _thread.interrupt_main()

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_guarded_foreground(con.cursor(), ENDLESS, timeout_s=60)
    assert time.monotonic() - started < 10  # not the 60 s time limit
    assert not any(t.name == "sql-query" for t in threading.enumerate())  # DuckDB stopped before we left
    assert con.execute("SELECT count(*) FROM t").fetchone() == (100000,)  # the connection is usable
    con.close()


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigint_ends_podwatch_sql_with_130_not_an_abort(db):
    proc = subprocess.Popen([sys.executable, "-m", "podwatch", "sql", "--db", str(db), "--timeout", "60", ENDLESS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a terminal's Ctrl-C
    try:
        # the CLI starts in ~0.7 s of CPU; 3 s of CPU means DuckDB is executing (on every core it has)
        wait_for(lambda: proc.poll() is not None or cpu_seconds(proc.pid) >= 3.0, 40, what="the query to run")
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 130, err.decode()[-500:]
        assert time.monotonic() - sent < 5
        assert b"Traceback" not in err and b"terminate called" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
