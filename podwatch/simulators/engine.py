"""`Simulator`: the site physics, its fault scenario, ground truth and real endpoints together.

    sim = Simulator(load_site("examples/sites/demo.yaml"), scenario=Scenario.load(...), seed=1, speed=10)
    await sim.start()            # Modbus servers listening, MQTT connected, physics running
    ...                          # sim.truth, sim.state.rack_return_c, sim.time_ms
    await sim.stop()             # idempotent

Tests drive it without servers or wall time: `sim.step(30.0)` advances 30 simulated seconds in
physics steps of `tick_s` (1 s by default).

Time: simulated seconds `t` start at 0; sample timestamps are `start_ms + t * 1000` (`time_ms`).
Running, the simulator follows a clock: by default `ScaledClock(speed)` starting at `start_ms`
(the wall clock itself at speed 1 without a start time). Give the collectors the same clock
(`podwatch.clock`) in accelerated runs. Each update the physics catches up with the clock in
`tick_s` steps (at most `MAX_STEPS_PER_UPDATE`; if the machine cannot keep up, simulated time
slips and `health` counts overruns), then every served register and MQTT point is refreshed once.
Updates happen every `tick_s / speed` wall seconds, but no more than `max_update_hz` per second.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from podwatch.clock import ScaledClock, WallClock
from podwatch.collectors.profiles import ModbusProfile, MqttProfile, load_profile
from podwatch.health import REGISTRY
from podwatch.site import Site
from podwatch.simulators.modbus_server import DeviceRegisters, ModbusEndpoint
from podwatch.simulators.observe import Observation, Observer
from podwatch.simulators.physics import SitePhysics
from podwatch.simulators.scenario import PumpDegradation, Scenario, SensorFaultState, apply_sensor_faults
from podwatch.simulators.truth import BreachTracker, FaultRecord, GroundTruth
from podwatch.simulators.workload import demand_fraction

log = logging.getLogger(__name__)
MAX_STEPS_PER_UPDATE = 3600


@dataclass(frozen=True)
class ServedEndpoint:
    protocol: str
    address: str
    units: dict[int, str]  # unit id -> device id


def _to_ms(start_time) -> int | None:
    if start_time is None:
        return None
    if isinstance(start_time, datetime):
        if start_time.tzinfo is None:
            raise ValueError("start_time must be timezone-aware")
        return int(start_time.timestamp() * 1000)
    return int(start_time)


def fault_records(scenario: Scenario, site: Site, start_ms: int) -> list[FaultRecord]:
    records = []
    for f in scenario.faults:
        params = f.model_dump(exclude={"id", "kind", "target", "onset_s", "duration_s", "magnitude"})
        trip_s = f.trip_s() if isinstance(f, PumpDegradation) else None
        records.append(FaultRecord(
            id=f.id, kind=f.kind, target=f.target, onset_ms=start_ms + int(round(f.onset_s * 1000)),
            end_ms=None if f.duration_s is None else start_ms + int(round((f.onset_s + f.duration_s) * 1000)),
            magnitude=getattr(f, "magnitude", None), racks=scenario.affected_racks(f, site), params=params,
            trip_ms=None if trip_s is None else start_ms + int(round(trip_s * 1000))))
    return records


class Simulator:
    """One simulated site.

    site: the validated site (`load_site`, with `port_offset` to move its ports).
    scenario: a `Scenario`, a path to one, or None; checked against the site (ConfigError).
    seed: load parameters, fault draws and measurement noise (same seed, same run).
    speed / start_time / clock: simulated time vs wall time when running (see the module docstring).
    tick_s: physics step. mqtt_url: publish MQTT devices there (None: not at all).
    serve_modbus: start the Modbus servers in `start()`. host: bind every server to this host instead
    of the site's. max_update_hz: register/MQTT refreshes per wall second at most.
    serial: how `modbus-rtu` devices (serial lines) are served: "pty" (default) starts a socat pty
    pair per serial port, whose collector end appears at the port path the site file names (e.g.
    /tmp/podwatch-rs485-1), and serves RTU on the other end; "device" serves on that path directly
    (a real serial adapter wired to the collector's); "off" does not serve them.
    """

    def __init__(self, site: Site, scenario: Scenario | str | Path | None = None, seed: int = 0, speed: float = 1.0,
                 start_time: datetime | int | None = None, clock: WallClock | ScaledClock | None = None,
                 tick_s: float = 1.0, mqtt_url: str | None = None, serve_modbus: bool = True,
                 max_update_hz: float = 10.0, host: str | None = None, serial: str = "pty") -> None:
        if serial not in ("pty", "device", "off"):
            raise ValueError(f"serial must be pty, device or off, got {serial!r}")
        self.serial = serial
        self._serial_links: list[SerialLink] = []
        if speed <= 0:
            raise ValueError("speed must be > 0")
        if isinstance(scenario, (str, Path)):
            scenario = Scenario.load(scenario, site)
        elif scenario is not None:
            errors = scenario.check(site)
            if errors:
                from podwatch.errors import ConfigError

                raise ConfigError(f"scenario {scenario.name}", errors)
        self.site = site
        self.scenario = scenario or Scenario(name="none")
        self.seed, self.speed, self.tick_s = seed, speed, tick_s
        self.max_update_hz = max_update_hz
        self.mqtt_url, self.serve_modbus, self.host = mqtt_url, serve_modbus, host
        start_ms = _to_ms(start_time)
        if clock is None:
            clock = WallClock() if (speed == 1.0 and start_ms is None) else ScaledClock.starting_now(speed, start_ms)
        self.clock = clock
        self.start_ms = start_ms if start_ms is not None else clock.now_ms()
        self.physics = SitePhysics(site, seed)
        self.observer = Observer(site, self.physics.topo, seed)
        self._sensor_state = SensorFaultState(seed)
        self.truth = GroundTruth(site=site.id, start_ms=self.start_ms, seed=seed, scenario=self.scenario.name,
                                 faults=fault_records(self.scenario, site, self.start_ms))
        topo = self.physics.topo
        self._tracker = BreachTracker(self.truth, topo.rack_ids, [site.rack(r).cdu for r in topo.rack_ids],
                                      topo.return_limit_c, [(f, set(f.racks)) for f in self.truth.faults])
        self._epoch_s = self.start_ms / 1000.0
        self.health = REGISTRY.component("simulator", site.id)
        self.endpoints: list[ModbusEndpoint] = []
        self.mqtt = None
        self._task: asyncio.Task | None = None
        self._running = False
        self.updates = 0
        self.last_observation: Observation | None = None

    # ---------------------------------------------------------------- time and state

    @property
    def t_s(self) -> float:
        """Simulated seconds since the start."""
        return self.physics.t_s

    @property
    def time_ms(self) -> int:
        """Timestamp (Unix ms) of the current simulated instant."""
        return self.start_ms + int(round(self.physics.t_s * 1000.0))

    @property
    def state(self) -> SitePhysics:
        """The physical state (`rack_return_c`, `rack_flow_lpm`, `cdu_supply_c`, `throttle`, ...),
        arrays indexed like `rack_ids` / `cdu_ids`."""
        return self.physics

    @property
    def rack_ids(self) -> list[str]:
        return self.physics.topo.rack_ids

    @property
    def cdu_ids(self) -> list[str]:
        return self.physics.topo.cdu_ids

    def rack_index(self, rack_id: str) -> int:
        return self.physics.topo.rack_ids.index(rack_id)

    def step(self, seconds: float | None = None) -> None:
        """Advance simulated time by `seconds` (default one tick) in steps of at most `tick_s`."""
        seconds = self.tick_s if seconds is None else seconds
        n = max(1, int(math.ceil(seconds / self.tick_s - 1e-9)))
        dt = seconds / n
        for _ in range(n):
            self._advance(dt)

    def _advance(self, dt: float) -> None:
        t_new = self.physics.t_s + dt
        ts = np.array([t_new])
        demand = demand_fraction(ts, ts + self._epoch_s, self.physics.load, self.site.spec.site.timezone)[0] \
            * self.physics.topo.rated_kw
        mods = self.scenario.modifiers(ts, self.site)
        snap = self.physics.step(dt, t_new, demand, mods)
        self._tracker.update(t_new, snap.rack_return_c[0])

    def inject(self, fault: dict, at_s: float | None = None) -> FaultRecord:
        """Add a fault while running (the demo's "inject a pump failure now"): `fault` is one scenario
        fault as a dict (`{"kind": "pump_failure", "target": "cdu-m1", "pumps": [1, 2], ...}`);
        `onset_s` defaults to `at_s`, else to now. Returns its ground-truth record."""
        data = dict(fault)
        data.setdefault("onset_s", self.physics.t_s if at_s is None else at_s)
        data.setdefault("id", f"{data.get('kind', 'fault')}-{len(self.scenario.faults)}")
        probe = Scenario.parse({"name": self.scenario.name, "faults": [data]}, "inject", self.site)
        new_fault = probe.faults[0]
        self.scenario.faults.append(new_fault)
        record = fault_records(probe, self.site, self.start_ms)[0]
        self.truth.faults.append(record)
        self._tracker.fault_racks.append((record, set(record.racks)))
        log.info("injected %s on %s at t=%.0f s", new_fault.kind, new_fault.target, new_fault.onset_s)
        return record

    def observe(self) -> Observation:
        """What every device reports now (noise and sensor faults applied)."""
        obs = self.observer.observe(self.physics.snapshot, self.start_ms)
        apply_sensor_faults(self.scenario, obs, self._sensor_state)
        self.last_observation = obs
        return obs

    def readings(self) -> dict[str, dict[str, float]]:
        """device id -> {metric: value} now."""
        obs = self.observe()
        return {d.id: obs.device_points(d.id) for g in obs.groups.values() for d in g.devices}

    # ---------------------------------------------------------------- endpoints

    def _build_endpoints(self) -> None:
        groups: dict[tuple[str, str, int], list[DeviceRegisters]] = {}
        for d in self.site.devices:
            if not d.enabled or d.protocol not in ("modbus-tcp", "modbus-rtu-over-tcp"):
                continue
            profile = load_profile(d.profile, self.site.profiles_dir)
            assert isinstance(profile, ModbusProfile)
            groups.setdefault((d.protocol, self.host or d.host, d.port), []).append(DeviceRegisters(d, profile))
        self.endpoints = [ModbusEndpoint(host, port, regs, framing=proto) for (proto, host, port), regs in groups.items()]

    def _serial_groups(self) -> dict[str, list[DeviceRegisters]]:
        groups: dict[str, list[DeviceRegisters]] = {}
        for d in self.site.devices:
            if d.enabled and d.protocol == "modbus-rtu" and d.serial is not None:
                profile = load_profile(d.profile, self.site.profiles_dir)
                assert isinstance(profile, ModbusProfile)
                groups.setdefault(d.serial.port, []).append(DeviceRegisters(d, profile))
        return groups

    async def _start_serial(self) -> None:
        """Serve every serial line of the site (see `serial` in the class docstring)."""
        from podwatch.simulators.modbus_server import serve_serial

        for port, regs in self._serial_groups().items():
            settings = regs[0].device.serial
            serve_on, parity = port, settings.parity
            if self.serial == "pty":
                link = SerialLink(port)
                self._serial_links.append(link)
                serve_on = await link.start()
                # A pty carries bytes, not bits on a wire: parity cannot be checked there, and Linux
                # refuses some termios parity settings on ptys (EINVAL). The simulator's end runs 8N1.
                parity = "N"
            try:
                _, endpoint = await serve_serial(serve_on, regs, baudrate=settings.baudrate, parity=parity,
                                                 stopbits=settings.stopbits, bytesize=settings.bytesize)
            except Exception as exc:  # pyserial: no such port, permission, busy
                from podwatch.errors import PodwatchError

                raise PodwatchError(f"cannot serve Modbus RTU on serial port {serve_on}: {exc}") from None
            endpoint.display = port
            self.endpoints.append(endpoint)

    def served(self) -> list[ServedEndpoint]:
        """What the simulator serves (for printing)."""
        out = [ServedEndpoint(e.framing, e.address, {u: r.device.id for u, r in sorted(e.devices.items())})
               for e in self.endpoints]
        if self.mqtt is not None:
            out.append(ServedEndpoint("mqtt", self.mqtt.url, {i: d.id for i, (d, _) in enumerate(self.mqtt.devices)}))
        return out

    def mqtt_devices(self) -> list[tuple]:
        out = []
        for d in self.site.devices:
            if d.enabled and d.protocol == "mqtt":
                profile = load_profile(d.profile, self.site.profiles_dir)
                assert isinstance(profile, MqttProfile)
                out.append((d, profile))
        return out

    async def start(self) -> None:
        """Start the Modbus servers and the MQTT publisher, then run the physics in real (or
        accelerated) time until `stop()`."""
        if self._running:
            return
        self._running = True
        try:
            if self.serve_modbus:
                self._build_endpoints()
                for e in self.endpoints:
                    await e.start()
                if self.serial != "off":
                    await self._start_serial()
            if self.mqtt_url:
                from podwatch.simulators.mqtt_publisher import MqttPublisher

                devices = self.mqtt_devices()
                if devices:
                    self.mqtt = MqttPublisher(self.mqtt_url, self.site.id, devices)
                    self.mqtt.start()
            self._catch_up()
            await self._publish()
        except BaseException:
            await self.stop()
            raise
        self._task = asyncio.create_task(self._run(), name=f"simulator-{self.site.id}")

    def _catch_up(self) -> None:
        target_t = (self.clock.now_ms() - self.start_ms) / 1000.0
        n = int((target_t - self.physics.t_s) / self.tick_s + 1e-9)
        if n > MAX_STEPS_PER_UPDATE:
            self.health.inc("overruns")
            n = MAX_STEPS_PER_UPDATE
        for _ in range(max(0, n)):
            self._advance(self.tick_s)

    async def _publish(self) -> None:
        obs = self.observe()
        points = {d.id: obs.device_points(d.id) for g in obs.groups.values() for d in g.devices}
        faults = self.scenario.device_faults_at(self.physics.t_s)
        for e in self.endpoints:
            e.exception_units = {u: f.exception_code for u, r in e.devices.items()
                                 if (f := faults.get(r.device.id)) is not None and f.mode == "exception"}
            e.silent_units = {u for u, r in e.devices.items()
                              if (f := faults.get(r.device.id)) is not None and f.mode == "silent"}
            await e.update(points)
        if self.mqtt is not None:
            self.mqtt.publish(points, self.time_ms)
        self.updates += 1
        self.health.inc("sent")

    async def _run(self) -> None:
        interval = max(1.0 / self.max_update_hz, self.tick_s / self.speed)
        next_wall = time.monotonic()
        while self._running:
            try:
                self._catch_up()
                await self._publish()
            except Exception as exc:  # keep serving: one bad update must not take the site down
                self.health.inc("errors")
                if self.health.counters["errors"] == 1:  # the first error loudly, repeats quietly
                    log.exception("simulator update failed at t=%.1f s", self.physics.t_s)
                else:
                    log.debug("simulator update failed again: %s", exc)
            next_wall += interval
            delay = next_wall - time.monotonic()
            if delay < 0:
                next_wall = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        """Stop the physics loop, the servers and the publisher. Safe to call twice."""
        self._running = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        endpoints, self.endpoints = self.endpoints, []
        for e in endpoints:
            await e.stop()
        links, self._serial_links = self._serial_links, []
        for link in links:
            link.stop()
        if self.mqtt is not None:
            mqtt, self.mqtt = self.mqtt, None
            await asyncio.to_thread(mqtt.stop)

    async def __aenter__(self) -> "Simulator":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


class SerialLink:
    """A socat pty pair standing in for an RS-485 line: the collector opens `collector_path` (the
    port named in the site file, created as a symlink), the simulator serves the other end."""

    def __init__(self, collector_path: str) -> None:
        self.collector_path = Path(collector_path)
        self.sim_path = Path(f"{collector_path}.sim")
        self._proc = None

    async def start(self) -> str:
        import shutil
        import subprocess

        from podwatch.errors import PodwatchError

        for path in (self.collector_path, self.sim_path):
            if path.exists() and not path.is_symlink():
                raise PodwatchError(f"serial port {path} exists and is not a pty link; to serve a real serial "
                                    "port use --serial device")
        if not self.collector_path.parent.is_dir():
            raise PodwatchError(f"cannot create the serial pty link {self.collector_path}: "
                                f"{self.collector_path.parent} is not a directory")
        socat = shutil.which("socat")
        if socat is None:
            raise PodwatchError("socat is not installed (apt-get install socat); it provides the pty pair for "
                                "serial devices (or use --serial off / --serial device)")
        self._proc = subprocess.Popen([socat, f"pty,raw,echo=0,link={self.sim_path}",
                                       f"pty,raw,echo=0,link={self.collector_path}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0
        while not (self.sim_path.exists() and self.collector_path.exists()):  # socat creates both links
            if self._proc.poll() is not None or loop.time() > deadline:
                err = self._proc.stderr.read().decode(errors="replace").strip() if self._proc.poll() is not None else ""
                self.stop()
                raise PodwatchError(f"socat could not create the pty pair at {self.collector_path}: {err or 'timeout'}")
            await asyncio.sleep(0.02)  # polling a file system condition, bounded by the deadline
        return str(self.sim_path)

    def stop(self) -> None:
        """Stop socat (it removes its links). Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except Exception:
            proc.kill()
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()
