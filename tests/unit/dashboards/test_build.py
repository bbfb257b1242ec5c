"""Dashboards as code: the export loads back through the SDK's models, is byte-identical across
runs, and every query is well formed (variables defined, filter columns selected, the API
endpoints and metric names real)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from grafana_foundation_sdk.models.dashboard import Dashboard as DashboardModel

from podwatch.dashboards.build import DASHBOARD_UIDS, dashboard_docs, panel_queries, prometheus_queries
from podwatch.dashboards.check import check_rows, interpolate
from podwatch.dashboards.infinity import INFINITY_TYPE, RowFilter
from podwatch.dashboards.provisioning import datasource_specs, export
from podwatch.errors import PodwatchError
from podwatch.metrics import CATALOG

API_ENDPOINTS = {"/api/series", "/api/latest", "/api/rack_power", "/api/topology/racks", "/api/topology/cdus", "/api/topology/power",
                 "/api/alerts", "/api/risk", "/api/headroom", "/api/forecasts", "/api/pipeline"}


def read_tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_is_byte_identical_across_runs_and_loads_back_through_the_sdk(tmp_path):
    export(tmp_path / "one", api_url="http://podwatch:8080")
    export(tmp_path / "two", api_url="http://podwatch:8080")
    one, two = read_tree(tmp_path / "one"), read_tree(tmp_path / "two")
    assert one == two
    assert sorted(one) == sorted([
        "provisioning/datasources/podwatch.yaml", "provisioning/dashboards/podwatch.yaml",
        *[f"dashboards/{uid}.json" for uid in DASHBOARD_UIDS.values()]])
    for uid in DASHBOARD_UIDS.values():
        raw = json.loads(one[f"dashboards/{uid}.json"])
        model = DashboardModel.from_json(raw)
        assert model.uid == uid
        assert model.title and model.title.startswith("podwatch / ")
        assert len(model.panels or []) == len(raw["panels"]) >= 5
        assert raw["schemaVersion"] == 41
        # a round trip through the model keeps the document
        assert json.loads(json.dumps(model.to_json(), default=lambda o: o.to_json())).get("uid") == uid


def test_provisioning_yaml_is_what_grafana_reads(tmp_path):
    export(tmp_path, api_url="http://podwatch:8080/", prometheus_url="http://prom:9090",
           dashboards_path="/dash")
    ds = yaml.safe_load((tmp_path / "provisioning/datasources/podwatch.yaml").read_text())
    assert ds["apiVersion"] == 1
    infinity, prometheus = ds["datasources"]
    assert infinity | {"jsonData": None} == {"name": "podwatch", "type": INFINITY_TYPE, "uid": "podwatch-api",
                                            "access": "proxy", "url": "http://podwatch:8080", "isDefault": False,
                                            "editable": False, "jsonData": None}
    assert infinity["jsonData"]["allowedHosts"] == ["http://podwatch:8080"]
    assert (prometheus["type"], prometheus["uid"], prometheus["url"]) == ("prometheus", "podwatch-prometheus",
                                                                          "http://prom:9090")
    provider = yaml.safe_load((tmp_path / "provisioning/dashboards/podwatch.yaml").read_text())["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == "/dash"
    assert provider["folderUid"] == "podwatch"


def test_bad_api_url_is_rejected_by_flag_name():
    with pytest.raises(PodwatchError, match="--api-url must start with http"):
        datasource_specs("podwatch:8080")


def test_uids_are_the_documented_stable_ones():
    assert list(dashboard_docs()) == ["podwatch-site-overview", "podwatch-module", "podwatch-rack-thermal",
                                      "podwatch-cdu", "podwatch-pipeline"]


@pytest.mark.parametrize("uid", list(DASHBOARD_UIDS.values()))
def test_every_panel_has_a_query_and_unique_id(uid):
    doc = dashboard_docs()[uid]
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    assert panels
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel.get("targets"), f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in ("${site}", "${prometheus}")


def test_every_query_uses_a_real_endpoint_defined_variables_and_known_metrics():
    docs = dashboard_docs()
    queries = panel_queries(docs)
    assert len(queries) >= 40
    for q in queries:
        doc = docs[q.dashboard_uid]
        defined = {v["name"] for v in doc["templating"]["list"]} | {"__from", "__to"}
        path, _, query = q.url_template.partition("?")
        assert path in API_ENDPOINTS, q
        used = set(re.findall(r"\$\{(\w+)\}", q.url_template + "".join(f.value for f in q.filters)))
        assert used <= defined, (q.panel_title, used - defined)
        for f in q.filters:  # Infinity filters the frame it extracted: the column must be selected
            assert f.column in q.expected_columns, (q.panel_title, f.column)
        for part in query.split("&"):
            key, _, value = part.partition("=")
            if key == "metric":
                unknown = [m for m in value.split(",") if m not in CATALOG]
                assert not unknown, (q.panel_title, unknown)
        if path == "/api/series":
            assert "from=${__from}" in query and "to=${__to}" in query
    assert {q.dashboard_uid for q in queries} == set(DASHBOARD_UIDS.values())


def test_site_module_rack_variables_exist():
    docs = dashboard_docs()
    names = {uid: [v["name"] for v in doc["templating"]["list"]] for uid, doc in docs.items()}
    assert names["podwatch-rack-thermal"] == ["site", "module", "rack"]
    assert names["podwatch-module"][:2] == ["site", "module"]
    assert all(n[0] == "site" for n in names.values())


def test_prometheus_panels_use_podwatch_metrics():
    exprs = [q.expr for q in prometheus_queries()]
    assert any("podwatch_component_errors_total" in e for e in exprs)
    assert any("podwatch_ingest_lag_messages" in e for e in exprs)


@pytest.mark.parametrize("rows, columns, problem", [
    ([], {"time": "timestamp"}, "no rows"),
    ([{"time": "2026-01-01T00:00:00Z", "value": 1.5}], {"time": "timestamp", "value": "number"}, ""),
    ([{"time": 1767225600000, "value": 2}], {"time": "timestamp", "value": "number"}, ""),
    ([{"time": "yesterday", "value": 1}], {"time": "timestamp"}, "not timestamp"),
    ([{"value": 1}], {"time": "timestamp"}, "column 'time' missing in 1 of 1 rows"),
    ([{"value": None}, {"value": None}], {"value": "number"}, "empty in all 2 rows"),
    ([{"value": True}], {"value": "number"}, "not number"),
    ([{"value": "1.5"}], {"value": "number"}, ""),  # CSV text cell
    ([{"device": 3}], {"device": "string"}, "not string"),
])
def test_check_rows(rows, columns, problem):
    result = check_rows(rows, columns, from_csv=True)
    assert (problem in result) if problem else result == ""


def test_interpolate_like_grafana():
    assert interpolate("/api/series?rack=${rack}&m=$module&from=${__from}&x=${nope}",
                       {"rack": "m1-r01", "module": "m1", "__from": "5"}) \
        == "/api/series?rack=m1-r01&m=m1&from=5&x=${nope}"


@pytest.mark.parametrize("flt, row, matches", [
    (RowFilter("device", "=~", "-a$"), {"device": "pdu-m1-r01-a"}, True),
    (RowFilter("device", "=~", "-a$"), {"device": "pdu-m1-r01-b"}, False),
    (RowFilter("module", "==", "m1"), {"module": "m1"}, True),
    (RowFilter("module", "==", "m1"), {"module": None}, False),
])
def test_row_filter(flt, row, matches):
    assert flt.matches(row) is matches


def test_panel_queries_unpack_as_four_tuples_and_accept_builders():
    from podwatch.dashboards.build import build_dashboards

    from_builders = panel_queries(build_dashboards())
    assert from_builders == panel_queries()
    uid, title, url, columns = from_builders[0]
    assert (uid, title, url) == ("podwatch-site-overview", "variable $node", "/api/topology/power")
    assert columns == {"node": "string", "kind": "string"}


@pytest.mark.slow
def test_cli_export_writes_the_tree(tmp_path):
    out = subprocess.run([sys.executable, "-m", "podwatch", "dashboards", "export", str(tmp_path),
                          "--api-url", "http://podwatch:8080"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "dashboards" / "podwatch-site-overview.json").exists()
    bad = subprocess.run([sys.executable, "-m", "podwatch", "dashboards", "export", str(tmp_path),
                          "--api-url", "podwatch:8080"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--api-url must start with http" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_docs_panel_reference_matches_the_code():
    from pathlib import Path

    from podwatch.dashboards.build import markdown_inventory

    text = (Path(__file__).parents[3] / "docs" / "dashboards.md").read_text()
    begin, end = "<!-- BEGIN podwatch dashboards list -->\n", "<!-- END podwatch dashboards list -->"
    assert begin in text and end in text
    documented = text.split(begin, 1)[1].split(end, 1)[0]
    assert documented == markdown_inventory(), "regenerate the section with `podwatch dashboards list`"
    assert "No Grafana server could be installed" in text


def test_second_site_datasource_gets_its_own_uid():
    spec = datasource_specs("http://site-b:8080", name="podwatch site-b", uid="podwatch-site-b")[0]
    assert (spec["uid"], spec["name"], spec["url"]) == ("podwatch-site-b", "podwatch site-b", "http://site-b:8080")
