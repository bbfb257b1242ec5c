"""A fake Grafana HTTP API on a real loopback socket (stdlib ThreadingHTTPServer), holding
folders, datasources and dashboards in memory with Grafana's semantics for the calls the push
client makes: Bearer auth (401), folder/datasource/dashboard by uid (404), dashboard version
check (412 version-mismatch / name-exists unless overwrite). Knobs inject failures:
`fail_next[(method, path)] = [503, ...]` answers those statuses first, `delay_s[(method, path)]`
holds the answer back (released at stop, so no handler thread outlives the test).

No Grafana server can be installed on this machine (RECIPES.md section 6), hence this fake.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeGrafana:
    def __init__(self, token: str = "secret-token") -> None:
        self.token = token
        self.folders: dict[str, dict] = {}
        self.datasources: dict[str, dict] = {}
        self.dashboards: dict[str, dict] = {}   # uid -> {"dashboard": {...}, "folderUid": str|None}
        self.requests: list[tuple[str, str]] = []
        self.fail_next: dict[tuple[str, str], list[int]] = {}
        self.delay_s: dict[tuple[str, str], float] = {}
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._next_id = 1
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _answer(self, status: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a delayed answer (the timeout tests): nothing to report

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                with fake._lock:
                    fake.requests.append((method, path))
                    failures = fake.fail_next.get((method, path))
                    injected = failures.pop(0) if failures else None
                    delay = fake.delay_s.get((method, path), 0.0)
                if delay:
                    fake._release.wait(delay)
                if injected:
                    self._answer(injected, {"message": f"injected {injected}"})
                    return
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    self._answer(401, {"message": "Unauthorized"})
                    return
                body = json.loads(raw) if raw else None
                with fake._lock:
                    status, answer = fake.route(method, path, body)
                self._answer(status, answer)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-grafana", daemon=True)

    def start(self) -> "FakeGrafana":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "FakeGrafana":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id

    # ------------------------------------------------------------------ Grafana's semantics
    def route(self, method: str, path: str, body):
        if m := re.fullmatch(r"/api/folders/([^/]+)", path):
            folder = self.folders.get(m[1])
            return (200, folder) if method == "GET" and folder else (404, {"message": "folder not found"})
        if path == "/api/folders" and method == "POST":
            if body["uid"] in self.folders or any(f["title"] == body["title"] for f in self.folders.values()):
                return 409, {"message": "a folder with the same name already exists"}
            self.folders[body["uid"]] = {"id": self._id(), "uid": body["uid"], "title": body["title"], "version": 1}
            return 200, self.folders[body["uid"]]
        if m := re.fullmatch(r"/api/datasources/uid/([^/]+)", path):
            ds = self.datasources.get(m[1])
            if ds is None:
                return 404, {"message": "Data source not found"}
            if method == "GET":
                return 200, ds
            if method == "PUT":
                self.datasources[m[1]] = {**ds, **body, "version": ds["version"] + 1}
                return 200, {"message": "Datasource updated", "datasource": self.datasources[m[1]]}
        if path == "/api/datasources" and method == "POST":
            if body["uid"] in self.datasources or any(d["name"] == body["name"] for d in self.datasources.values()):
                return 409, {"message": "data source with the same name already exists"}
            self.datasources[body["uid"]] = {**body, "id": self._id(), "version": 1, "orgId": 1}
            return 200, {"message": "Datasource added", "datasource": self.datasources[body["uid"]]}
        if m := re.fullmatch(r"/api/dashboards/uid/([^/]+)", path):
            stored = self.dashboards.get(m[1])
            if stored is None:
                return 404, {"message": "Dashboard not found"}
            return 200, {"dashboard": stored["dashboard"], "meta": {"folderUid": stored["folderUid"] or ""}}
        if path == "/api/dashboards/db" and method == "POST":
            return self.save_dashboard(body)
        return 404, {"message": "Not found"}

    def save_dashboard(self, body):
        dashboard, folder_uid, overwrite = body["dashboard"], body.get("folderUid"), body.get("overwrite", False)
        if folder_uid and folder_uid not in self.folders:
            return 400, {"message": "folder not found", "status": "not-found"}
        uid = dashboard["uid"]
        stored = self.dashboards.get(uid)
        if not overwrite:
            for other_uid, other in self.dashboards.items():
                if (other_uid != uid and other["folderUid"] == folder_uid
                        and other["dashboard"]["title"] == dashboard["title"]):
                    return 412, {"message": "A dashboard with the same name in the folder already exists",
                                 "status": "name-exists"}
            if stored is not None and dashboard.get("version") != stored["dashboard"]["version"]:
                return 412, {"message": "The dashboard has been changed by someone else", "status": "version-mismatch"}
        version = stored["dashboard"]["version"] + 1 if stored else 1
        dash_id = stored["dashboard"]["id"] if stored else self._id()
        self.dashboards[uid] = {"dashboard": {**dashboard, "id": dash_id, "version": version}, "folderUid": folder_uid}
        return 200, {"id": dash_id, "uid": uid, "status": "success", "version": version,
                     "url": f"/d/{uid}/x", "slug": "x"}

    def edit_in_ui(self, uid: str, **changes) -> None:
        """Someone saves the dashboard in Grafana's UI: content changes, version goes up."""
        with self._lock:
            stored = self.dashboards[uid]["dashboard"]
            self.dashboards[uid]["dashboard"] = {**stored, **changes, "version": stored["version"] + 1}
