"""Real servers for the alerting tests: an HTTP webhook sink on a loopback port (stdlib
ThreadingHTTPServer in a thread; can be stopped and restarted on the same port, or told to
answer 503), Alertmanager (Debian package) routing to such a sink, and aiosmtpd."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from podwatch import procs


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    recv_time: float

    def json(self):
        return json.loads(self.body)


@dataclass
class WebhookSink:
    port: int
    host: str = "127.0.0.1"
    received: list[Received] = field(default_factory=list)
    status: int = 200
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    def start(self) -> "WebhookSink":
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if sink.status == 200:
                    with sink._lock:
                        sink.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time()))
                self.send_response(sink.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
            self._thread.join(5)

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def am_notifications(self, status: str | None = None) -> list[dict]:
        out = [r.json() for r in self.snapshot()]
        return [n for n in out if status is None or n.get("status") == status]


@pytest.fixture
def webhook_sink():
    sink = WebhookSink(procs.free_port()).start()
    yield sink
    sink.stop()


AM_CONFIG = """
route:
  receiver: sink
  group_by: ['alertname', 'target']
  group_wait: 100ms
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: sink
    webhook_configs:
      - url: '{url}'
        send_resolved: true
"""


@pytest.fixture(scope="module")
def am_with_sink(tmp_path_factory):
    """(Alertmanager base URL, the webhook sink it notifies)."""
    workdir: Path = tmp_path_factory.mktemp("alertmanager")
    sink = WebhookSink(procs.free_port()).start()
    config = workdir / "alertmanager.yml"
    config.write_text(AM_CONFIG.format(url=sink.url))
    am = procs.alertmanager(config, workdir=workdir)
    with am:
        yield f"http://{am.address}", sink
    sink.stop()


ROOT = Path(__file__).resolve().parents[3]
REPLAY_BATCH_S = 5


def pump_failure_history(tmp_path: Path, *, duration_s: int = 360, cleared_after_s: int | None = 120):
    """The demo site's pump failure through the simulator's physics: both duty pumps of cdu-m1
    trip at 60 s with no standby takeover (cleared after `cleared_after_s`, or never), 1 Hz
    samples with recent timestamps (so Alertmanager sees plausible startsAt/endsAt).
    Returns (site, samples sorted by ts, the history result with its ground truth)."""
    import polars as pl

    import podwatch.simulators.history as history
    import podwatch.simulators.scenario as scenario_mod
    from podwatch.site import load_site

    site = load_site(ROOT / "examples/sites/demo.yaml")
    fault = {"kind": "pump_failure", "target": "cdu-m1", "onset_s": 60, "pumps": [1, 2], "standby_takeover": False}
    if cleared_after_s is not None:
        fault["duration_s"] = cleared_after_s
    scenario = scenario_mod.Scenario.parse({"name": "pump-failure", "faults": [fault]}, site=site)
    start_ms = int(time.time() * 1000) - (duration_s + 40) * 1000
    result = history.generate_history(site, days=duration_s / 86400, resolution_s=1, scenarios=[scenario], seed=7,
                                      out_dir=tmp_path / "history", start_ms=start_ms)
    return site, pl.read_parquet(result.samples_path).sort("ts"), result


async def replay(runtime, site, samples, *, until_s: float | None = None) -> None:
    """Feed `samples` as the serve process does, in 5 s batches: the engine's threshold rules on
    the rows, then the analytics streaming checks' observations; up to `until_s` after the first."""
    import polars as pl

    import podwatch.analytics.checks as checks_mod

    checks = checks_mod.StreamingChecks(site)
    first = samples["ts"].min()
    offset_s = (pl.col("ts") - first).dt.total_seconds()
    if until_s is not None:
        samples = samples.filter(offset_s < until_s)
    batches = samples.with_columns((offset_s // REPLAY_BATCH_S).alias("batch"))
    for _, rows in batches.group_by("batch", maintain_order=True):
        rows = rows.drop("batch")
        await runtime.on_batch(rows)
        await runtime.observe(checks.process(rows))
    await runtime.deliver()
