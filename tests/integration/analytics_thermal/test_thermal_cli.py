"""`podwatch train thermal`, `podwatch analyze`, `podwatch eval thermal` end to end on small
simulated histories and a real DuckDB file."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from podwatch.cli import app
from podwatch.simulators.history import generate_history
from podwatch.simulators.scenario import Scenario
from podwatch.site import load_site

SITE = str(Path(__file__).parents[3] / "examples/sites/demo.yaml")

pytestmark = pytest.mark.slow


def invoke(*args):
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Trained from two recorded histories (`--history`): a pump trip and a leak."""
    work = tmp_path_factory.mktemp("cli")
    site = load_site(SITE)
    faults = {"trip": {"kind": "pump_failure", "target": "cdu-m1", "onset_s": 900, "pumps": [1, 2],
                       "standby_takeover": False},
              "leak": {"kind": "leak", "target": "cdu-m2", "onset_s": 600, "magnitude": 9.0}}
    histories = []
    for i, (name, fault) in enumerate(faults.items()):
        scenario = Scenario.parse({"name": name, "faults": [fault]}, name, site)
        histories += ["--history", str(generate_history(site, days=1 / 24, resolution_s=10, scenarios=[scenario],
                                                        seed=40 + i, out_dir=work / name).out_dir)]
    code, out = invoke("train", "thermal", "--site", SITE, *histories, "--max-iter", "30",
                       "--model-dir", str(work / "model"))
    assert code == 0, out
    assert "saved to" in out
    return work / "model"


def test_train_writes_model_and_metadata(model_dir):
    meta = json.loads((model_dir / "thermal.json").read_text())
    assert meta["kind"] == "thermal-hgb" and meta["horizon_s"] == 300
    assert meta["sites"] == [SITE] and meta["positives"] > 0 and meta["runs"] == ["trip", "leak"]
    assert (model_dir / "thermal.joblib").stat().st_size > 1000


def test_analyze_history_writes_risk_scores(model_dir, tmp_path):
    site = load_site(SITE)
    scenario = Scenario.parse({"name": "trip", "faults": [{"kind": "pump_failure", "target": "cdu-m2", "onset_s": 500,
                                                           "pumps": [1, 2], "standby_takeover": False}]}, "t", site)
    hist = generate_history(site, days=560 / 86400, resolution_s=5, scenarios=[scenario], seed=8,
                            out_dir=tmp_path / "hist")
    db = tmp_path / "risk.duckdb"
    code, out = invoke("analyze", "--site", SITE, "--history", str(hist.samples_path), "--write-db", str(db),
                       "--model-dir", str(model_dir))
    assert code == 0, out
    assert "wrote 16 risk score(s)" in out
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT rack, probability, level, reasons FROM risk_scores ORDER BY rack").fetchall()
    con.close()
    levels = {rack: (p, level, json.loads(reasons)) for rack, p, level, reasons in rows}
    assert all(levels[f"m2-r0{i}"][0] >= 0.5 for i in range(1, 9))
    assert all(levels[f"m1-r0{i}"][1] == "ok" for i in range(1, 9))
    assert levels["m2-r01"][2] and levels["m2-r01"][2][0] != "all signals within healthy ranges"


def test_user_errors_are_one_line(tmp_path):
    code, out = invoke("analyze", "--site", SITE, "--history", str(tmp_path), "--model-dir", str(tmp_path))
    assert code != 0 and "no Parquet sample files" in out and "Traceback" not in out
    code, out = invoke("analyze", "--site", SITE, "--model-dir", str(tmp_path))
    assert code != 0 and "exactly one of --db FILE or --history" in out
    code, out = invoke("eval", "thermal", "--site", SITE, "--model-dir", str(tmp_path / "none"))
    assert code != 0 and "podwatch train thermal" in out


def test_analyze_without_a_model_uses_the_physics_risk(tmp_path):
    site = load_site(SITE)
    scenario = Scenario.parse({"name": "trip", "faults": [{"kind": "pump_failure", "target": "cdu-m1", "onset_s": 500,
                                                           "pumps": [1, 2], "standby_takeover": False}]}, "t", site)
    hist = generate_history(site, days=540 / 86400, resolution_s=5, scenarios=[scenario], seed=12,
                            out_dir=tmp_path / "hist")
    code, out = invoke("analyze", "--site", SITE, "--history", str(hist.out_dir), "--model-dir", str(tmp_path / "none"))
    assert code == 0, out
    assert "physics-only risk" in out
    assert out.splitlines()[2].startswith("m1-"), out



def test_analyze_scores_racks_that_have_no_liquid_sensors(tmp_path):
    """A retrofit hall (examples/sites/rtu-gateways.yaml): PDUs on the racks, temperatures and
    flow only at the CDUs. Three of CDU_1's four pumps trip: row 1's racks are at risk, with their
    return estimated from the CDU and PDUs; row 2 is fine."""
    retrofit = str(Path(SITE).parent / "rtu-gateways.yaml")
    site = load_site(retrofit)
    scenario = Scenario.parse({"name": "trip", "faults": [{"kind": "pump_failure", "target": "CDU_1", "onset_s": 400,
                                                           "pumps": [1, 2, 3], "standby_takeover": False}]}, "t", site)
    hist = generate_history(site, days=480 / 86400, resolution_s=5, scenarios=[scenario], seed=5,
                            out_dir=tmp_path / "hist")
    db = tmp_path / "risk.duckdb"
    code, out = invoke("analyze", "--site", retrofit, "--history", str(hist.out_dir), "--write-db", str(db),
                       "--model-dir", str(tmp_path / "none"))
    assert code == 0, out
    assert f"wrote {len(site.racks)} risk score(s)" in out
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("SELECT rack, probability, reasons FROM risk_scores").fetchall()
    con.close()
    risk = {rack: (p, json.loads(reasons)) for rack, p, reasons in rows}
    row1 = [r.id for r in site.racks if r.cdu == "CDU_1"]
    row2 = [r.id for r in site.racks if r.cdu == "CDU_2"]
    assert all(risk[r][0] >= 0.5 for r in row1), {r: risk[r][0] for r in row1}
    assert all(risk[r][0] < 0.3 for r in row2), {r: risk[r][0] for r in row2}
    assert any("estimated from the CDU and PDUs" in reason for reason in risk[row1[0]][1]), risk[row1[0]][1]

def test_eval_prints_figures_and_goals(model_dir, tmp_path):
    code, out = invoke("eval", "thermal", "--site", SITE, "--model-dir", str(model_dir), "--per-kind", "1",
                       "--hours", "0.5", "--fault-free-hours", "0.5", "--work-dir", str(tmp_path / "ev"),
                       "--json", str(tmp_path / "report.json"))
    assert code == 0, out
    for text in ("recall at >= 2 min lead", "median lead", "false alarms on fault-free runs", "goals:",
                 "per rack-day", "over all breaches (ceiling", "per fault kind:", "alarms on fault runs:"):
        assert text in out
    assert "simulating 12 held-out runs" in out  # 6 kinds + 1 fault-free + 3 compound + 2 worn pumps, one site
    assert "pump_degradation" in out
    meta = json.loads((model_dir / "thermal.json").read_text())
    assert "false_alarms_per_rack_day" in meta["scores"]
    assert {"recall_ceiling_at_2min", "unconfirmed_alarms", "by_kind"} <= set(meta["scores"])
    assert json.loads((tmp_path / "report.json").read_text())["goals"]


def test_analyze_reads_and_writes_a_podwatch_duckdb_file(model_dir, tmp_path):
    from podwatch.storage.ids import insert_named_samples
    from podwatch.storage.schema import ensure_schema

    site = load_site(SITE)
    scenario = Scenario.parse({"name": "restrict", "faults": [{"kind": "flow_restriction", "target": "m1-r05",
                                                               "onset_s": 400, "magnitude": 0.8}]}, "t", site)
    hist = generate_history(site, days=600 / 86400, resolution_s=5, scenarios=[scenario], seed=9,
                            out_dir=tmp_path / "hist")
    db = tmp_path / "site.duckdb"
    con = duckdb.connect(str(db))
    ensure_schema(con)
    insert_named_samples(con, f"SELECT ts::TIMESTAMP AS ts, device::VARCHAR AS device, metric::VARCHAR AS metric, "
                              f"value, quality, row_number() OVER () AS seq FROM read_parquet('{hist.samples_path}')")
    con.close()
    code, out = invoke("analyze", "--site", SITE, "--db", str(db), "--model-dir", str(model_dir), "--last-hours", "1")
    assert code == 0, out
    assert out.splitlines()[2].startswith("m1-r05"), out  # highest risk first, after the header
    con = duckdb.connect(str(db), read_only=True)
    (n, top), = con.execute("SELECT count(*), arg_max(rack, probability) FROM risk_scores").fetchall()
    con.close()
    assert n == 16 and top == "m1-r05"


def test_eval_on_scenario_files_and_recorded_histories(model_dir, tmp_path):
    """An operator's own scenario (here the shipped pump-failure one) and a recorded history are
    evaluated instead of the generated held-out set; the model's stored scores stay those of
    the standard set."""
    before = json.loads((model_dir / "thermal.json").read_text()).get("scores")
    scenario = Path(SITE).parents[1] / "scenarios" / "pump-failure.yaml"
    site = load_site(SITE)
    leak = Scenario.parse({"name": "leak", "faults": [{"kind": "leak", "target": "cdu-m2", "onset_s": 1200,
                                                       "magnitude": 9.0}]}, "leak", site)
    recorded = generate_history(site, days=1 / 24, resolution_s=10, scenarios=[leak], seed=77,
                                out_dir=tmp_path / "recorded").out_dir
    code, out = invoke("eval", "thermal", "--scenario", str(scenario), "--history", str(recorded),
                       "--model-dir", str(model_dir), "--work-dir", str(tmp_path / "ev"),
                       "--json", str(tmp_path / "report.json"))
    assert code == 0, out
    assert "simulating 1 held-out runs (+ 1 recorded)" in out
    assert "  pump-failure:" in out and "breach(es)" in out
    report = json.loads((tmp_path / "report.json").read_text())
    kinds = {k["kind"] for k in report["by_kind"]}
    assert {"pump_failure", "leak"} <= kinds, kinds
    assert json.loads((model_dir / "thermal.json").read_text()).get("scores") == before


def test_eval_scenario_errors_name_the_file_and_target(model_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nfaults:\n  - kind: pump_failure\n    target: cdu-nowhere\n    onset_s: 60\n")
    code, out = invoke("eval", "thermal", "--scenario", str(bad), "--model-dir", str(model_dir),
                       "--work-dir", str(tmp_path / "ev"))
    assert code != 0 and "bad.yaml" in out and "cdu-nowhere" in out and "Traceback" not in out
    code, out = invoke("eval", "thermal", "--history", str(tmp_path), "--site", SITE, "--site", SITE,
                       "--model-dir", str(model_dir))
    assert code != 0 and "exactly one --site" in out
