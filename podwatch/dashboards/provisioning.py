"""Grafana provisioning files for podwatch: `podwatch dashboards export DIR`.

Layout (mount `provisioning/` at /etc/grafana/provisioning and `dashboards/` at
`DASHBOARDS_PATH` in a Grafana container; see docs/dashboards.md):

    DIR/provisioning/datasources/podwatch.yaml   Infinity datasource (uid podwatch-api) -> the podwatch API
                                                 [+ Prometheus (uid podwatch-prometheus) when given]
    DIR/provisioning/dashboards/podwatch.yaml    file provider: folder "podwatch" <- DASHBOARDS_PATH
    DIR/dashboards/<uid>.json                    one file per dashboard

Output is deterministic (sorted keys, fixed indentation): two exports are byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from podwatch.dashboards.build import dashboard_docs
from podwatch.dashboards.infinity import INFINITY_TYPE, INFINITY_UID, PROMETHEUS_UID
from podwatch.errors import PodwatchError

DEFAULT_API_URL = "http://127.0.0.1:8080"
DASHBOARDS_PATH = "/var/lib/grafana/dashboards/podwatch"
FOLDER_UID = "podwatch"
FOLDER_TITLE = "podwatch"


def _check_url(name: str, url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise PodwatchError(f"{name} must start with http:// or https://, got {url!r}")
    return url.rstrip("/")


def datasource_specs(api_url: str = DEFAULT_API_URL, prometheus_url: str | None = None,
                     name: str = "podwatch", uid: str = INFINITY_UID) -> list[dict]:
    """Grafana datasource JSON (the same keys serve the HTTP API and provisioning YAML).
    The Infinity datasource's URL is the API base: panel URLs are relative to it, and
    `allowedHosts` keeps its queries on the podwatch API."""
    api_url = _check_url("--api-url", api_url)
    specs = [{
        "name": name,
        "type": INFINITY_TYPE,
        "uid": uid,
        "access": "proxy",
        "url": api_url,
        "isDefault": False,
        "jsonData": {"allowedHosts": [api_url], "timeoutInSeconds": 30},
    }]
    if prometheus_url:
        specs.append({
            "name": f"{name} Prometheus",
            "type": "prometheus",
            "uid": PROMETHEUS_UID,
            "access": "proxy",
            "url": _check_url("--prometheus-url", prometheus_url),
            "isDefault": False,
            "jsonData": {"httpMethod": "POST"},
        })
    return specs


def dashboard_json_text(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def export(directory: str | Path, api_url: str = DEFAULT_API_URL, prometheus_url: str | None = None,
           dashboards_path: str = DASHBOARDS_PATH, datasource_name: str = "podwatch",
           datasource_uid: str = INFINITY_UID) -> list[Path]:
    """Write the provisioning tree under `directory`; returns the files written."""
    root = Path(directory)
    datasources = datasource_specs(api_url, prometheus_url, datasource_name, datasource_uid)
    provider = {
        "apiVersion": 1,
        "providers": [{
            "name": "podwatch",
            "orgId": 1,
            "folder": FOLDER_TITLE,
            "folderUid": FOLDER_UID,
            "type": "file",
            "disableDeletion": False,
            "allowUiUpdates": False,
            "updateIntervalSeconds": 30,
            "options": {"path": dashboards_path, "foldersFromFilesStructure": False},
        }],
    }
    files: dict[Path, str] = {
        root / "provisioning" / "datasources" / "podwatch.yaml":
            yaml.safe_dump({"apiVersion": 1, "datasources": [{**d, "editable": False} for d in datasources]},
                           sort_keys=False),
        root / "provisioning" / "dashboards" / "podwatch.yaml": yaml.safe_dump(provider, sort_keys=False),
    }
    for uid, doc in dashboard_docs().items():
        files[root / "dashboards" / f"{uid}.json"] = dashboard_json_text(doc)
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise PodwatchError(f"cannot write the provisioning files under {root}: {exc}") from None
    return list(files)
