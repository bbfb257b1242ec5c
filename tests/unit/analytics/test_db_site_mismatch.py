"""A DuckDB file holds one site: the analytics commands refuse a site file of another site
before reading or writing anything (analyze used to write another site's risk scores into it)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from podwatch.cli import app

SITES = Path(__file__).resolve().parents[3] / "examples" / "sites"


@pytest.fixture
def demo_db(tmp_path) -> Path:
    from podwatch.storage.schema import ensure_schema

    path = tmp_path / "demo.duckdb"
    con = duckdb.connect(str(path))
    ensure_schema(con)
    con.execute("INSERT INTO podwatch_meta VALUES ('site', 'demo')")
    con.close()
    return path


@pytest.mark.parametrize("args", [
    ["analyze"],
    ["headroom"],
    ["plan", "--rack-kw", "132", "--count", "4"],
    ["report", "--out", "REPORT"],
    ["forecast"],
])
def test_a_site_file_of_another_site_is_refused(demo_db, tmp_path, args):
    args = [str(tmp_path / "r") if a == "REPORT" else a for a in args]
    result = CliRunner().invoke(app, [*args, "--site", str(SITES / "edge-5mw.yaml"), "--db", str(demo_db)])
    assert result.exit_code != 0
    message = result.output.strip()
    assert "'demo'" in message and "'edge5'" in message and "Traceback" not in message
    con = duckdb.connect(str(demo_db), read_only=True)
    assert con.execute("SELECT count(*) FROM risk_scores").fetchone()[0] == 0


def test_analyze_history_into_another_sites_file_is_refused(demo_db, tmp_path):
    result = CliRunner().invoke(app, ["analyze", "--site", str(SITES / "edge-5mw.yaml"), "--history", str(tmp_path),
                                      "--write-db", str(demo_db)])
    assert result.exit_code != 0 and "'edge5'" in result.output


def test_headroom_into_another_sites_file_is_refused(demo_db, tmp_path):
    result = CliRunner().invoke(app, ["headroom", "--site", str(SITES / "edge-5mw.yaml"), "--history", str(tmp_path),
                                      "--write-db", str(demo_db)])
    assert result.exit_code != 0 and "'edge5'" in result.output
    con = duckdb.connect(str(demo_db), read_only=True)
    assert con.execute("SELECT count(*) FROM forecasts").fetchone()[0] == 0
