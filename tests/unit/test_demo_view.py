"""The demo's live view renders what the API answered, including partial answers."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from podwatch.demo import Demo, DemoOptions

ROOT = Path(__file__).parents[2]


def render_text(snapshot: dict) -> str:
    demo = Demo(DemoOptions(site=ROOT / "examples/sites/demo.yaml", scenario=None, ui=True))
    demo.state.last = snapshot
    console = Console(record=True, width=200)
    console.print(demo.render())
    return console.export_text()


def test_view_renders_before_the_api_answers():
    text = render_text({})
    assert "podwatch demo" in text and "51 silent" in text


def test_view_shows_risk_reasons_headroom_and_firing_alerts_first():
    text = render_text({
        "pipeline": [{"points_total": 1234, "points_per_s": 99.0, "lag_messages": 0, "dead_letters": 0}],
        "risk": [{"rack": "m1-r01", "probability": 0.93, "level": "critical", "reasons": ["flow 0.31 L/min/kW (design 1.20)"]},
                 {"rack": "m2-r01", "probability": 0.01, "level": "ok", "reasons": []}],
        "headroom": [{"node": "bus-m1-a", "node_kind": "busway", "horizon": "24h", "usable_kw": 1093.0, "p99_kw": None,
                      "measured_peak_kw": 502.0, "headroom_kw": 591.0, "stranded_kw": 0.0}],
        "alerts": [{"alert_id": "a", "state": "pending", "severity": "warning", "rule": "delta_t_high", "target": "m1-r02",
                    "annotations": {"summary": "later"}},
                   {"alert_id": "b", "state": "firing", "severity": "critical", "rule": "pump_redundancy_lost",
                    "target": "cdu-m1", "annotations": {"summary": "cdu-m1: pumps 1, 2 down, no standby"}}],
    })
    assert "1,234" in text and "flow 0.31 L/min/kW" in text
    assert "502 measured" in text and "591" in text
    assert text.index("pump_redundancy_lost") < text.index("delta_t_high")


def test_demo_announces_the_scenario_faults_in_onset_order():
    demo = Demo(DemoOptions(site=ROOT / "examples/sites/demo.yaml", scenario=ROOT / "examples/scenarios/demo.yaml",
                            ui=True))
    demo._announce_faults()
    times = [t for t, _ in demo._pending_announcements]
    assert times == sorted(times)
    assert any(text.startswith("injecting pump failure on cdu-m1") for _, text in demo._pending_announcements)
    assert any(text.startswith("clearing pump failure") for _, text in demo._pending_announcements)


def test_a_broken_scenario_stops_the_demo_before_any_child_starts(tmp_path):
    from typer.testing import CliRunner

    from podwatch.cli import app

    bad = tmp_path / "bad.yaml"
    bad.write_text("faults:\n  - kind: pump_failure\n    target: cdu-m1\n    onset_s: -5\n")
    result = CliRunner().invoke(app, ["demo", "--no-ui", "--scenario", str(bad), "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2, result.output
    assert "onset_s" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "d" / "logs").exists()  # nothing was started


def test_the_log_announces_alerts_that_fired_and_their_resolution_not_pending_ones_that_cleared():
    demo = Demo(DemoOptions(site=ROOT / "examples/sites/demo.yaml", scenario=None, ui=False))
    said: list[str] = []
    demo.say = said.append
    demo.sim_seconds = lambda: 0.0

    def tick(*alerts):
        demo.state.last = {"alerts": list(alerts)}
        demo.tick_events()

    pending = {"alert_id": "p", "rule": "delta_t_high", "target": "m1-r01", "severity": "warning", "state": "pending"}
    real = {"alert_id": "f", "rule": "delta_t_high", "target": "m1-r02", "severity": "warning", "state": "firing",
            "fired_at": "2026-11-22T10:00:00Z"}
    tick(pending, real)
    tick({**pending, "state": "resolved", "fired_at": None}, {**real, "state": "resolved"})
    assert said == ["alert firing: delta_t_high on m1-r02 (warning)", "alert resolved: delta_t_high on m1-r02 (warning)"]


def test_the_default_story_is_retold_for_another_site_and_each_site_keeps_its_own_data(tmp_path):
    demo = Demo(DemoOptions(site=ROOT / "examples/sites/demo.yaml", data_dir=tmp_path, ui=False))
    assert demo.opts.scenario.name == "demo.yaml" and demo.data == tmp_path.resolve()
    retrofit = Demo(DemoOptions(site=ROOT / "examples/sites/rtu-gateways.yaml", data_dir=tmp_path, ui=False))
    assert retrofit.data == tmp_path.resolve() / "sites" / "hall_3.retrofit"  # not the demo site's file or model
    [fault] = retrofit.scenario.faults
    assert (fault.kind, fault.target, fault.pumps, fault.onset_s) == ("pump_failure", "CDU_1", [1, 2], 60)
    assert fault.standby_takeover is False and fault.duration_s == 240


def test_a_site_without_coolant_telemetry_gets_no_model_and_says_why(tmp_path):
    demo = Demo(DemoOptions(site=ROOT / "examples/sites/minimal.yaml", data_dir=tmp_path, ui=False))
    said: list[str] = []
    demo.say = said.append
    demo.ensure_model()  # returns at once: no training subprocess for a site with PDUs only
    assert said and "no coolant telemetry" in said[0]
    assert not demo.model_dir.exists()


def test_each_demo_run_starts_from_an_empty_duckdb_file(tmp_path):
    """A kept file mixed two runs' samples, scores and alerts, and its stored offsets belonged to the
    previous run's broker (serve logged a recreated topic at ERROR). A file in use is left alone."""
    import os

    import duckdb
    import pytest

    from podwatch.errors import PodwatchError
    from podwatch.storage.db import owner_file

    demo = Demo(DemoOptions(site=ROOT / "examples/sites/demo.yaml", scenario=None, ui=False, data_dir=tmp_path))
    demo.db_path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(demo.db_path)) as con:
        con.execute("CREATE TABLE ingest_offsets AS SELECT 'podwatch.telemetry.v1' AS topic, 0 AS partition, 9999 AS next_offset")
    owner_file(demo.db_path).write_text('{"pid": %d, "api_url": null}' % os.getpid())  # alive: this process
    with pytest.raises(PodwatchError, match="in use by process"):
        demo.fresh_database()
    assert demo.db_path.exists()
    owner_file(demo.db_path).write_text('{"pid": 999999999, "api_url": null}')  # a previous run, gone
    demo.fresh_database()
    assert not demo.db_path.exists() and not owner_file(demo.db_path).exists()
