"""The push client against a fake Grafana over real HTTP on 127.0.0.1 (no Grafana server can
be installed here): create-if-missing, idempotent upserts, 401/403/404, 412 conflicts,
time-outs, retries of 503/429 only."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from podwatch.dashboards.build import DASHBOARD_UIDS, dashboard_docs
from podwatch.dashboards.grafana_client import (
    GrafanaAuthError,
    GrafanaConflict,
    GrafanaNotFound,
    GrafanaSettings,
    GrafanaUnavailable,
    push,
)
from podwatch.dashboards.provisioning import datasource_specs
from podwatch.procs import free_port
from tests.integration.dashboards.fake_grafana import FakeGrafana

pytestmark = pytest.mark.integration

DOCS = list(dashboard_docs().values())


@pytest.fixture
def grafana():
    with FakeGrafana(token="t0ken") as fake:
        yield fake


def settings(url: str, token: str = "t0ken", **kw) -> GrafanaSettings:
    return GrafanaSettings(url=url, token=token, **{"backoff_initial_s": 0.01, "backoff_max_s": 0.05, **kw})


def do_push(fake: FakeGrafana, api_url: str = "http://podwatch:8080", overwrite: bool = False, **kw):
    return push(settings(fake.url, **kw), DOCS, datasource_specs(api_url, "http://prom:9090"), "podwatch",
                "podwatch", overwrite=overwrite)


def test_push_creates_folder_datasources_dashboards_then_changes_nothing(grafana):
    first = do_push(grafana)
    assert ("folder", "podwatch", "created") in first.actions
    assert ("datasource", "podwatch-api", "created") in first.actions
    assert ("datasource", "podwatch-prometheus", "created") in first.actions
    assert sorted(uid for kind, uid, action in first.actions if kind == "dashboard" and action == "created v1") \
        == sorted(DASHBOARD_UIDS.values())
    assert grafana.datasources["podwatch-api"]["url"] == "http://podwatch:8080"
    assert grafana.datasources["podwatch-api"]["type"] == "yesoreyeram-infinity-datasource"
    assert all(d["folderUid"] == "podwatch" for d in grafana.dashboards.values())
    stored = grafana.dashboards["podwatch-cdu"]["dashboard"]
    assert stored["panels"] == dashboard_docs()["podwatch-cdu"]["panels"]

    grafana.requests.clear()
    second = do_push(grafana)
    assert ("folder", "podwatch", "exists") in second.actions
    assert ("datasource", "podwatch-api", "unchanged") in second.actions
    assert {a for k, _, a in second.actions if k == "dashboard"} == {"unchanged v1"}
    assert ("POST", "/api/dashboards/db") not in grafana.requests  # nothing written the second time
    assert all(d["dashboard"]["version"] == 1 for d in grafana.dashboards.values())


def test_changed_api_url_updates_the_datasource(grafana):
    do_push(grafana, api_url="http://old:8080")
    report = do_push(grafana, api_url="http://new:8080")
    assert ("datasource", "podwatch-api", "updated") in report.actions
    assert grafana.datasources["podwatch-api"]["url"] == "http://new:8080"
    assert grafana.datasources["podwatch-api"]["jsonData"]["allowedHosts"] == ["http://new:8080"]


def test_dashboard_edited_in_grafana_is_replaced_on_next_push_with_its_version(grafana):
    do_push(grafana)
    grafana.edit_in_ui("podwatch-module", title="someone renamed it")
    report = do_push(grafana)
    assert ("dashboard", "podwatch-module", "updated v3") in report.actions
    assert grafana.dashboards["podwatch-module"]["dashboard"]["title"] == "podwatch / Module"


def test_wrong_token_is_a_clear_auth_error_without_retries(grafana):
    with pytest.raises(GrafanaAuthError, match=r"rejected the token \(401") as info:
        do_push(grafana, token="wrong")
    assert "--token" in str(info.value)
    assert len(grafana.requests) == 1  # 401 is not retried


def test_forbidden_names_the_missing_role(grafana):
    grafana.fail_next[("GET", "/api/folders/podwatch")] = [403]
    with pytest.raises(GrafanaAuthError, match=r"403 Forbidden.*Editor or Admin"):
        do_push(grafana)
    assert len(grafana.requests) == 1


def test_wrong_base_url_is_reported_as_not_found(grafana):
    with pytest.raises(GrafanaNotFound, match=r"404.*Grafana root URL"):
        push(settings(grafana.url + "/not-grafana"), DOCS, datasource_specs(), "podwatch", "podwatch")


def test_concurrent_edit_between_read_and_write_is_a_412_version_conflict(grafana):
    do_push(grafana)
    docs = dashboard_docs()
    docs["podwatch-cdu"]["description"] = "a new description from podwatch"
    # Someone saves the dashboard in Grafana after our GET and before our POST.
    real_save = grafana.save_dashboard

    def save_after_someone_else(body):
        if body["dashboard"]["uid"] == "podwatch-cdu" and not body["overwrite"]:
            stored = grafana.dashboards["podwatch-cdu"]["dashboard"]
            grafana.dashboards["podwatch-cdu"]["dashboard"] = {**stored, "title": "edited by ops",
                                                               "version": stored["version"] + 1}
        return real_save(body)

    grafana.save_dashboard = save_after_someone_else
    with pytest.raises(GrafanaConflict, match=r"412 version-mismatch.*--overwrite") as info:
        push(settings(grafana.url), list(docs.values()), datasource_specs(), "podwatch", "podwatch")
    assert info.value.grafana_status == "version-mismatch"
    assert grafana.dashboards["podwatch-cdu"]["dashboard"]["title"] == "edited by ops"  # their edit kept

    report = push(settings(grafana.url), list(docs.values()), datasource_specs(), "podwatch", "podwatch",
                  overwrite=True)
    assert ("dashboard", "podwatch-cdu", "updated v3") in report.actions
    assert grafana.dashboards["podwatch-cdu"]["dashboard"]["description"] == "a new description from podwatch"


def test_title_taken_by_another_dashboard_is_a_412_name_exists(grafana):
    do_push(grafana)
    grafana.dashboards["someone-elses"] = {"dashboard": {"uid": "someone-elses", "title": "podwatch / CDU v2",
                                                         "id": 99, "version": 1}, "folderUid": "podwatch"}
    docs = dashboard_docs()
    docs["podwatch-cdu"]["title"] = "podwatch / CDU v2"
    with pytest.raises(GrafanaConflict, match=r"412 name-exists.*same title"):
        push(settings(grafana.url), [docs["podwatch-cdu"]], [], "podwatch", "podwatch")


def test_timeout_is_retried_then_reported(grafana):
    grafana.delay_s[("GET", "/api/folders/podwatch")] = 10.0  # far beyond the client's time-out
    started = time.monotonic()
    with pytest.raises(GrafanaUnavailable, match=r"timed out after 0.2 s.*2 attempt"):
        do_push(grafana, timeout_s=0.2, retries=1)
    assert time.monotonic() - started < 3.0
    assert grafana.requests.count(("GET", "/api/folders/podwatch")) == 2


def test_503_and_429_are_retried_then_succeed(grafana):
    grafana.fail_next[("POST", "/api/dashboards/db")] = [503, 429]
    report = do_push(grafana, retries=3)
    assert report.retries == 2
    assert len(grafana.dashboards) == len(DASHBOARD_UIDS)


def test_5xx_that_persists_gives_up_after_the_retries(grafana):
    grafana.fail_next[("GET", "/api/folders/podwatch")] = [502, 502, 502]
    with pytest.raises(GrafanaUnavailable, match=r"HTTP 502.*3 attempt"):
        do_push(grafana, retries=2)


def test_nothing_listening_is_a_network_error():
    port = free_port()
    with pytest.raises(GrafanaUnavailable, match=r"network error: ConnectError"):
        push(settings(f"http://127.0.0.1:{port}", retries=1), DOCS, [], "podwatch", "podwatch")


@pytest.mark.parametrize("url, token, problem", [
    ("grafana:3000", "t", "must start with http"),
    ("http://grafana:3000", "  ", "token is empty"),
])
def test_bad_settings_are_rejected_by_name(url, token, problem):
    with pytest.raises(ValueError, match=problem):
        GrafanaSettings(url=url, token=token)


@pytest.mark.slow
def test_cli_push_prints_actions_and_errors_without_traceback(grafana):
    cmd = [sys.executable, "-m", "podwatch", "dashboards", "push", "--grafana-url", grafana.url,
           "--api-url", "http://podwatch:8080"]
    ok = subprocess.run([*cmd, "--token", "t0ken"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "dashboard  podwatch-site-overview" in ok.stdout and "created v1" in ok.stdout
    bad = subprocess.run([*cmd, "--token", "nope"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "401" in bad.stderr and "Traceback" not in bad.stderr
