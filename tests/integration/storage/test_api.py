"""The HTTP API against a live uvicorn server on 127.0.0.1 (in-process), over a real DuckDB file."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from podwatch.storage.db import Database
from podwatch.storage.ids import insert_named_samples
from podwatch.storage.rollups import advance_rollups
from podwatch.storage.service import Service, ServiceSettings
from podwatch.storage.topology import load_topology_file

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[3]
PODWATCH = str(Path(sys.executable).parent / "podwatch")
TOKEN = "s3cret-token"
NOW = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)
START = NOW.replace(minute=0, second=0) - timedelta(hours=2)


def fill(db_path: Path) -> None:
    """Two hours of 10-s samples for two PDUs of rack m1-r01 and a CDU, plus analytics rows."""
    db = Database(db_path)
    con = db.connection
    load_topology_file(con, str(REPO / "examples/sites/demo.yaml"))
    insert_named_samples(con, """
        SELECT ?::TIMESTAMP + to_seconds(i * 10) AS ts, d.device, d.metric,
               d.base + (i % 6) AS value, 0 AS quality, i AS seq
        FROM range(720) r(i), (VALUES ('pdu-m1-r01-a', 'pdu.power_kw', 60.0), ('pdu-m1-r01-b', 'pdu.power_kw', 55.0),
                                      ('cdu-m1', 'cdu.supply_temp_c', 30.0), ('cdu-m1', 'cdu.flow_lpm', 900.0)) d(device, metric, base)
        """, [START])
    con.execute("INSERT INTO dedup_state SELECT device, max(seq), max(ts) FROM readings GROUP BY device")
    con.execute("INSERT INTO latest_values SELECT device, metric, max(ts), arg_max(value, ts), 0 FROM samples GROUP BY ALL")
    while advance_rollups(con, 120):
        pass
    con.execute("""INSERT INTO risk_scores VALUES
        (?::TIMESTAMP - INTERVAL 2 MINUTE, 'm1-r01', 300, 0.10, 'ok', '[]', 'v1'),
        (?::TIMESTAMP - INTERVAL 1 MINUTE, 'm1-r01', 300, 0.72, 'warning', '["return temp rising 0.4 K/min"]', 'v1'),
        (?::TIMESTAMP - INTERVAL 1 MINUTE, 'm1-r02', 300, 0.05, 'ok', '[]', 'v1')""", [NOW, NOW, NOW])
    con.execute("""INSERT INTO forecasts VALUES
        (?::TIMESTAMP - INTERVAL 1 HOUR, 'bus-m1-a', 'busway', '24h', 800, 1000, 600, 550, 600, 650, 150, 350, 'v1'),
        (?::TIMESTAMP, 'bus-m1-a', 'busway', '24h', 800, 1000, 610, 560, 610, 660, 140, 340, 'v1'),
        (?::TIMESTAMP, 'bus-m1-a', 'busway', '7d', 800, 1000, 640, 570, 640, 700, 100, 300, 'v1')""", [NOW, NOW, NOW])
    con.execute("""INSERT INTO alerts VALUES
        ('a1', 'rack_return_temp', 'm1-r01', 'critical', 'firing', '{"rack": "m1-r01", "site": "demo"}',
         '{"summary": "return 56 C"}', 56.0, ?, ?, NULL, ?),
        ('a2', 'cdu_flow_low', 'cdu-m1', 'warning', 'resolved', '{"cdu": "cdu-m1"}', '{"summary": "flow low"}', 400.0, ?, ?, ?, ?)""",
                [NOW, NOW, NOW, NOW, NOW, NOW, NOW])
    db.close()


@pytest.fixture
async def api(tmp_path):
    db_path = tmp_path / "api.duckdb"
    fill(db_path)
    service = Service(ServiceSettings(db=str(db_path), port=0, token=TOKEN, sql_timeout_s=0.5, sql_max_rows=50))
    await service.start()
    async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
        client.service = service
        yield client
    await service.stop()


def _ms(ts: datetime) -> int:
    return int(ts.replace(tzinfo=timezone.utc).timestamp() * 1000)


@pytest.mark.timeout(30)
async def test_series_rollup_plus_raw_tail_matches_raw_average(api):
    params = {"device": "pdu-m1-r01-a", "metric": "pdu.power_kw", "from": str(_ms(START)), "to": str(_ms(NOW)), "step": "15m"}
    rows = (await api.get("/api/series", params=params)).json()
    assert rows and set(rows[0]) == {"time", "device", "metric", "value"}
    assert len(rows) == 8  # 2 h in 15-min buckets (1-min rollups closed up to now-2min, raw for the tail)
    assert rows[0]["time"] == START.isoformat() + "Z"
    assert rows[0]["value"] == pytest.approx(62.5)  # base 60 + mean of 0..5
    # same answer from raw rows aggregated by the client
    raw = (await api.get("/api/series", params=params | {"step": "raw"})).json()
    assert len(raw) == 720
    first_bucket = [r["value"] for r in raw if r["time"] < (START + timedelta(minutes=15)).isoformat() + "Z"]
    assert rows[0]["value"] == pytest.approx(sum(first_bucket) / len(first_bucket))


@pytest.mark.timeout(30)
async def test_series_time_formats_rack_filter_and_csv(api):
    iso = {"from": (START - timedelta(hours=1)).isoformat() + "Z", "to": NOW.isoformat() + "+00:00"}
    by_iso = (await api.get("/api/series", params={"rack": "m1-r01", "metric": "pdu.power_kw", "step": "1m", **iso})).json()
    by_rel = (await api.get("/api/series", params={"rack": "m1-r01", "metric": "pdu.power_kw", "step": "1m",
                                                    "from": "now-4h", "to": "now"})).json()
    assert {r["device"] for r in by_iso} == {"pdu-m1-r01-a", "pdu-m1-r01-b"}
    assert by_iso == by_rel and len(by_iso) == 2 * 120
    csv_text = (await api.get("/api/series", params={"device": "cdu-m1", "step": "1h", "from": "now-3h", "format": "csv"})).text
    lines = csv_text.strip().splitlines()
    assert lines[0] == "time,device,metric,value" and len(lines) > 2
    bad = await api.get("/api/series", params={"device": "cdu-m1", "from": "yesterday-ish"})
    assert bad.status_code == 400 and "'from'" in bad.json()["error"]
    assert (await api.get("/api/series")).status_code == 400


@pytest.mark.timeout(30)
async def test_latest_topology_alerts_risk_headroom_forecasts(api):
    latest = (await api.get("/api/latest", params={"kind": "cdu"})).json()
    assert {(r["device"], r["metric"]) for r in latest} == {("cdu-m1", "cdu.supply_temp_c"), ("cdu-m1", "cdu.flow_lpm")}
    assert set(latest[0]) == {"time", "device", "metric", "value", "quality"}
    topo = (await api.get("/api/topology")).json()
    assert set(topo) == {"racks", "devices", "power", "cdus"} and len(topo["racks"]) == 16
    racks = (await api.get("/api/topology/racks")).json()
    assert racks[0]["rack"] == "m1-r01" and racks[0]["feed_a"]
    assert (await api.get("/api/topology/nonsense")).status_code == 400
    firing = (await api.get("/api/alerts", params={"state": "firing"})).json()
    assert [a["alert_id"] for a in firing] == ["a1"] and firing[0]["labels"]["rack"] == "m1-r01"
    assert firing[0]["annotations"]["summary"] == "return 56 C" and "time" in firing[0]
    risk_now = (await api.get("/api/risk")).json()
    assert [(r["rack"], r["level"]) for r in risk_now] == [("m1-r01", "warning"), ("m1-r02", "ok")]
    assert risk_now[0]["reasons"] == ["return temp rising 0.4 K/min"]
    history = (await api.get("/api/risk", params={"rack": "m1-r01", "from": "now-1h", "to": "now"})).json()
    assert [r["probability"] for r in history] == [0.10, 0.72]
    headroom = (await api.get("/api/headroom")).json()
    assert [(h["node"], h["horizon"], h["headroom_kw"]) for h in headroom] == [("bus-m1-a", "24h", 140), ("bus-m1-a", "7d", 100)]
    fc = (await api.get("/api/forecasts", params={"node": "bus-m1-a", "horizon": "24h"})).json()
    assert len(fc) == 2 and fc[0]["time"] < fc[1]["time"]



@pytest.mark.timeout(30)
async def test_alerts_by_alert_id_as_linked_from_notifications(api):
    # Notifications link to /api/alerts?alert_id=<id> (docs/alerts.md generator_url): that alert only.
    one = (await api.get("/api/alerts", params={"alert_id": "a2"})).json()
    assert [a["alert_id"] for a in one] == ["a2"] and one[0]["state"] == "resolved"
    assert (await api.get("/api/alerts", params={"alert_id": "nope"})).json() == []
    both = (await api.get("/api/alerts", params={"alert_id": "a1,a2", "state": "firing"})).json()
    assert [a["alert_id"] for a in both] == ["a1"]


REJECTED_SQL = [
    "INSERT INTO samples VALUES (now(), 'x', 'y', 1, 0, 1)",
    "UPDATE samples SET value = 0",
    "DELETE FROM samples",
    "ATTACH '/tmp/other.duckdb' AS other",
    "COPY samples TO '/tmp/leak.csv'",
    "PRAGMA database_size",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET threads = 1",
    "CALL pragma_version()",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_parquet('/tmp/x.parquet')",
    "SELECT * FROM read_json_auto('/tmp/x.json')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT (SELECT count(*) FROM read_csv('/etc/passwd')) AS n",
    "SELECT 1; DELETE FROM samples",
    "DROP TABLE samples",
]


@pytest.mark.timeout(30)
async def test_sql_guard_rejects_and_never_executes(api, tmp_path):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    leak = tmp_path / "leak.csv"
    for sql in [*REJECTED_SQL, f"COPY samples TO '{leak}'"]:
        response = await api.post("/api/sql", json={"sql": sql}, headers=auth)
        assert response.status_code in (400, 403), (sql, response.text)
        assert response.json()["error"], sql
        # also rejected through GET ?q=
        assert (await api.get("/api/sql", params={"q": sql}, headers=auth)).status_code in (400, 403), sql
    after = (await api.post("/api/sql", json={"sql": "SELECT count(*) AS n FROM samples"}, headers=auth)).json()[0]["n"]
    assert after == 2880
    assert not leak.exists()


@pytest.mark.timeout(30)
async def test_sql_auth_time_limit_row_cap(api):
    query = {"sql": "SELECT device, count(*) AS n FROM samples GROUP BY device ORDER BY device"}
    assert (await api.post("/api/sql", json=query)).status_code == 401
    assert (await api.post("/api/sql", json=query, headers={"Authorization": "Bearer wrong"})).status_code == 401
    assert (await api.get("/api/sql", params={"q": query["sql"]})).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ok = await api.post("/api/sql", json=query, headers=auth)
    assert ok.status_code == 200 and ok.json()[0] == {"device": "cdu-m1", "n": 1440}
    via_get = await api.get("/api/sql", params={"q": query["sql"], "format": "csv"}, headers=auth)
    assert via_get.text.splitlines()[:2] == ["device,n", "cdu-m1,1440"]
    slow = await api.post("/api/sql", json={"sql": "SELECT count(*) FROM range(100000000000) a, range(10) b"}, headers=auth)
    assert slow.status_code == 408 and "time limit" in slow.json()["error"]
    capped = await api.post("/api/sql", json={"sql": "SELECT * FROM samples"}, headers=auth)
    assert len(capped.json()) == 50 and capped.headers["x-podwatch-truncated"] == "true"
    # the server is still answering after the cancelled query
    assert (await api.get("/healthz")).status_code == 200


@pytest.mark.timeout(30)
async def test_metrics_healthz_openapi_pipeline(api):
    metrics = (await api.get("/metrics")).text
    assert "podwatch_duckdb_file_bytes" in metrics
    health = await api.get("/healthz")
    assert health.status_code == 200 and health.json() == {"ok": True, "problems": []}
    spec = (await api.get("/openapi.json")).json()
    for path in ("/api/series", "/api/latest", "/api/sql", "/api/risk", "/api/headroom", "/metrics", "/healthz"):
        assert path in spec["paths"], path
    pipeline = (await api.get("/api/pipeline")).json()
    assert pipeline[0]["running"] is False and pipeline[0]["db_bytes"] > 0


@pytest.mark.timeout(60)
async def test_podwatch_sql_goes_through_the_api_when_the_service_owns_the_file(api):
    db_path = api.service.settings.db
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    async def podwatch_sql(*args: str) -> tuple[int, str, str]:
        # asyncio subprocess: the server under test runs on this event loop
        proc = await asyncio.create_subprocess_exec(PODWATCH, "sql", "--db", db_path, *args, env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 50)
        return proc.returncode, out.decode(), err.decode()

    rc, out, err = await podwatch_sql("--format", "json", "SELECT device, count(*) AS n FROM samples GROUP BY device ORDER BY device")
    assert rc == 0, err
    assert json.loads(out)[0] == {"device": "cdu-m1", "n": 1440}
    rc, out, err = await podwatch_sql("DELETE FROM samples")
    assert rc != 0 and "403" in err and "Traceback" not in err


@pytest.mark.timeout(30)
async def test_wide_views_through_sql(api):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    rack = (await api.post("/api/sql", headers=auth, json={
        "sql": "SELECT rack, avg(feed_a_kw) AS a, avg(feed_b_kw) AS b, avg(total_kw) AS total FROM rack_power GROUP BY rack"})).json()
    assert rack == [{"rack": "m1-r01", "a": pytest.approx(62.5), "b": pytest.approx(57.5), "total": pytest.approx(120.0)}]
    loops = (await api.post("/api/sql", headers=auth, json={
        "sql": "SELECT cdu, count(*) AS n, avg(supply_temp_c) AS supply, avg(flow_lpm) AS flow FROM cdu_loops GROUP BY cdu"})).json()
    assert loops == [{"cdu": "cdu-m1", "n": 720, "supply": pytest.approx(32.5), "flow": pytest.approx(902.5)}]


@pytest.mark.timeout(30)
async def test_out_of_range_and_unknown_parameter_values_are_400_not_500(api):
    for params in ({"device": "cdu-m1", "from": "0", "to": "99999999999999999999"},
                   {"device": "cdu-m1", "from": "now-100000000y"},
                   {"device": "cdu-m1", "step": "99999999999999999999d"},
                   {"device": "cdu-m1", "format": "xml"}):
        response = await api.get("/api/series", params=params)
        assert response.status_code == 400, (params, response.text)
        assert response.json()["error"].startswith("parameter '"), response.text
    bad_state = await api.get("/api/alerts", params={"state": "fring"})
    assert bad_state.status_code == 400 and "'state'" in bad_state.json()["error"]
    assert (await api.get("/api/alerts", params={"state": "firing,resolved"})).status_code == 200


@pytest.mark.timeout(30)
async def test_raw_series_at_the_row_cap_says_it_was_truncated(api, monkeypatch):
    """step=raw stops at the row cap, oldest first: a panel then silently ended mid-range."""
    from podwatch.storage import queries

    monkeypatch.setattr(queries, "MAX_RAW_ROWS", 100)
    params = {"device": "pdu-m1-r01-a", "metric": "pdu.power_kw", "from": str(_ms(START)), "to": str(_ms(NOW)), "step": "raw"}
    capped = await api.get("/api/series", params=params)
    assert capped.status_code == 200 and len(capped.json()) == 100
    assert capped.headers.get("x-podwatch-truncated") == "true"
    as_csv = await api.get("/api/series", params={**params, "format": "csv"})
    assert as_csv.headers.get("x-podwatch-truncated") == "true" and len(as_csv.text.splitlines()) == 101
    whole = await api.get("/api/series", params={**params, "from": str(_ms(START + timedelta(minutes=115)))})
    assert 0 < len(whole.json()) < 100 and whole.headers.get("x-podwatch-truncated") == "false"


@pytest.mark.timeout(30)
async def test_bucketed_series_over_many_series_is_capped_in_total_and_says_so(api, monkeypatch):
    """Each series is capped at 100 000 buckets, but a module-wide query multiplies that by its
    series (a module at 10 s over a week: millions of rows in one answer); the total is capped too."""
    from podwatch.storage import queries

    monkeypatch.setattr(queries, "MAX_SERIES_ROWS", 50)
    params = {"module": "m1", "metric": "pdu.power_kw", "from": str(_ms(START)), "to": str(_ms(NOW)), "step": "1m"}
    capped = await api.get("/api/series", params=params)
    rows = capped.json()
    assert capped.status_code == 200 and len(rows) == 50 and capped.headers.get("x-podwatch-truncated") == "true"
    assert len({r["device"] for r in rows}) > 1 and rows == sorted(rows, key=lambda r: (r["time"], r["device"]))
    one_device = {k: v for k, v in params.items() if k != "module"} | {"device": "pdu-m1-r01-a", "step": "1h"}
    one = await api.get("/api/series", params=one_device)
    assert 0 < len(one.json()) < 50 and one.headers.get("x-podwatch-truncated") == "false"


@pytest.mark.timeout(30)
async def test_risk_history_with_a_reversed_range_is_400_like_series(api):
    reversed_range = {"rack": "m1-r01", "from": "now", "to": "now-1h"}
    for path in ("/api/risk", "/api/series"):
        response = await api.get(path, params=reversed_range)
        assert response.status_code == 400, (path, response.text)
        assert "'to' must be after 'from'" in response.json()["error"]
    assert len((await api.get("/api/risk", params={"rack": "m1-r01", "from": "now-1h"})).json()) == 2


@pytest.mark.timeout(30)
async def test_sql_values_without_a_python_or_csv_form_are_not_500(api):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    sql = "SELECT {'a': 1.5::DECIMAL(4,1)} AS s, 'infinity'::TIMESTAMP AS t"
    as_json = await api.post("/api/sql", json={"sql": sql}, headers=auth)
    assert as_json.status_code == 200, as_json.text
    assert as_json.json() == [{"s": {"a": 1.5}, "t": "infinity"}]
    as_csv = await api.post("/api/sql", params={"format": "csv"}, json={"sql": sql}, headers=auth)
    assert as_csv.status_code == 200, as_csv.text
    assert as_csv.text.splitlines() == ["s,t", '"{""a"": 1.5}",infinity']


@pytest.mark.timeout(30)
async def test_rack_power_uses_pdus_else_the_bms_and_never_both(tmp_path):
    """/api/rack_power: m1-r01 reads on both PDUs and its BMS (PDUs count, once), m1-r02 only
    through its BMS (a BMS-only rack still has IT power), m1-r03 on its A PDU only (twice the A
    side: normal sharing is even)."""
    db_path = tmp_path / "rack_power.duckdb"
    db = Database(db_path)
    con = db.connection
    load_topology_file(con, str(REPO / "examples/sites/demo.yaml"))
    start = NOW.replace(second=0) - timedelta(minutes=10)
    insert_named_samples(con, """
        SELECT ?::TIMESTAMP + to_seconds(i * 10) AS ts, d.device, d.metric, d.kw AS value, 0 AS quality, i AS seq
        FROM range(30) r(i), (VALUES ('pdu-m1-r01-a', 'pdu.power_kw', 60.0), ('pdu-m1-r01-b', 'pdu.power_kw', 55.0),
                                     ('bms-m1-r01', 'rack.power_kw', 116.0), ('bms-m1-r02', 'rack.power_kw', 90.0),
                                     ('pdu-m1-r03-a', 'pdu.power_kw', 40.0)) d(device, metric, kw)
        """, [start])
    con.execute("INSERT INTO latest_values SELECT device, metric, max(ts), arg_max(value, ts), 0 FROM samples GROUP BY ALL")
    db.close()
    service = Service(ServiceSettings(db=str(db_path), port=0))
    await service.start()
    try:
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as api:
            params = {"module": "m1", "from": str(_ms(start)), "to": str(_ms(start + timedelta(minutes=5))), "step": "1m"}
            rows = (await api.get("/api/rack_power", params=params)).json()
            assert rows and set(rows[0]) == {"time", "rack", "module", "power_kw", "source"}
            first = {r["rack"]: (r["power_kw"], r["source"]) for r in rows if r["time"] == start.isoformat() + "Z"}
            assert first == {"m1-r01": (115.0, "pdu"), "m1-r02": (90.0, "bms"), "m1-r03": (80.0, "pdu_one_side")}
            assert len(rows) == 3 * 5
            latest = (await api.get("/api/rack_power", params={"latest": "true", "rack": "m1-r01,m1-r02"})).json()
            assert {r["rack"]: (r["power_kw"], r["source"]) for r in latest} == {"m1-r01": (115.0, "pdu"),
                                                                                  "m1-r02": (90.0, "bms")}
            assert (await api.get("/api/rack_power", params=params | {"step": "raw"})).status_code == 400
            assert (await api.get("/api/rack_power", params={"rack": "nope"})).json() == []
    finally:
        await service.stop()
