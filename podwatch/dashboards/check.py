"""Run every dashboard query against a live podwatch API, as Grafana + Infinity would send it:
`podwatch dashboards check --api URL`.

For each dashboard, query variables are resolved first, in order, exactly as Grafana does on
load (run the variable's query, apply its filter, dedupe, sort A-Z, select the first value);
then each panel target's URL gets `${__from}`/`${__to}` as epoch ms and the variables'
values, is fetched, its Infinity filter applied, and the rows are checked against the
columns the panel selects: every row has every column, every column has at least one value,
and every value has the column's type. A query with no rows fails (a panel without data),
except where an empty answer is itself correct (no alert firing).

Prometheus panels are checked by name: every podwatch metric their PromQL uses must be
exported on the API's /metrics.
"""

from __future__ import annotations

import csv
import io
import re
import time
from dataclasses import dataclass
from datetime import datetime

import httpx

from podwatch.dashboards.build import PanelQuery, dashboard_docs, panel_queries, prometheus_queries
from podwatch.errors import PodwatchError

_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass
class QueryCheck:
    dashboard_uid: str
    panel_title: str
    ref_id: str
    url: str
    rows: int
    ok: bool
    problem: str = ""


def interpolate(template: str, values: dict[str, str]) -> str:
    """Grafana's `${name}` / `$name` interpolation; unknown names are left as they are."""
    def sub(match: re.Match) -> str:
        name = match[1] or match[2]
        return values.get(name, match[0])
    return _VAR.sub(sub, template)


def _is_timestamp(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
            return True
        except ValueError:
            return False
    return False


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        try:
            float(value)
            return True
        except ValueError:
            return False
    return False


TYPE_CHECKS = {
    "timestamp": _is_timestamp,
    "timestamp_epoch": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "number": _is_number,
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool) or v in ("true", "false"),
}


def check_rows(rows: list[dict], expected_columns: dict[str, str], from_csv: bool = False) -> str:
    """'' when the rows fit the columns, else the first problem in words."""
    if not rows:
        return "no rows"
    for column, type_ in expected_columns.items():
        is_type = TYPE_CHECKS[type_]
        if from_csv and type_ == "number":
            is_type = _is_number  # CSV cells are text; Infinity converts them
        missing = sum(1 for row in rows if column not in row)
        if missing:
            return f"column {column!r} missing in {missing} of {len(rows)} rows"
        values = [row[column] for row in rows if row[column] not in (None, "")]
        if not values:
            return f"column {column!r} is empty in all {len(rows)} rows"
        bad = [v for v in values if not is_type(v)]
        if bad:
            return f"column {column!r}: {len(bad)} value(s) are not {type_}, e.g. {bad[0]!r}"
    return ""


def fetch_rows(client: httpx.Client, url: str, from_csv: bool) -> list[dict]:
    response = client.get(url)
    if response.status_code != 200:
        raise PodwatchError(f"HTTP {response.status_code}: {response.text[:200]}")
    if from_csv:
        return list(csv.DictReader(io.StringIO(response.text)))
    body = response.json()
    if not isinstance(body, list):
        raise PodwatchError(f"expected a JSON array of rows, got {type(body).__name__}")
    return body


def _variable_values(rows: list[dict], column: str) -> list[str]:
    return sorted({str(row[column]) for row in rows if row.get(column) not in (None, "")})


def run_checks(api_url: str, docs: dict[str, dict] | None = None, range_s: float = 6 * 3600,
               now_ms: int | None = None, timeout_s: float = 10.0,
               transport: httpx.BaseTransport | None = None) -> list[QueryCheck]:
    """Every Infinity query of every dashboard against `api_url`; one QueryCheck each."""
    docs = docs if docs is not None else dashboard_docs()
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    builtins = {"__from": str(int(now_ms - range_s * 1000)), "__to": str(now_ms)}
    results: list[QueryCheck] = []
    with httpx.Client(base_url=api_url.rstrip("/"), timeout=timeout_s, transport=transport) as client:
        for uid, doc in docs.items():
            values = dict(builtins)
            for query in panel_queries({uid: doc}):
                url = interpolate(query.url_template, values)
                filters = [type(f)(f.column, f.op, interpolate(f.value, values)) for f in query.filters]
                try:
                    rows = [r for r in fetch_rows(client, url, query.csv) if all(f.matches(r) for f in filters)]
                except (httpx.HTTPError, PodwatchError, ValueError) as exc:
                    results.append(QueryCheck(uid, query.panel_title, query.ref_id, url, 0, False,
                                              f"request failed: {exc}"))
                    continue
                problem = check_rows(rows, query.expected_columns, query.csv)
                if problem == "no rows" and query.may_be_empty:
                    problem = ""
                if query.panel_title.startswith("variable $") and not problem:
                    name = query.panel_title.removeprefix("variable $")
                    column = next(iter(query.expected_columns))
                    options = _variable_values(rows, column)
                    values[name] = options[0]  # Grafana selects the first option on load
                results.append(QueryCheck(uid, query.panel_title, query.ref_id, url, len(rows), not problem, problem))
    return results


def check_prometheus_names(api_url: str, docs: dict[str, dict] | None = None, timeout_s: float = 10.0,
                           transport: httpx.BaseTransport | None = None) -> list[QueryCheck]:
    """Each Prometheus panel: are the podwatch metrics its expression uses on /metrics?"""
    docs = docs if docs is not None else dashboard_docs()
    with httpx.Client(base_url=api_url.rstrip("/"), timeout=timeout_s, transport=transport) as client:
        response = client.get("/metrics")
    exported: set[str] = set()
    for line in response.text.splitlines():
        if line.startswith("# TYPE "):
            # A declared family counts even before its first sample (lag per partition has
            # none until partitions are assigned); histograms expose _bucket/_sum/_count.
            name = line.split()[2]
            exported |= {name, *(name + s for s in ("_bucket", "_sum", "_count", "_total"))}
        elif line and not line.startswith("#"):
            exported.add(line.split("{")[0].split(" ")[0])
    results = []
    for query in prometheus_queries(docs):
        names = sorted(set(re.findall(r"\bpodwatch_[a-z0-9_]+", query.expr)))
        missing = [n for n in names if n not in exported]
        results.append(QueryCheck(query.dashboard_uid, query.panel_title, "A", query.expr, 0, not missing,
                                  f"not on /metrics: {', '.join(missing)}" if missing else ""))
    return results


def panel_query_for(results: list[QueryCheck], title: str) -> QueryCheck:
    """The first check of a panel by title (for tests and messages)."""
    for result in results:
        if result.panel_title == title:
            return result
    raise KeyError(title)


__all__ = ["QueryCheck", "PanelQuery", "run_checks", "check_prometheus_names", "check_rows", "interpolate"]
