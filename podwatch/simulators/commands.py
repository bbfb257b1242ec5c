"""`podwatch simulate`: serve a simulated site's devices (Modbus TCP / RTU-over-TCP servers, MQTT
publishing) until Ctrl-C, and `podwatch simulate history`: write N days of samples to Parquet."""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime, timezone
from pathlib import Path

import typer

from podwatch.errors import ConfigError


def _compress_units(units: list[int]) -> str:
    """[1,2,3,5,101,102] -> '1-3,5,101-102'."""
    out, run = [], []
    for u in sorted(units):
        if run and u == run[-1] + 1:
            run.append(u)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [u]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def _parse_start(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError("--start", [f"'{value}' is not an ISO date/time (e.g. 2026-01-01 or 2026-01-01T00:00:00Z)"]) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def register(app: typer.Typer) -> None:
    sim = typer.Typer(help="Simulated site: serve its devices live, or write training history (`history`).",
                      invoke_without_command=True)
    app.add_typer(sim, name="simulate")

    @sim.callback()
    def simulate(
        ctx: typer.Context,
        site: Path = typer.Option(None, "--site", help="Site YAML file (required unless a subcommand is given)"),
        speed: float = typer.Option(1.0, "--speed", help="Simulated seconds per wall second"),
        scenario: Path = typer.Option(None, "--scenario", help="Fault scenario YAML (examples/scenarios/)"),
        seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same run)"),
        port_offset: int = typer.Option(0, "--port-offset", help="Add this to every Modbus TCP port"),
        mqtt: str = typer.Option(None, "--mqtt", help="MQTT broker URL (default: the site's mqtt.url)"),
        no_mqtt: bool = typer.Option(False, "--no-mqtt", help="Do not publish MQTT devices"),
        duration: float = typer.Option(None, "--duration", help="Stop after this many simulated seconds "
                                                                  "(default: run until Ctrl-C)"),
        truth_out: Path = typer.Option(None, "--truth-out", help="Write the ground truth JSON here on exit"),
        clock_origin: str = typer.Option(None, "--clock-origin",
                                         help="Share a clock with collectors: WALL_MS:SIM_MS (see podwatch.clock)"),
        tick: float = typer.Option(1.0, "--tick", help="Physics step in simulated seconds"),
        serial: str = typer.Option("pty", "--serial", help="modbus-rtu serial devices: 'pty' (a socat pty pair per "
                                                          "port; collectors open the site's port path), 'device' "
                                                          "(serve on that real port) or 'off'"),
    ) -> None:
        """Serve every device of a site (Modbus servers per host:port, MQTT publishing) with live
        physics until Ctrl-C. `podwatch simulate history --help` for the Parquet history mode."""
        if ctx.invoked_subcommand is not None:
            return
        if site is None:
            raise ConfigError("podwatch simulate", ["--site: a site file is required (e.g. examples/sites/demo.yaml)"])
        if speed <= 0:
            raise ConfigError("--speed", [f"must be > 0, got {speed:g}"])
        if serial not in ("pty", "device", "off"):
            raise ConfigError("--serial", [f"must be pty, device or off, got {serial!r}"])
        if tick <= 0:
            raise ConfigError("--tick", [f"must be > 0 simulated seconds, got {tick:g}"])
        if duration is not None and duration <= 0:
            raise ConfigError("--duration", [f"must be > 0 simulated seconds, got {duration:g}"])
        from podwatch.clock import ScaledClock
        from podwatch.simulators.engine import Simulator
        from podwatch.simulators.scenario import Scenario
        from podwatch.site import load_site

        the_site = load_site(site, port_offset=port_offset)
        the_scenario = Scenario.load(scenario, the_site) if scenario else None
        if duration is None and the_scenario is not None and the_scenario.duration_s:
            duration = the_scenario.duration_s
        try:
            clock = ScaledClock.from_spec(speed, clock_origin) if clock_origin else None
        except ValueError:
            raise ConfigError("--clock-origin", [f"{clock_origin!r}: expected WALL_MS:SIM_MS (integers, ms)"]) from None
        mqtt_url = None if no_mqtt else (mqtt or the_site.spec.mqtt.url)
        if the_scenario is not None and duration is not None:
            for i, f in enumerate(the_scenario.faults):
                if f.onset_s >= duration:
                    typer.echo(f"  warning: faults[{i}] ({f.id}) starts at {f.onset_s:g} s, after --duration "
                               f"{duration:g} s: it will not happen in this run", err=True)
        asyncio.run(_serve(the_site, the_scenario, seed, speed, clock, mqtt_url, duration, truth_out, tick, serial))

    @sim.command("history")
    def history(
        site: Path = typer.Option(..., "--site", help="Site YAML file"),
        days: float = typer.Option(..., "--days", help="Days of history"),
        resolution: int = typer.Option(60, "--resolution", help="Seconds between samples"),
        out: Path = typer.Option(..., "--out", help="Output directory (samples.parquet, truth.json, ...)"),
        scenario: list[Path] = typer.Option(None, "--scenario", help="Scenario YAML (repeatable); onsets are "
                                                                      "seconds from the history's start"),
        episodes_per_day: float = typer.Option(0.0, "--episodes-per-day",
                                               help="Randomised fault episodes per day (training data)"),
        seed: int = typer.Option(0, "--seed"),
        start: str = typer.Option(None, "--start", help="Start (ISO, UTC if no zone); default: midnight UTC today "
                                                        "minus --days"),
    ) -> None:
        """Write N days of simulated samples to Parquet (the storage's long format) plus ground truth."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from podwatch.simulators.history import generate_history
        from podwatch.simulators.scenario import Scenario
        from podwatch.site import load_site

        problems = []
        if days <= 0 or resolution <= 0:
            problems.append("--days and --resolution must be > 0")
        elif resolution > days * 86400:
            problems.append(f"--resolution {resolution} s is longer than the history ({days * 86400:g} s): no samples")
        if episodes_per_day < 0:
            problems.append(f"--episodes-per-day must be >= 0, got {episodes_per_day:g}")
        if out.exists() and not out.is_dir():
            problems.append(f"--out {out} exists and is not a directory")
        if problems:
            raise ConfigError("podwatch simulate history", problems)
        start_ms = _parse_start(start)  # before the progress bar: a bad --start is an error, not a half-drawn bar
        the_site = load_site(site)
        scenarios = [Scenario.load(p, the_site) for p in (scenario or [])]
        late = [f"{path}: faults[{i}] ({f.id}) starts at {f.onset_s:g} s, after the history's end ({days * 86400:g} s)"
                for path, sc in zip(scenario or [], scenarios) for i, f in enumerate(sc.faults) if f.onset_s >= days * 86400]
        if late:  # it would sit in the ground truth as a fault that never happened
            raise ConfigError("podwatch simulate history", late)
        with Progress(TextColumn("simulating"), BarColumn(), TextColumn("{task.completed:.2f}/{task.total:g} days"),
                      TimeElapsedColumn()) as bar:
            task = bar.add_task("history", total=days)
            result = generate_history(the_site, days, resolution, scenarios, seed, out, start_ms,
                                      episodes_per_day, progress=lambda done, total: bar.update(task, completed=done))
        typer.echo(f"wrote {result.rows:,} samples ({days:g} days at {resolution} s) to {result.samples_path} "
                   f"in {result.seconds:.1f} s; ground truth: {len(result.truth.faults)} faults, "
                   f"{len(result.truth.breaches)} breaches ({out / 'truth.json'})")


async def _serve(site, scenario, seed, speed, clock, mqtt_url, duration, truth_out, tick, serial="pty") -> None:
    from podwatch.simulators.engine import Simulator

    sim = Simulator(site, scenario, seed=seed, speed=speed, clock=clock, mqtt_url=mqtt_url, tick_s=tick, serial=serial)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await sim.start()
    try:
        typer.echo(f"simulating site '{site.id}' at speed {speed:g}x, seed {seed}"
                   + (f", scenario '{scenario.name}'" if scenario else "")
                   + (f", for {duration:g} simulated s" if duration else ", Ctrl-C to stop"))
        for ep in sim.served():
            if ep.protocol == "mqtt":
                typer.echo(f"  {'mqtt':<19} {ep.address:<22} {len(ep.units)} devices publishing")
            else:
                typer.echo(f"  {ep.protocol:<19} {ep.address:<22} units {_compress_units(list(ep.units))} "
                           f"({len(ep.units)} devices)")
        first = next((e for e in sim.served() if e.protocol == "modbus-tcp"), None)
        if first is not None:
            from podwatch.collectors.profiles import load_profile

            host, port = first.address.rsplit(":", 1)
            unit, dev = next(iter(first.units.items()))
            profile = load_profile(site.device(dev).profile, site.profiles_dir)
            # mbpoll reads float32 as ABCD (-B) or CDAB only: pick a point it can show
            point = next((p for p in profile.points if p.data_type == "float32" and profile.order_of(p) in ("ABCD", "CDAB")),
                         None)
            if point is not None:
                table = 4 if point.register_type == "holding" else 3
                order = " -B" if profile.order_of(point) == "ABCD" else ""
                typer.echo(f"  try: mbpoll -m tcp -p {port} -a {unit} -0 -r {profile.wire_address(point)} -c 1 "
                           f"-t {table}:float{order} -1 {host}   # {dev} {point.metric} (docs/devices.md)")
        serial_ep = next((e for e in sim.served() if e.protocol == "modbus-rtu"), None)
        if serial_ep is not None:
            unit, dev = next(iter(serial_ep.units.items()))
            line = site.device(dev).serial
            parity = {"N": "none", "E": "even", "O": "odd"}[line.parity if sim.serial == "device" else "N"]
            from podwatch.collectors.profiles import load_profile

            profile = load_profile(site.device(dev).profile, site.profiles_dir)
            point = next((p for p in profile.points if p.data_type == "float32" and profile.order_of(p) in ("ABCD", "CDAB")),
                         profile.points[0])
            table = 4 if point.register_type == "holding" else 3
            kind = ":float" if point.data_type == "float32" and profile.order_of(point) in ("ABCD", "CDAB") else ""
            order = " -B" if kind and profile.order_of(point) == "ABCD" else ""
            typer.echo(f"  try: mbpoll -m rtu -b {line.baudrate} -P {parity} -a {unit} -0 -r {profile.wire_address(point)} "
                       f"-c 1 -t {table}{kind}{order} -1 {serial_ep.address}   # {dev} {point.metric} (docs/devices.md)")
        last_report = started = loop.time()
        mqtt_checked = sim.mqtt is None
        while not stop.is_set():
            if not mqtt_checked and loop.time() - started > 3.0:
                mqtt_checked = True
                if not sim.mqtt.connected.is_set():
                    typer.echo(f"  warning: MQTT broker {sim.mqtt.url} not reachable; MQTT devices are not published "
                               "until it is (use --mqtt URL or --no-mqtt)", err=True)
            if duration is not None and sim.t_s >= duration:
                break
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.2)
            except asyncio.TimeoutError:
                pass
            if loop.time() - last_report >= 30.0:
                last_report = loop.time()
                hottest = sim.state.rack_return_c.max()
                typer.echo(f"  t={sim.t_s:,.0f} s  IT {sim.state.rack_power_kw.sum():,.0f} kW  hottest return "
                           f"{hottest:.1f} °C  breaches {len(sim.truth.breaches)}")
    finally:
        await sim.stop()
        if truth_out is not None:
            sim.truth.write_json(truth_out)
            typer.echo(f"ground truth written to {truth_out}")
        typer.echo(f"stopped at t={sim.t_s:,.0f} s; breaches: "
                   + (", ".join(f"{b.rack}@{(b.ts_ms - sim.start_ms) / 1000:.0f}s" for b in sim.truth.breaches[:10])
                      or "none"))
