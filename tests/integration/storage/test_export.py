"""Parquet export round-trips with DuckDB, polars and pandas (no podwatch code on the read side)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import duckdb
import polars as pl
import pytest

from podwatch.storage.db import Database
from podwatch.storage.ids import insert_named_samples
from podwatch.storage.rollups import advance_rollups

pytestmark = pytest.mark.integration
PODWATCH = str(Path(sys.executable).parent / "podwatch")


def _fill(path: Path) -> None:
    db = Database(path)
    con = db.connection
    # 3 days x 2 devices x 2 metrics, every 5 minutes, crossing two midnights
    insert_named_samples(con, """
        SELECT TIMESTAMP '2026-03-01 12:00:00' + to_minutes(i * 5) AS ts, 'pdu-' || d AS device, m AS metric,
               i * 0.5 + d AS value, (i % 3)::UTINYINT AS quality, i AS seq
        FROM range(864) r(i), range(2) s(d), (VALUES ('pdu.power_kw'), ('pdu.l1.current_a')) t(m)""")
    con.execute("INSERT INTO dedup_state SELECT device, max(seq), max(ts) FROM readings GROUP BY device")
    con.execute("INSERT INTO podwatch_meta VALUES ('site', 'dc1')")
    while advance_rollups(con, 0):
        pass
    db.close()


@pytest.mark.timeout(60)
def test_export_cli_round_trips_with_duckdb_polars_and_pandas(tmp_path):
    db_path, out = tmp_path / "x.duckdb", tmp_path / "export"
    _fill(db_path)
    run = subprocess.run([PODWATCH, "export", "--db", str(db_path), "--to", str(out)], capture_output=True, text=True,
                         timeout=50, env={**os.environ})
    assert run.returncode == 0, run.stderr
    dates = sorted(p.name for p in (out / "samples" / "site=dc1").iterdir())
    assert dates == ["date=2026-03-01", "date=2026-03-02", "date=2026-03-03", "date=2026-03-04"]

    source = duckdb.connect(str(db_path), read_only=True)
    expected = source.execute("SELECT ts, device, metric, value, quality FROM samples ORDER BY ALL").fetchall()
    expected_readings = source.execute("SELECT ts, device, seq, n_points FROM readings ORDER BY ALL").fetchall()
    expected_1h = source.execute("SELECT count(*), sum(value_sum) FROM rollup_1h").fetchone()
    source.close()
    assert len(expected_readings) == 864 * 2

    con = duckdb.connect()
    got = con.execute(f"""SELECT ts, device, metric, value, quality FROM read_parquet('{out}/samples/**/*.parquet',
                          hive_partitioning = true) ORDER BY ALL""").fetchall()
    assert got == expected
    got_readings = con.execute(f"""SELECT ts, device, seq, n_points FROM read_parquet('{out}/readings/**/*.parquet',
                                   hive_partitioning = true) ORDER BY ALL""").fetchall()
    assert got_readings == expected_readings
    site_dates = con.execute(f"""SELECT DISTINCT site, typeof(date) FROM read_parquet('{out}/samples/**/*.parquet',
                                 hive_partitioning = true)""").fetchall()
    assert site_dates == [("dc1", "DATE")]
    assert con.execute(f"SELECT count(*), sum(value_sum) FROM read_parquet('{out}/rollup_1h/**/*.parquet')").fetchone() == expected_1h

    frame = pl.scan_parquet(str(out / "samples" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert frame.height == len(expected)
    assert frame["ts"].dtype == pl.Datetime("us")
    assert frame.sort(["ts", "device", "metric"]).row(0)[frame.columns.index("ts")] == datetime(2026, 3, 1, 12, 0)
    assert set(frame["site"].unique()) == {"dc1"}

    # pandas.read_parquet(dir) reads through pyarrow.dataset with hive partitioning: the same path here
    # (pandas itself is not installed in this environment; the pandas test below runs where it is).
    import pyarrow.parquet as pq

    table = pq.read_table(out / "samples")
    assert table.num_rows == len(expected) and {"site", "date", "ts", "value"} <= set(table.column_names)


def test_export_reads_with_pandas(tmp_path):
    import pandas
    db_path, out = tmp_path / "x.duckdb", tmp_path / "export"
    _fill(db_path)
    from podwatch.storage.export import export_parquet

    con = duckdb.connect(str(db_path), read_only=True)
    export_parquet(con, out)
    con.close()
    df = pandas.read_parquet(out / "samples")
    assert len(df) == 864 * 4 and set(df["site"].astype(str)) == {"dc1"}


def test_export_of_a_file_another_process_holds_is_one_line_naming_the_holder(tmp_path):
    """The message repeated the path and DuckDB's whole error; it names the holder once and says
    what to do (export reads the file itself)."""
    db_path = tmp_path / "held.duckdb"
    Database(db_path).close()
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
                               "print('ready', flush=True); sys.stdin.read()", str(db_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        done = subprocess.run([str(Path(sys.executable).parent / "podwatch"), "export", "--db", str(db_path),
                               "--to", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].count(str(db_path)) == 1 and f"(PID {holder.pid})" in lines[0]
    assert "stop that process first" in lines[0]
    assert not (tmp_path / "out").exists()
