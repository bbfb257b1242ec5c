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
from podwatch.simulators.scenario import Scenario, SensorFaultState, apply_sensor_faults
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
        records.append(FaultRecord(
            id=f.id, kind=f.kind, target=f.target, onset_ms=start_ms + int(round(f.onset_s * 1000)),
            end_ms=None if f.duration_s is None else start_ms + int(round((f.onset_s + f.duration_s) * 1000)),
            magnitude=getattr(f, "magnitude", None), racks=scenario.affected_racks(f, site), params=params))
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
    """

    def __init__(self, site: Site, scenario: Scenario | str | Path | None = None, seed: int = 0, speed: float = 1.0,
                 start_time: datetime | int | None = None, clock: WallClock | ScaledClock | None = None,
                 tick_s: float = 1.0, mqtt_url: str | None = None, serve_modbus: bool = True,
                 max_update_hz: float = 10.0, host: str | None = None) -> None:
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
        if self.mqtt is not None:
            mqtt, self.mqtt = self.mqtt, None
            await asyncio.to_thread(mqtt.stop)

    async def __aenter__(self) -> "Simulator":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
