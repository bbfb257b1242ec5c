"""`podwatch headroom / plan / report / eval forecast` on the demo site with a small simulated
history, from Parquet and from a real DuckDB file (including one locked by another process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from podwatch.cli import app
from podwatch.site import load_site

DEMO = str(Path(__file__).resolve().parents[3] / "examples" / "sites" / "demo.yaml")
BUCKET = ["--bucket-s", "600"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> Path:
    """16 days of 10-minute simulator history for the demo site (Parquet, long format)."""
    from podwatch.simulators.history import generate_history

    out = tmp_path_factory.mktemp("history")
    generate_history(load_site(DEMO), days=16, resolution_s=600, seed=5, out_dir=out)
    return out


@pytest.fixture(scope="module")
def db(history, tmp_path_factory) -> Path:
    """A podwatch DuckDB file (storage schema) holding the same samples."""
    from podwatch.storage.ids import insert_named_samples
    from podwatch.storage.schema import ensure_schema

    path = tmp_path_factory.mktemp("db") / "podwatch.duckdb"
    con = duckdb.connect(str(path))
    ensure_schema(con)
    insert_named_samples(con, f"SELECT ts::TIMESTAMP AS ts, device, metric, value, quality, 0::UBIGINT AS seq "
                              f"FROM read_parquet('{history / 'samples.parquet'}') "
                              f"WHERE metric IN ('pdu.power_kw', 'meter.power_kw', 'cdu.heat_removed_kw')")
    con.close()
    return path


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_headroom_from_parquet_history(history):
    code, out = run("headroom", "--site", DEMO, "--history", str(history), *BUCKET, "--json")
    assert code == 0, out
    rows = {r["node"]: r for r in json.loads(out)}
    assert {"xfmr-1", "fdr-a", "fdr-b", "bus-m1-a", "bus-m2-b", "cdu-m1", "cdu-m2"} <= set(rows)
    assert not any(r["node_kind"] == "rack_feed" for r in rows.values())
    for r in rows.values():
        assert r["horizon"] == "7d"
        assert r["p50_kw"] <= r["p95_kw"] <= r["p99_kw"]
        assert r["headroom_kw"] == pytest.approx(r["usable_kw"] - r["p99_kw"])
    bus = rows["bus-m1-a"]
    assert bus["usable_kw"] == pytest.approx(1092.58, abs=0.1)  # 2000 A x 415 V x 0.95 x 80 %
    assert bus["provisioned_kw"] == pytest.approx(8 * 132.0)  # full A+B racks on one side
    assert bus["measured_peak_kw"] > 0.3 * bus["provisioned_kw"]  # failover load, not the half share


def test_plan_from_history_answers_with_limiting_resource(history):
    code, out = run("plan", "--site", DEMO, "--history", str(history), *BUCKET, "--rack-kw", "132", "--count", "4",
                    "--details")
    assert code == 0, out
    first = out.splitlines()[0]
    assert first.startswith(("YES: 4 rack(s) of 132 kW fit", "NO: 4 rack(s) of 132 kW do not fit"))
    assert "limiting resource:" in out and "new rack whips" in out
    code, out = run("plan", "--site", DEMO, "--history", str(history), *BUCKET, "--rack-kw", "132", "--count", "12",
                    "--module", "m1")
    assert code == 0, out
    assert out.startswith("NO: 12 rack(s) of 132 kW do not fit in module m1")
    assert "alternative:" in out and "short by" in out


def test_headroom_from_db_writes_forecasts_rows_and_plan_reads_them(db):
    code, out = run("headroom", "--site", DEMO, "--db", str(db), *BUCKET, "--write-db", str(db))
    assert code == 0, out
    assert "stored 82 forecasts rows" in out  # 41 nodes (incl. 32 rack feeds, 2 CDUs) x 2 horizons
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT node, node_kind, horizon, usable_kw, p99_kw, headroom_kw, stranded_kw, model_version "
                           "FROM forecasts ORDER BY node, horizon").fetchall()
    finally:
        con.close()
    assert len(rows) == 82
    kinds = {r[1] for r in rows}
    assert kinds == {"transformer", "feeder", "busway", "rack_feed", "cdu"}
    assert all(r[5] == pytest.approx(r[3] - r[4]) for r in rows)
    code, out = run("plan", "--site", DEMO, "--db", str(db), "--rack-kw", "100", "--count", "2")
    assert code == 0, out
    assert "margins use the 7d P99 peak forecasts" in out


def test_locked_db_is_reported_clearly(db, tmp_path):
    locked = tmp_path / "locked.duckdb"
    locked.write_bytes(db.read_bytes())
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
                               "print('ready', flush=True); sys.stdin.read()", str(locked)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"  # blocks until the lock is held
        code, out = run("headroom", "--site", DEMO, "--db", str(locked))
        assert code == 1
        assert "locked by another process" in out and "--history" in out
        assert "Traceback" not in out
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def test_bad_source_arguments_are_one_line_errors(history):
    code, out = run("headroom", "--site", DEMO)
    assert code == 1 and "exactly one data source" in out
    code, out = run("headroom", "--site", DEMO, "--history", str(history / "nope"))
    assert code == 1 and "no .parquet files" in out
    code, out = run("plan", "--site", DEMO, "--history", str(history), *BUCKET, "--rack-kw", "100", "--module", "m9")
    assert code == 2 and "unknown module 'm9'" in out


def test_report_writes_html_with_plots_and_risk_timeline(db, tmp_path):
    con = duckdb.connect(str(db))
    try:
        last = con.execute("SELECT max(ts) FROM samples").fetchall()[0][0]
        con.execute("DELETE FROM risk_scores")
        for i in range(6):
            con.execute("INSERT INTO risk_scores VALUES (?::TIMESTAMPTZ - INTERVAL (?) MINUTE, 'm1-r03', 300, ?, "
                        "'warning', '[]', 'test')", [last, 10 * (6 - i), 0.1 * i])
        con.execute("INSERT OR REPLACE INTO alerts VALUES ('a1', 'thermal_risk', 'm1-r03', 'warning', 'firing', '{}', "
                    "'{}', 0.5, ?::TIMESTAMPTZ - INTERVAL 20 MINUTE, ?::TIMESTAMPTZ - INTERVAL 15 MINUTE, NULL, ?)",
                    [last, last, last])
    finally:
        con.close()
    out_dir = tmp_path / "report"
    code, out = run("report", "--site", DEMO, "--db", str(db), *BUCKET, "--out", str(out_dir))
    assert code == 0, out
    page = (out_dir / "index.html").read_text()
    for png in ("site_power.png", "module_headroom.png", "risk_timeline.png"):
        assert (out_dir / png).read_bytes()[:4] == b"\x89PNG"
        assert png in page
    assert "Headroom and stranded power" in page and "bus-m1-a" in page


def test_eval_forecast_on_synthetic_days(tmp_path):
    code, out = run("eval", "forecast", "--site", DEMO, "--synthetic-days", "22", "--bucket-s", "1800",
                    "--step-h", "24", "--out", str(tmp_path))
    assert code == 0, out
    assert "[24h]" in out and "P95: pinball model" in out
    assert "[7d] skipped: history too short" in out  # 22 days: not enough for a 7-day backtest
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert "24h" in scores and 0 <= scores["24h"]["coverage_model"]["0.95"] <= 1
    assert (tmp_path / "backtest_scores.png").exists()


def test_forecast_prints_quantiles_and_exports_rows(history, tmp_path):
    import polars as pl

    out_file = tmp_path / "rows.parquet"
    code, out = run("forecast", "--site", DEMO, "--history", str(history), *BUCKET, "--out", str(out_file))
    assert code == 0, out
    assert "bus-m1-a" in out and "m1-r01/a" not in out  # rack feeds only with --rack-feeds
    rows = pl.read_parquet(out_file)
    assert rows.columns == ["generated_at", "node", "node_kind", "horizon", "usable_kw", "provisioned_kw",
                            "measured_peak_kw", "p50_kw", "p95_kw", "p99_kw", "headroom_kw", "stranded_kw",
                            "model_version"]
    assert rows.height == 82 and rows["p99_kw"].null_count() == 0


def test_database_without_samples_is_a_clear_error(tmp_path):
    from podwatch.storage.schema import ensure_schema

    path = tmp_path / "empty.duckdb"
    con = duckdb.connect(str(path))
    ensure_schema(con)
    con.close()
    code, out = run("headroom", "--site", DEMO, "--db", str(path))
    assert code == 1 and "no pdu.power_kw" in out


def test_headroom_reads_a_podwatch_export(db, tmp_path):
    from podwatch.storage.export import export_parquet

    con = duckdb.connect(str(db), read_only=True)
    try:
        export_parquet(con, tmp_path / "export", site="demo")
    finally:
        con.close()
    # other tables are there too (topology, forecasts, ...) and must be ignored
    assert (tmp_path / "export" / "topology" / "topo_racks.parquet").exists()
    assert (tmp_path / "export" / "forecasts.parquet").exists()
    code, out = run("headroom", "--site", DEMO, "--history", str(tmp_path / "export"), *BUCKET)
    assert code == 0, out
    assert "bus-m1-a" in out


def test_refresh_forecasts_in_the_owning_process(db, tmp_path):
    """What serve/demo call with their own connection: read, forecast, store in one go."""
    from podwatch.analytics.headroom import refresh_forecasts

    path = tmp_path / "owned.duckdb"
    path.write_bytes(db.read_bytes())
    site = load_site(DEMO)
    con = duckdb.connect(str(path))
    try:
        last = con.execute("SELECT max(ts) FROM samples").fetchall()[0][0]
        from datetime import timedelta, timezone

        now = last.replace(tzinfo=timezone.utc) + timedelta(minutes=10)
        report = refresh_forecasts(con, site, bucket_s=600, now=now)
        stored = con.execute("SELECT count(*), count(p99_kw) FROM forecasts "
                             "WHERE generated_at = ?", [now]).fetchall()[0]
        short = refresh_forecasts(con, site, bucket_s=600, history_days=3, now=now + timedelta(hours=1))
    finally:
        con.close()
    assert stored[0] == len(report.rows) == 82 and stored[1] == 82
    # three days are too few to forecast: headroom falls back to the measured peak, labelled
    bus = next(r for r in short.rows if r.node == "bus-m1-a" and r.horizon == "24h")
    assert bus.p99_kw is None and bus.measured_peak_kw is not None
    assert bus.headroom_kw == pytest.approx(bus.usable_kw - bus.measured_peak_kw)
    assert "no forecast" in bus.model_version


@pytest.mark.timeout(60)
async def test_headroom_refresher_runs_through_the_storage_database(db, tmp_path):
    """The periodic job `podwatch serve` can add, on storage's real Database (cursor per call)."""
    from types import SimpleNamespace

    from podwatch.analytics.headroom import HeadroomRefresher
    from podwatch.storage.db import Database

    path = tmp_path / "served.duckdb"
    path.write_bytes(db.read_bytes())
    database = Database(path)
    try:
        refresher = HeadroomRefresher(load_site(DEMO), bucket_s=600, history_days=10_000)
        report = await refresher.run_once(SimpleNamespace(db=database))
        count = await database.run(lambda cur: cur.execute(
            "SELECT count(*), count(DISTINCT node) FROM forecasts "
            "WHERE generated_at = (SELECT max(generated_at) FROM forecasts)").fetchall()[0])
    finally:
        database.close()
    assert report is not None and refresher.runs == 1
    assert count == (82, 41)


def test_report_into_an_existing_file_is_a_one_line_error(tmp_path):
    # was a FileExistsError traceback from Path.mkdir
    target = tmp_path / "report.html"
    target.write_text("")
    code, out = run("report", "--site", DEMO, "--history", str(tmp_path), "--out", str(target))
    assert code == 2 and "exists and is not a folder" in out and "Traceback" not in out


@pytest.mark.parametrize("days", ["0", "-1", "nan"])
def test_eval_forecast_with_no_synthetic_days_is_a_one_line_error(days):
    # 0 and -1 ended in "IndexError: index -1 is out of bounds"; nan in "cannot convert float NaN to integer"
    code, out = run("eval", "forecast", "--site", DEMO, "--synthetic-days", days)
    assert code == 2 and "--synthetic-days must be a number of days > 0" in out
