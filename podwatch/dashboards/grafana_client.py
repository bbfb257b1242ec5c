"""The Grafana HTTP API client (httpx) that installs podwatch's folder, datasources and
dashboards into a user's Grafana: `podwatch dashboards push`.

What it does, in order (`push()`):
1. folder: `GET /api/folders/{uid}`; on 404 `POST /api/folders` (a 409/412 "already exists"
   answer, e.g. from a retried POST that had landed, is resolved by reading the folder again);
2. each datasource: `GET /api/datasources/uid/{uid}`; on 404 `POST /api/datasources`; when it
   exists with other settings `PUT /api/datasources/uid/{uid}`; unchanged ones are left alone;
3. each dashboard: `GET /api/dashboards/uid/{uid}` for the stored version, then
   `POST /api/dashboards/db` with `version` = that version and `overwrite: false`, so an edit
   made in Grafana between our read and our write is refused by Grafana (412 version-mismatch)
   instead of silently lost; `overwrite=True` replaces whatever is there. A dashboard whose
   stored content already equals ours is not written again, so pushing twice changes nothing.

Errors are classified once (`_raise_for_status`): 401/403 -> `GrafanaAuthError`, 404 ->
`GrafanaNotFound`, 412 -> `GrafanaConflict` (with Grafana's status: version-mismatch,
name-exists, plugin-dashboard), network errors and time-outs -> `GrafanaUnavailable`. Only
network errors, 5xx and 429 are retried, with jittered exponential back-off (429 honours
Retry-After); everything else fails at once with a sentence a person can act on.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from podwatch.errors import PodwatchError

log = logging.getLogger(__name__)

RETRIABLE_STATUS = frozenset({429, 500, 502, 503, 504})


class GrafanaError(PodwatchError):
    """Grafana refused or could not be reached; the message says which call and why."""

    def __init__(self, message: str, status: int | None = None, grafana_status: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.grafana_status = grafana_status


class GrafanaAuthError(GrafanaError):
    """401 (bad or missing token) or 403 (token lacks the permission)."""


class GrafanaNotFound(GrafanaError):
    """404 on a call where the object must exist."""


class GrafanaConflict(GrafanaError):
    """412: the dashboard changed in Grafana since we read it, or its title is taken."""


class GrafanaUnavailable(GrafanaError):
    """Network error, time-out, or 5xx/429 still failing after the retries."""


class GrafanaSettings(BaseModel):
    """How to reach a Grafana server."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="Base URL of Grafana, e.g. http://grafana:3000")
    token: str = Field(description="Service-account token (sent as a Bearer token)")
    timeout_s: float = Field(10.0, gt=0, description="Per-request time-out (connect, read, write)")
    retries: int = Field(3, ge=0, le=10, description="Retries of network errors, 5xx and 429")
    backoff_initial_s: float = Field(0.5, ge=0, description="First back-off; doubles per retry, jittered")
    backoff_max_s: float = Field(8.0, ge=0, description="Largest single back-off")
    verify_tls: bool = Field(True, description="Verify the server's TLS certificate")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"grafana url must start with http:// or https://, got {value!r}")
        return value.rstrip("/")

    @field_validator("token")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("token is empty: create a Grafana service-account token (Editor or Admin role)")
        return value.strip()


@dataclass
class PushReport:
    """What `push()` did: one line per object, e.g. ("dashboard", "podwatch-cdu", "created v1")."""

    actions: list[tuple[str, str, str]] = field(default_factory=list)
    requests: int = 0
    retries: int = 0

    def add(self, kind: str, uid: str, action: str) -> None:
        self.actions.append((kind, uid, action))


class GrafanaClient:
    """A small synchronous client of Grafana's HTTP API. Use as a context manager or call
    `close()` (idempotent). `transport`, `sleep` and `jitter` are injectable for tests."""

    def __init__(self, settings: GrafanaSettings, transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep, jitter: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self._sleep = sleep
        self._jitter = jitter
        self._http = httpx.Client(
            base_url=settings.url,
            headers={"Authorization": f"Bearer {settings.token}", "Accept": "application/json",
                     "User-Agent": "podwatch-dashboards"},
            timeout=httpx.Timeout(settings.timeout_s),
            verify=settings.verify_tls,
            transport=transport,
        )
        self.requests = 0
        self.retries = 0
        self._closed = False

    def __enter__(self) -> "GrafanaClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._http.close()

    # ------------------------------------------------------------------ transport + retries

    def _backoff_s(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.settings.backoff_max_s)
            except ValueError:
                pass  # an HTTP date: fall back to our own back-off
        base = min(self.settings.backoff_initial_s * (2 ** attempt), self.settings.backoff_max_s)
        # "Full jitter" between half and the whole back-off: retries of many clients spread out.
        return base * (0.5 + 0.5 * self._jitter())

    def request(self, method: str, path: str, json_body: Any = None, what: str = "") -> httpx.Response:
        """Send one API call, retrying only network errors, 5xx and 429. Returns any response
        below 500 except 429 (the caller decides what 404/409/412 mean there)."""
        what = what or f"{method} {path}"
        attempts = self.settings.retries + 1
        last_problem = ""
        for attempt in range(attempts):
            if attempt:
                self.retries += 1
            self.requests += 1
            try:
                response = self._http.request(method, path, json=json_body)
            except httpx.TimeoutException as exc:
                last_problem = (f"timed out after {self.settings.timeout_s:g} s "
                                f"({type(exc).__name__})")
                retry_after = None
            except httpx.TransportError as exc:
                last_problem = f"network error: {type(exc).__name__}: {exc}"
                retry_after = None
            else:
                if response.status_code not in RETRIABLE_STATUS:
                    return response
                last_problem = f"HTTP {response.status_code}: {_grafana_message(response)}"
                retry_after = response.headers.get("Retry-After")
            if attempt + 1 < attempts:
                delay_s = self._backoff_s(attempt, retry_after)
                log.warning("Grafana %s failed (%s); retry %d/%d in %.2f s", what, last_problem,
                            attempt + 1, self.settings.retries, delay_s)
                self._sleep(delay_s)
        raise GrafanaUnavailable(
            f"Grafana at {self.settings.url} did not answer {what}: {last_problem} "
            f"(gave up after {attempts} attempt(s))")

    def _raise_for_status(self, response: httpx.Response, what: str) -> None:
        code = response.status_code
        if code < 400:
            return
        message = _grafana_message(response)
        status = _grafana_status(response)
        url = self.settings.url
        if code == 401:
            raise GrafanaAuthError(f"{what}: Grafana at {url} rejected the token (401 Unauthorized: {message}); "
                                   "check --token (a service-account token, sent as Bearer)", code, status)
        if code == 403:
            raise GrafanaAuthError(f"{what}: the token is valid but not allowed to do this (403 Forbidden: "
                                   f"{message}); give the service account the Editor or Admin role", code, status)
        if code == 404:
            raise GrafanaNotFound(f"{what}: not found at {url} (404: {message}); is --grafana-url the Grafana "
                                  "root URL (including any sub-path)?", code, status)
        if code == 412:
            raise GrafanaConflict(f"{what}: conflict (412 {status or 'precondition failed'}: {message})",
                                  code, status)
        raise GrafanaError(f"{what}: Grafana answered HTTP {code}: {message}", code, status)

    def _json(self, response: httpx.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise GrafanaError(f"{what}: Grafana answered HTTP {response.status_code} with a body that is not "
                               f"JSON: {response.text[:200]!r}", response.status_code) from None

    # ------------------------------------------------------------------ folders

    def _get_or_none(self, path: str, what: str) -> dict | None:
        """GET a JSON object; None when Grafana answers 404, a clear error for anything else."""
        response = self.request("GET", path, what=what)
        if response.status_code == 404:
            return None
        self._raise_for_status(response, what)
        return self._json(response, what)

    def get_folder(self, uid: str) -> dict | None:
        return self._get_or_none(f"/api/folders/{uid}", f"read folder {uid!r}")

    def ensure_folder(self, uid: str, title: str) -> str:
        """Create the folder if missing. Returns "created" or "exists"."""
        if self.get_folder(uid) is not None:
            return "exists"
        what = f"create folder {uid!r} ({title!r})"
        response = self.request("POST", "/api/folders", {"uid": uid, "title": title}, what=what)
        if response.status_code in (409, 412):
            # Either a retried POST that had landed (then the folder is there now), or another
            # folder already has this title under a different uid.
            if self.get_folder(uid) is not None:
                return "created"
            raise GrafanaConflict(f"{what}: a folder titled {title!r} already exists with another uid "
                                  f"({_grafana_message(response)}); pass --folder with that folder's uid",
                                  response.status_code, _grafana_status(response))
        self._raise_for_status(response, what)
        return "created"

    # ------------------------------------------------------------------ datasources

    def get_datasource(self, uid: str) -> dict | None:
        return self._get_or_none(f"/api/datasources/uid/{uid}", f"read datasource {uid!r}")

    def ensure_datasource(self, spec: dict) -> str:
        """Create the datasource `spec` (Grafana's datasource JSON, with uid) if missing, update
        it when its settings differ. Returns "created", "updated" or "unchanged"."""
        uid = spec["uid"]
        current = self.get_datasource(uid)
        if current is None:
            what = f"create datasource {uid!r}"
            response = self.request("POST", "/api/datasources", spec, what=what)
            if response.status_code == 409:  # a retried POST landed, or the name is taken
                if self.get_datasource(uid) is not None:
                    return "created"
                raise GrafanaConflict(f"{what}: a datasource named {spec.get('name')!r} already exists with "
                                      f"another uid ({_grafana_message(response)})", 409)
            self._raise_for_status(response, what)
            return "created"
        if all(current.get(key) == value for key, value in spec.items() if key != "secureJsonData"):
            return "unchanged"
        what = f"update datasource {uid!r}"
        body = {**spec, "version": current.get("version")}
        response = self.request("PUT", f"/api/datasources/uid/{uid}", body, what=what)
        self._raise_for_status(response, what)
        return "updated"

    # ------------------------------------------------------------------ dashboards

    def get_dashboard(self, uid: str) -> dict | None:
        """`{"dashboard": {...}, "meta": {...}}` or None when no dashboard has this uid."""
        return self._get_or_none(f"/api/dashboards/uid/{uid}", f"read dashboard {uid!r}")

    def upsert_dashboard(self, dashboard: dict, folder_uid: str | None, overwrite: bool = False,
                         message: str = "podwatch dashboards push") -> str:
        """Create or update one dashboard (it must carry a uid). Returns "created vN",
        "updated vN" or "unchanged vN". Raises GrafanaConflict on a 412 that is not our own
        earlier write landing."""
        uid = dashboard.get("uid")
        if not uid:
            raise GrafanaError(f"dashboard {dashboard.get('title')!r} has no uid; podwatch dashboards need stable uids")
        stored = self.get_dashboard(uid)
        stored_folder = ((stored or {}).get("meta") or {}).get("folderUid") or None
        if stored is not None and _same_content(stored["dashboard"], dashboard) and stored_folder == folder_uid:
            return f"unchanged v{stored['dashboard'].get('version')}"
        body_dashboard = {**dashboard, "id": None}
        if stored is not None:
            body_dashboard["version"] = stored["dashboard"].get("version")
        else:
            body_dashboard.pop("version", None)
        body = {"dashboard": body_dashboard, "folderUid": folder_uid, "overwrite": overwrite, "message": message}
        what = f"save dashboard {uid!r} ({dashboard.get('title')!r})"
        response = self.request("POST", "/api/dashboards/db", body, what=what)
        if response.status_code == 412:
            # A retried POST whose first attempt landed comes back as version-mismatch; if what
            # Grafana holds now is exactly ours, the write succeeded.
            now = self.get_dashboard(uid)
            if now is not None and _same_content(now["dashboard"], dashboard):
                return f"{'updated' if stored else 'created'} v{now['dashboard'].get('version')}"
            status = _grafana_status(response)
            hint = {
                "version-mismatch": "someone changed it in Grafana since it was read; review their change, "
                                    "then re-run with --overwrite to replace it",
                "name-exists": "another dashboard in this folder has the same title; rename or delete it, "
                               "or re-run with --overwrite",
                "plugin-dashboard": "it belongs to a plugin; re-run with --overwrite to replace it",
            }.get(status or "", "re-run with --overwrite to replace it")
            raise GrafanaConflict(f"{what}: Grafana refused the write (412 {status or 'precondition failed'}: "
                                  f"{_grafana_message(response)}); {hint}", 412, status)
        self._raise_for_status(response, what)
        result = self._json(response, what)
        return f"{'updated' if stored else 'created'} v{result.get('version')}"


def _same_content(stored: dict, ours: dict) -> bool:
    """Equal apart from what Grafana assigns on save (id, version)."""
    ignore = {"id", "version"}
    return ({k: v for k, v in stored.items() if k not in ignore}
            == {k: v for k, v in json.loads(json.dumps(ours)).items() if k not in ignore})


def _grafana_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error") or body)[:300]
    return str(body)[:300]


def _grafana_status(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("status") if isinstance(body, dict) else None


def push(settings: GrafanaSettings, dashboards: list[dict], datasources: list[dict], folder_uid: str,
         folder_title: str, overwrite: bool = False, transport: httpx.BaseTransport | None = None,
         sleep: Callable[[float], None] = time.sleep) -> PushReport:
    """Install folder, datasources and dashboards; stops at the first error (raised)."""
    report = PushReport()
    with GrafanaClient(settings, transport=transport, sleep=sleep) as client:
        try:
            report.add("folder", folder_uid, client.ensure_folder(folder_uid, folder_title))
            for spec in datasources:
                report.add("datasource", spec["uid"], client.ensure_datasource(spec))
            for dashboard in dashboards:
                report.add("dashboard", dashboard["uid"], client.upsert_dashboard(dashboard, folder_uid, overwrite))
        finally:
            report.requests, report.retries = client.requests, client.retries
    return report
