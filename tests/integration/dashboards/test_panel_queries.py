"""Every dashboard query, as Grafana's Infinity datasource sends it, against the real podwatch
API (`podwatch.storage.service.Service`: uvicorn on 127.0.0.1, a real DuckDB file, its sink on
the real Tansu broker): each returns rows with the columns and types its panel expects.

Where the data comes from: `fill_demo_site()` writes one hour of 10-s readings for every
device of examples/sites/demo.yaml (every catalog metric of the device's kind) into the
storage tables the sink writes (`samples`, `latest_values`), the topology through the
storage stage's own loader, and rows in the pinned analytics tables (`risk_scores` for every
rack, `forecasts` for every power node, `alerts`). Set PODWATCH_DASHBOARDS_API_URL to run the
same check against an API filled some other way (e.g. the simulator end to end).
"""

from __future__ import annotations

import asyncio
import copy
import math
import os
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from podwatch.dashboards.build import dashboard_docs
from podwatch.dashboards.check import check_prometheus_names, run_checks
from podwatch.health import REGISTRY
from podwatch.metrics import CATALOG
from podwatch.procs import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[3]
DEMO_SITE = REPO / "examples" / "sites" / "demo.yaml"


def _base_value(metric: str) -> tuple[float, float]:
    """A plausible level and swing per metric, from its unit suffix."""
    if metric.endswith(".running"):
        return 1.0, 0.0
    if metric.endswith(("leak_state", ".status")):
        return 0.0, 0.0
    for suffix, level, swing in (("return_temp_c", 42.0, 3.0), ("_temp_c", 32.0, 1.5), ("dew_point_c", 12.0, 0.5),
                                 ("delta_t_c", 9.0, 1.0), ("setpoint_c", 32.0, 0.0), ("approach_c", 4.0, 0.3),
                                 ("meter.power_kw", 2600.0, 200.0), ("_kw", 60.0, 10.0), ("_kva", 65.0, 10.0),
                                 ("_kvar", 20.0, 5.0), ("_lpm", 120.0, 10.0), ("_kpa", 150.0, 10.0),
                                 ("_pct", 60.0, 10.0), ("_v", 240.0, 2.0), ("_a", 90.0, 10.0), ("_hz", 60.0, 0.02),
                                 ("_kwh", 100000.0, 0.0), ("power_factor", 0.95, 0.01)):
        if metric.endswith(suffix):
            return level, swing
    return 1.0, 0.0


def fill_demo_site(db_path: Path, now: datetime, minutes: int = 60, step_s: int = 10,
                   site_file: Path = DEMO_SITE) -> dict[str, int]:
    from podwatch.storage.db import Database
    from podwatch.storage.topology import load_topology_file

    db = Database(db_path)
    try:
        con = db.connection
        load_topology_file(con, str(site_file))
        con.execute("CREATE TEMP TABLE metric_levels (kind VARCHAR, metric VARCHAR, level DOUBLE, swing DOUBLE)")
        con.executemany("INSERT INTO metric_levels VALUES (?, ?, ?, ?)",
                        [(m.kind, m.name, *_base_value(m.name)) for m in CATALOG.values()])
        start = now - timedelta(minutes=minutes)
        ticks = minutes * 60 // step_s
        from podwatch.storage.ids import insert_named_samples

        insert_named_samples(con, f"""
            SELECT ?::TIMESTAMP + to_seconds(i * {step_s}) AS ts, d.device, m.metric,
                   m.level + m.swing * sin(i / 30.0 + (hash(d.device) % 100) / 10.0) AS value,
                   0 AS quality, i AS seq
            FROM range({ticks}) r(i)
            JOIN topo_devices d ON TRUE
            JOIN metric_levels m ON m.kind = d.kind""", [start])
        con.execute("INSERT INTO dedup_state SELECT device, max(seq), max(ts) FROM readings GROUP BY device")
        con.execute("INSERT INTO latest_values SELECT device, metric, max(ts), arg_max(value, ts), 0 "
                    "FROM samples GROUP BY ALL")
        racks = [r[0] for r in con.execute("SELECT rack FROM topo_racks").fetchall()]
        for minutes_ago in (30, 20, 10, 1):
            for n, rack in enumerate(racks):
                probability = round(0.02 + 0.9 * (n == 3) * (1 - minutes_ago / 40), 3)
                level = "warning" if probability > 0.5 else "ok"
                reasons = '["return temp rising 0.4 K/min", "flow 12 % below design"]' if level != "ok" else "[]"
                con.execute("INSERT INTO risk_scores VALUES (?, ?, 300, ?, ?, ?, 'test-v1')",
                            [now - timedelta(minutes=minutes_ago), rack, probability, level, reasons])
        nodes = con.execute("SELECT node, kind, usable_kw, nameplate_kw FROM topo_power").fetchall()
        for hours_ago in (3, 2, 1, 0):
            for node, kind, usable_kw, nameplate_kw in nodes:
                usable_kw = usable_kw or 100.0
                p99 = 0.7 * usable_kw
                for horizon in ("24h", "7d"):
                    con.execute("INSERT INTO forecasts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'test-v1')",
                                [now - timedelta(hours=hours_ago), node, kind, horizon, usable_kw,
                                 nameplate_kw or usable_kw, 0.65 * usable_kw, 0.6 * usable_kw, 0.67 * usable_kw, p99,
                                 usable_kw - p99, (nameplate_kw or usable_kw) - p99])
        con.execute("""INSERT INTO alerts VALUES
            ('a1', 'rack_return_temp_high', 'm1-r04', 'critical', 'firing', '{"rack": "m1-r04", "site": "demo"}',
             '{"summary": "m1-r04 coolant return 56 C"}', 56.0, ?, ?, NULL, ?),
            ('a2', 'cdu_flow_low', 'cdu-m2', 'warning', 'pending', '{"cdu": "cdu-m2"}',
             '{"summary": "cdu-m2 flow low"}', 400.0, ?, NULL, NULL, ?),
            ('a3', 'pdu_overload', 'pdu-m1-r02-a', 'warning', 'resolved', '{}', '{"summary": "over 80 %"}', 90.0,
             ?, ?, ?, ?)""", [now, now, now, now, now, now, now, now, now])
        return {"samples": con.execute("SELECT count(*) FROM samples").fetchone()[0], "racks": len(racks),
                "nodes": len(nodes)}
    finally:
        db.close()


class ServiceThread:
    """The real `Service` on its own event loop in a thread, so one live API serves every
    test of this module and the (synchronous) checker can call it directly."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.url = ""
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="podwatch-api", daemon=True)

    async def _main(self) -> None:
        from podwatch.storage.service import Service

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        service = Service(self.settings)
        try:
            await asyncio.wait_for(service.start(), 30)
            self.url = service.url
        except BaseException as exc:  # reported to the test thread
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await asyncio.wait_for(service.stop(), 30)

    def start(self) -> str:
        self._thread.start()
        if not self._ready.wait(40):
            raise AssertionError("podwatch service did not start within 40 s")
        if self.error is not None:
            raise self.error
        return self.url

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(40)


@pytest.fixture(scope="module")
def podwatch_api(tmp_path_factory, tansu_broker):
    """The base URL of a live podwatch API holding data for every panel."""
    external = os.environ.get("PODWATCH_DASHBOARDS_API_URL")
    if external:
        yield external
        return
    from podwatch.storage.service import ServiceSettings

    db_path = tmp_path_factory.mktemp("dashboards") / "site.duckdb"
    now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    counts = fill_demo_site(db_path, now)
    assert counts["samples"] > 100_000 and counts["racks"] == 16
    # A collector's health record, exported on /metrics the way in-process collectors do.
    REGISTRY.component("dashboards_test_collector", "test").inc("errors", 2)
    runner = ServiceThread(ServiceSettings(db=str(db_path), kafka=tansu_broker, port=0,
                                           group_id=f"dashboards-{uuid.uuid4().hex[:8]}"))
    try:
        yield runner.start()
    finally:
        runner.stop()
        # Leave the process-wide registry as we found it (HealthRegistry has no per-key removal).
        with REGISTRY._lock:
            REGISTRY._components.pop(("dashboards_test_collector", "test"), None)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_every_panel_query_returns_typed_rows(podwatch_api):
    results = run_checks(podwatch_api)
    failures = [f"{r.dashboard_uid} / {r.panel_title} [{r.ref_id}] {r.url}: {r.problem}" for r in results if not r.ok]
    assert not failures, "\n".join(failures)
    assert {r.dashboard_uid for r in results} == set(dashboard_docs())
    by_title = {}
    for r in results:
        by_title.setdefault(r.panel_title, []).append(r)
    # Variables resolved to real values, as Grafana selects them on load.
    rack_urls = [r.url for r in by_title["Breach probability (${rack})"]]
    assert rack_urls[0].startswith("/api/risk?rack=m1-r01&from=")
    assert "cdu=cdu-m1&" in by_title["Pump speed"][0].url
    # Panels carry real data, not one token row.
    assert by_title["Rack power, ${module} (kW per rack per minute)"][0].rows >= 8 * 50
    assert by_title["Thermal risk by rack (latest)"][0].rows == 16
    assert by_title["Active alerts"][0].rows == 2  # firing + pending, not the resolved one
    busway_a = by_title["A feed: rack PDUs on the A busway (stacked)"][0]
    busway_b = by_title["B feed: rack PDUs on the B busway (stacked)"][0]
    assert busway_a.rows > 0 and busway_a.rows == busway_b.rows  # the -a$/-b$ filters split the PDUs evenly


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_checker_fails_a_panel_without_data_and_prometheus_names_are_exported(podwatch_api):
    docs = copy.deepcopy(dashboard_docs())
    cdu = docs["podwatch-cdu"]
    target = next(t for p in cdu["panels"] if p.get("title") == "Reservoir level" for t in p["targets"])
    target["url"] = target["url"].replace("cdu.reservoir_level_pct", "cdu.no_such_metric_pct")
    results = run_checks(podwatch_api, {"podwatch-cdu": cdu})
    broken = [r for r in results if not r.ok]
    assert [(r.panel_title, r.problem) for r in broken] == [("Reservoir level", "no rows")]

    prom = check_prometheus_names(podwatch_api)
    assert prom and all(r.ok for r in prom), [(r.panel_title, r.problem) for r in prom if not r.ok]
    pipeline = copy.deepcopy(dashboard_docs()["podwatch-pipeline"])
    nested = [p for row in pipeline["panels"] for p in row.get("panels") or []]  # the collapsed row
    for panel in pipeline["panels"] + nested:
        for target in panel.get("targets") or []:
            if "expr" in target:
                target["expr"] = target["expr"].replace("podwatch_ingest_lag_messages", "podwatch_ingest_lag_msgs")
    renamed = [r for r in check_prometheus_names(podwatch_api, {"podwatch-pipeline": pipeline}) if not r.ok]
    assert [r.problem for r in renamed] == ["not on /metrics: podwatch_ingest_lag_msgs"]


@pytest.mark.slow
def test_cli_check_prints_the_table_and_exits_zero(podwatch_api):
    out = subprocess.run([sys.executable, "-m", "podwatch", "dashboards", "check", "--api", podwatch_api],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    total = len(run_checks(podwatch_api)) + len(check_prometheus_names(podwatch_api))
    assert f"{total}/{total} queries ok" in out.stdout
    assert "podwatch-rack-thermal" in out.stdout and "FAIL" not in out.stdout
    unreachable = subprocess.run([sys.executable, "-m", "podwatch", "dashboards", "check", "--api",
                                  f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 1 and "cannot reach the podwatch API" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_level_table_is_sane():
    assert _base_value("cdu.pump1.running") == (1.0, 0.0)
    assert _base_value("rack.liquid_return_temp_c")[0] > _base_value("rack.liquid_supply_temp_c")[0]
    assert not math.isnan(_base_value("pdu.power_kw")[0])


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_site_power_panels_read_the_transformer_meters_only_on_a_site_with_feeder_meters(tmp_path):
    """reference-10mw meters its substation transformer and both feeders. The site-power and
    overhead panels summed every meter.power_kw series: facility power counted the IT load twice
    more (overhead ratio ~2.2 instead of ~1.1) and the feeders were drawn as 'site power'."""
    from podwatch.dashboards.build import panel_queries
    from podwatch.storage.service import ServiceSettings

    site_file = REPO / "examples" / "sites" / "reference-10mw.yaml"
    db_path = tmp_path / "reference.duckdb"
    fill_demo_site(db_path, datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0), minutes=5,
                   site_file=site_file)
    runner = ServiceThread(ServiceSettings(db=str(db_path), port=0))
    api = runner.start()
    try:
        results = {(r.panel_title, r.ref_id): r for r in run_checks(api, {"podwatch-site-overview":
                                                                           dashboard_docs()["podwatch-site-overview"]})}
        import httpx

        meters = {}
        for title in ("Site power vs usable capacity and 24 h forecast (${node})", "PUE-style overhead (meter / IT power)",
                      "Facility power and IT power"):
            check = results[(title, "A")]
            assert check.ok, (title, check.problem)
            meters[title] = {row["device"] for row in httpx.get(api + check.url, timeout=10).json()}
        assert meters == {title: {"meter-sub"} for title in meters}  # never meter-fdr-a / meter-fdr-b
        assert {q.panel_title for q in panel_queries({"podwatch-site-overview":
                                                       dashboard_docs()["podwatch-site-overview"]})} >= set(meters)
    finally:
        runner.stop()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_module_and_cdu_panels_do_not_depend_on_the_demo_naming(tmp_path):
    """rtu-gateways spells its ids the operator's way: PDUs 'PDU-R1.01-A' (upper-case side), busways
    'BW-1A' (no module id inside), CDU 'CDU_1' polled through device 'CDU_1-ctl'. The module and CDU
    dashboards matched ids by the demo's pattern (device =~ '-a$', node =~ '-${module}-',
    device=${cdu}) and showed nothing there."""
    from podwatch.storage.db import Database
    from podwatch.storage.service import ServiceSettings

    site_file = REPO / "examples" / "sites" / "rtu-gateways.yaml"
    db_path = tmp_path / "rtu.duckdb"
    now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    fill_demo_site(db_path, now, minutes=5, site_file=site_file)
    db = Database(db_path)
    try:  # fill_demo_site gives every power node a forecast row, as `podwatch headroom --write-db` would
        assert db.connection.execute("SELECT count(*) FROM forecasts WHERE node_kind = 'busway'").fetchone()[0] > 0
    finally:
        db.close()
    runner = ServiceThread(ServiceSettings(db=str(db_path), port=0))
    api = runner.start()
    try:
        docs = dashboard_docs()
        results = run_checks(api, {uid: docs[uid] for uid in ("podwatch-module", "podwatch-cdu")})
        failures = [f"{r.dashboard_uid} / {r.panel_title} [{r.ref_id}] {r.url}: {r.problem}" for r in results
                    if not r.ok and "rack coolant" not in r.panel_title.lower()]  # no rack sensors on this site
        assert not failures, "\n".join(failures)
        by_title = {r.panel_title: r for r in results}
        feed_a = by_title["A feed: rack PDUs on the A busway (stacked)"]
        feed_b = by_title["B feed: rack PDUs on the B busway (stacked)"]
        assert feed_a.rows > 0 and feed_a.rows == feed_b.rows  # 24 PDUs a side in hall3_row-1
        assert by_title["Busways: peak and forecast vs usable capacity"].rows == 4  # BW-1A, BW-1B x 24h, 7d
        assert by_title["Pump speed"].rows > 0
    finally:
        runner.stop()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_it_power_panels_answer_on_a_site_whose_racks_report_only_through_a_bms(tmp_path):
    """mqtt-only: no PDUs, the racks publish `rack.power_kw` through their BMS. The IT side of the
    overhead panels and the rack power heatmap read PDUs (or only the BMS) and were empty; they
    read /api/rack_power now, which takes the PDUs where they read and the BMS otherwise."""
    from podwatch.storage.db import Database
    from podwatch.storage.service import ServiceSettings

    db_path = tmp_path / "mqtt.duckdb"
    now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
    fill_demo_site(db_path, now, minutes=5, site_file=REPO / "examples" / "sites" / "mqtt-only.yaml")
    db = Database(db_path)
    try:
        racks = db.connection.execute("SELECT count(*) FROM topo_racks").fetchone()[0]
        assert db.connection.execute("SELECT count(*) FROM topo_devices WHERE kind = 'pdu'").fetchone()[0] == 0
    finally:
        db.close()
    runner = ServiceThread(ServiceSettings(db=str(db_path), port=0))
    api = runner.start()
    try:
        docs = dashboard_docs()
        results = run_checks(api, {uid: docs[uid] for uid in ("podwatch-site-overview", "podwatch-rack-thermal")})
        by_panel = {(r.panel_title, r.ref_id): r for r in results}
        stat = by_panel[("PUE-style overhead (meter / IT power)", "B")]
        assert stat.ok and stat.rows == racks, stat.problem
        it_rows = by_panel[("Facility power and IT power", "B")].rows
        assert it_rows >= racks * 5 and it_rows % racks == 0  # 5 min at 1 min: 5-6 buckets of every rack
        heatmap = next(r for (title, _), r in by_panel.items() if title.startswith("Rack power,"))
        assert heatmap.ok and heatmap.rows > 0, heatmap.problem
    finally:
        runner.stop()
