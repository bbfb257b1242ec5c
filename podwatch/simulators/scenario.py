"""Fault scenarios: a YAML timeline of faults the simulator injects (docs/simulator.md).

```yaml
name: pump-failure
description: Both duty pumps of cdu-m1 trip; the standby pump does not take over.
duration_s: 600                 # suggested run length (podwatch simulate --duration default)
faults:
  - kind: pump_failure          # see FAULT_KINDS
    target: cdu-m1              # a CDU, rack, module, device id, or "*" (site-wide) as the kind allows
    onset_s: 60                 # seconds after the simulation starts
    duration_s: null            # null = until the end
    ramp_s: 0                   # linear ramp from 0 to full magnitude
    pumps: [1, 2]
    standby_takeover: false
```

A scenario compiles, for any array of simulated times, into `physics.Modifiers` (vectorised over
time, so history mode computes a whole day of fault effects at once). Sensor faults change what
devices report (`apply_sensor_faults`), device faults make a Modbus device stop answering or answer
with an exception (`device_faults_at`). `random_scenario` draws randomised fault episodes for
training histories.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from podwatch.errors import ConfigError
from podwatch.site import Site
from podwatch.simulators.physics import MAX_PUMPS, Modifiers

LEAK_WARNING_AFTER_S = 5.0  # leak rope / tray sensor wets within seconds ...
LEAK_CRITICAL_AFTER_S = 30.0  # ... and the alarm escalates when the leak persists
LEAK_CRITICAL_LPM = 5.0  # a large leak is critical as soon as it is detected


class _Fault(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="Fault id in the ground truth (default: <kind>-<index>)")
    target: str = Field(description="What the fault hits (see each kind)")
    onset_s: float = Field(ge=0, description="Seconds after the simulation starts")
    duration_s: float | None = Field(None, gt=0, description="Fault clears after this long; null = never")
    ramp_s: float = Field(0.0, ge=0, description="Linear ramp to full magnitude")

    def envelope(self, t_s: np.ndarray) -> np.ndarray:
        """0 before onset and after the end, ramping 0 -> 1 over ramp_s."""
        since = t_s - self.onset_s
        env = np.clip(since / self.ramp_s, 0.0, 1.0) if self.ramp_s > 0 else (since >= 0).astype(float)
        env = np.where(since >= 0, env, 0.0)
        if self.duration_s is not None:
            env = np.where(since < self.duration_s, env, 0.0)
        return env

    def active(self, t_s: np.ndarray) -> np.ndarray:
        since = t_s - self.onset_s
        act = since >= 0
        if self.duration_s is not None:
            act &= since < self.duration_s
        return act

    def abrupt_instants_s(self) -> list[float]:
        """Simulated times at which the fault may change the physics abruptly (its onset and end;
        kinds add theirs): history mode sub-steps the output steps holding them."""
        return [self.onset_s] + ([] if self.duration_s is None else [self.onset_s + self.duration_s])


class PumpFailure(_Fault):
    """CDU pumps trip (target: CDU id). With `standby_takeover` the N+1 standby pump starts after
    `takeover_delay_s`; without it the loop runs on what is left."""

    kind: Literal["pump_failure"]
    pumps: list[int] = Field(default_factory=lambda: [1], description="1-based pump numbers that fail")
    standby_takeover: bool = True
    takeover_delay_s: float = Field(10.0, ge=0)

    def abrupt_instants_s(self) -> list[float]:
        return super().abrupt_instants_s() + ([self.onset_s + self.takeover_delay_s] if self.standby_takeover else [])


class PumpDegradation(_Fault):
    """A CDU pump wears out (target: CDU id): bearing wear, impeller erosion or cavitation take
    `magnitude` (0..1) of its rated flow away, linearly over `ramp_s` (minutes to hours). The other
    running pumps speed up to make up for it; once the running pumps together fall short of the
    racks' demand, every rack's flow falls. With `trip_at_capacity` the pump trips (protection:
    vibration, motor current) when its remaining capacity reaches that share; the N+1 standby then
    starts after `takeover_delay_s` if `standby_takeover`. `duration_s` ends it (pump repaired)."""

    kind: Literal["pump_degradation"]
    pumps: list[int] = Field(default_factory=lambda: [1], description="1-based pump numbers that wear")
    magnitude: float = Field(gt=0, le=1, description="Share of the pump's rated flow lost at full ramp")
    trip_at_capacity: float | None = Field(None, ge=0, lt=1, description="The pump trips when its remaining "
                                           "capacity reaches this share (null: it never trips)")
    standby_takeover: bool = True
    takeover_delay_s: float = Field(10.0, ge=0)

    def remaining(self, t_s: np.ndarray) -> np.ndarray:
        """Share of its rated flow the worn pump still delivers at each time."""
        return 1.0 - self.magnitude * self.envelope(t_s)

    def tripped(self, t_s: np.ndarray) -> np.ndarray:
        if self.trip_at_capacity is None:
            return np.zeros(np.shape(t_s), dtype=bool)
        return self.active(t_s) & (self.remaining(t_s) <= self.trip_at_capacity + 1e-12)

    def trip_s(self) -> float | None:
        """When the pump trips (None: never)."""
        if self.trip_at_capacity is None or 1.0 - self.magnitude > self.trip_at_capacity:
            return None
        trip = self.onset_s + self.ramp_s * (1.0 - self.trip_at_capacity) / self.magnitude
        return trip if self.duration_s is None or trip < self.onset_s + self.duration_s else None

    def abrupt_instants_s(self) -> list[float]:
        trip = self.trip_s()
        extra = [] if trip is None else [trip] + ([trip + self.takeover_delay_s] if self.standby_takeover else [])
        return super().abrupt_instants_s() + extra


class FlowRestriction(_Fault):
    """A clogged strainer / stuck valve on one rack (target: rack id). magnitude = share of the
    rack's flow lost at design pressure (0..1)."""

    kind: Literal["flow_restriction"]
    magnitude: float = Field(gt=0, le=1)


class HxFouling(_Fault):
    """Heat-exchanger fouling (target: CDU id). magnitude = approach multiplier at full ramp (>1)."""

    kind: Literal["hx_fouling"]
    magnitude: float = Field(gt=1)


class FacilityWaterRise(_Fault):
    """Facility water supply temperature rises (target: CDU id or "*"). magnitude = kelvin."""

    kind: Literal["facility_water_rise"]
    magnitude: float = Field(gt=0)


class Leak(_Fault):
    """Coolant leak (target: rack id or CDU id). magnitude = L/min lost from the CDU loop; the
    detector at the target trips (Warning after 5 s, Critical after 30 s or at >= 5 L/min)."""

    kind: Literal["leak"]
    magnitude: float = Field(gt=0)


class LoadSurge(_Fault):
    """IT load surge (target: rack, CDU, module id or "*"). magnitude = demand multiplier."""

    kind: Literal["load_surge"]
    magnitude: float = Field(gt=0)


class SensorFault(_Fault):
    """A sensor misreports (target: device id; metric: canonical metric). stuck = holds the value
    it had at onset; drift = adds magnitude per hour; dropout = no value (NaN / not published);
    spike = adds magnitude at random samples (probability spike_probability)."""

    kind: Literal["sensor_fault"]
    metric: str
    mode: Literal["stuck", "drift", "dropout", "spike"]
    magnitude: float = 0.0
    spike_probability: float = Field(0.05, gt=0, le=1)


class DeviceFault(_Fault):
    """A Modbus device stops answering (mode silent: requests time out) or answers every request
    with a Modbus exception (mode exception, default code 0x0B gateway target failed to respond)."""

    kind: Literal["device_fault"]
    mode: Literal["silent", "exception"] = "exception"
    exception_code: int = Field(11, ge=1, le=255)


Fault = Annotated[PumpFailure | FlowRestriction | HxFouling | FacilityWaterRise | Leak | LoadSurge | PumpDegradation
                  | SensorFault | DeviceFault, Field(discriminator="kind")]
FAULT_KINDS = ("pump_failure", "flow_restriction", "hx_fouling", "facility_water_rise", "leak", "load_surge",
               "pump_degradation", "sensor_fault", "device_fault")
PHYSICAL_KINDS = FAULT_KINDS[:7]
FAULT_MODELS = (PumpFailure, FlowRestriction, HxFouling, FacilityWaterRise, Leak, LoadSurge, PumpDegradation,
                SensorFault, DeviceFault)


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "scenario"
    description: str = ""
    site: str | None = Field(None, description="Id of the site this scenario was written for (checked when given: "
                                               "its targets are that site's ids)")
    duration_s: float | None = Field(None, gt=0, description="Suggested run length in simulated seconds")
    faults: list[Fault] = Field(default_factory=list)

    def model_post_init(self, _ctx) -> None:
        for i, f in enumerate(self.faults):
            if f.id is None:
                f.id = f"{f.kind}-{i}"

    # ---------------------------------------------------------------- loading and checking

    @classmethod
    def load(cls, path: str | Path, site: Site | None = None) -> "Scenario":
        from podwatch.site import read_yaml_file

        path = Path(path)
        return cls.parse(read_yaml_file(path, "scenario file"), str(path), site)

    @classmethod
    def parse(cls, data, source: str = "<scenario>", site: Site | None = None) -> "Scenario":
        if not isinstance(data, dict):
            raise ConfigError(source, ["<root>: a scenario must be a mapping (name:, faults:)"])
        try:
            scenario = cls.model_validate(data)
        except ValidationError as exc:
            from podwatch.site import model_field_names, pydantic_error_lines

            raise ConfigError(source, pydantic_error_lines(exc, skip=FAULT_KINDS, fields_hint="docs/simulator.md lists each fault kind's fields",
                                                         known_fields=model_field_names(cls, *FAULT_MODELS))) from None
        if site is not None:
            errors = scenario.check(site)
            if errors:
                raise ConfigError(source, errors)
        return scenario

    def check(self, site: Site) -> list[str]:
        """Every target must exist in the site and suit its fault kind."""
        racks = {r.id for r in site.racks}
        cdus = {c.id: c for c in site.cdus}
        modules = {m.id for m in site.modules}
        devices = {d.id: d for d in site.devices}
        errors = []
        if self.site is not None and self.site != site.id:
            # every target would be "unknown" otherwise: say the real mistake once
            return [f"site: scenario written for site '{self.site}', but the site is '{site.id}'"]
        first_with_id: dict[str, int] = {}
        for i, f in enumerate(self.faults):
            here = f"faults[{i}]"
            if f.id in first_with_id:  # the ground truth names faults by id: two with one id are ambiguous
                errors.append(f"{here}.id: duplicate fault id '{f.id}' (also faults[{first_with_id[f.id]}])")
            first_with_id.setdefault(f.id, i)
            allowed: dict[str, set] = {
                "pump_failure": set(cdus), "flow_restriction": racks, "hx_fouling": set(cdus),
                "facility_water_rise": set(cdus) | {"*"}, "leak": racks | set(cdus),
                "load_surge": racks | set(cdus) | modules | {"*"}, "pump_degradation": set(cdus),
                "sensor_fault": set(devices),
                "device_fault": set(devices)}
            if f.target not in allowed[f.kind]:
                errors.append(f"{here}.target: '{f.target}' is not a valid {f.kind} target "
                              f"({_target_help(f.kind)})")
                continue
            may_hit = {"load_surge": ("rack", "CDU", "module"), "leak": ("rack", "CDU")}.get(f.kind, ())
            kinds_named = [name for name, ids in (("rack", racks), ("CDU", set(cdus)), ("module", modules))
                           if name in may_hit and f.target in ids]
            if len(kinds_named) > 1:  # ids are unique per kind only: the fault would silently pick one
                errors.append(f"{here}.target: '{f.target}' is both a {' and a '.join(kinds_named)}; "
                              "rename one in the site file")
                continue
            if isinstance(f, (PumpFailure, PumpDegradation)):
                installed = min(cdus[f.target].pumps, MAX_PUMPS)
                bad = [p for p in f.pumps if not 1 <= p <= installed]
                if bad:
                    errors.append(f"{here}.pumps: {bad} not installed on {f.target} (pumps 1..{installed})")
            if isinstance(f, SensorFault):
                from podwatch.collectors.profiles import load_profile

                dev = devices[f.target]
                profile = load_profile(dev.profile, site.profiles_dir)
                metrics = {p.metric for p in profile.points}
                if f.metric not in metrics:
                    errors.append(f"{here}.metric: '{f.metric}' is not served by {f.target} "
                                  f"(profile {dev.profile}: {', '.join(sorted(metrics))})")
            if isinstance(f, DeviceFault) and devices[f.target].protocol == "mqtt":
                errors.append(f"{here}.target: device faults apply to Modbus devices; '{f.target}' is MQTT "
                              "(use a sensor_fault with mode dropout)")
        return errors

    # ---------------------------------------------------------------- compiling

    def affected_racks(self, fault, site: Site) -> list[str]:
        """Racks whose cooling or load the fault changes (for ground-truth attribution)."""
        if fault.kind in ("sensor_fault", "device_fault"):
            return []
        if fault.target == "*":
            return [r.id for r in site.racks]
        cdu_ids = {c.id for c in site.cdus}
        if fault.target in cdu_ids:
            return [r.id for r in site.racks if r.cdu == fault.target]
        if fault.target in {m.id for m in site.modules}:
            return [r.id for r in site.racks if r.module == fault.target]
        rack = site.rack(fault.target)
        if fault.kind == "leak":  # the reservoir of the rack's CDU drains
            return [r.id for r in site.racks if r.cdu == rack.cdu]
        return [rack.id]

    def modifiers(self, t_s: np.ndarray, site: Site) -> Modifiers:
        """The physics modifiers at each time in `t_s` (simulated seconds since start)."""
        t_s = np.asarray(t_s, dtype=np.float64)
        rack_ids = [r.id for r in site.racks]
        cdu_ids = [c.id for c in site.cdus]
        rix = {r: i for i, r in enumerate(rack_ids)}
        cix = {c: i for i, c in enumerate(cdu_ids)}
        mods = Modifiers.neutral(len(t_s), len(rack_ids), len(cdu_ids))
        for f in self.faults:
            if f.kind in ("sensor_fault", "device_fault"):
                continue
            env = f.envelope(t_s)
            if not env.any():
                continue
            if isinstance(f, PumpFailure):
                c = cix[f.target]
                act = f.active(t_s)
                for p in f.pumps:
                    mods.pump_failed[:, c, p - 1] |= act
                if not f.standby_takeover:
                    mods.takeover_enabled[:, c] &= ~act
                mods.takeover_delay_s[:, c] = np.where(act, f.takeover_delay_s, mods.takeover_delay_s[:, c])
            elif isinstance(f, PumpDegradation):
                c = cix[f.target]
                remaining = f.remaining(t_s)
                tripped = f.tripped(t_s)
                for p in f.pumps:
                    mods.pump_capacity[:, c, p - 1] = np.minimum(mods.pump_capacity[:, c, p - 1], remaining)
                    mods.pump_failed[:, c, p - 1] |= tripped
                if tripped.any():
                    if not f.standby_takeover:
                        mods.takeover_enabled[:, c] &= ~tripped
                    mods.takeover_delay_s[:, c] = np.where(tripped, f.takeover_delay_s, mods.takeover_delay_s[:, c])
            elif isinstance(f, FlowRestriction):
                mods.restriction[:, rix[f.target]] *= 1.0 - f.magnitude * env
            elif isinstance(f, HxFouling):
                c = cix[f.target]
                mods.fouling[:, c] = np.maximum(mods.fouling[:, c], 1.0 + (f.magnitude - 1.0) * env)
            elif isinstance(f, FacilityWaterRise):
                cols = list(range(len(cdu_ids))) if f.target == "*" else [cix[f.target]]
                mods.facility_offset_c[:, cols] += f.magnitude * env[:, None]
            elif isinstance(f, Leak):
                since = t_s - f.onset_s
                act = f.active(t_s)
                state = np.where(act & (since >= LEAK_WARNING_AFTER_S),
                                 np.where((since >= LEAK_CRITICAL_AFTER_S) | (f.magnitude >= LEAK_CRITICAL_LPM), 2, 1), 0)
                if f.target in cix:
                    c = cix[f.target]
                    mods.cdu_leak_state[:, c] = np.maximum(mods.cdu_leak_state[:, c], state)
                else:
                    r = rix[f.target]
                    c = cix[site.rack(f.target).cdu]
                    mods.rack_leak_state[:, r] = np.maximum(mods.rack_leak_state[:, r], state)
                mods.leak_lpm[:, c] += f.magnitude * env
            elif isinstance(f, LoadSurge):
                cols = [rix[r] for r in self.affected_racks(f, site)]
                mods.load_mult[:, cols] *= (1.0 + (f.magnitude - 1.0) * env)[:, None]
        return mods

    def device_faults_at(self, t_s: float) -> dict[str, DeviceFault]:
        """Device id -> the device fault active at `t_s` (the last one listed wins)."""
        out = {}
        for f in self.faults:
            if isinstance(f, DeviceFault) and bool(f.active(np.array([t_s]))[0]):
                out[f.target] = f
        return out

    @property
    def sensor_faults(self) -> list[SensorFault]:
        return [f for f in self.faults if isinstance(f, SensorFault)]

    @property
    def device_faults(self) -> list[DeviceFault]:
        return [f for f in self.faults if isinstance(f, DeviceFault)]


def _target_help(kind: str) -> str:
    return {"pump_failure": "a CDU id", "flow_restriction": "a rack id", "hx_fouling": "a CDU id",
            "facility_water_rise": "a CDU id or '*'", "leak": "a rack or CDU id",
            "load_surge": "a rack, CDU or module id, or '*'", "pump_degradation": "a CDU id",
            "sensor_fault": "a device id",
            "device_fault": "a device id"}[kind]


def merge(scenarios: list[Scenario]) -> Scenario:
    """One scenario holding the faults of several (ids made unique)."""
    faults = []
    for k, s in enumerate(scenarios):
        for f in s.faults:
            g = f.model_copy()
            g.id = f"{s.name}/{f.id}" if len(scenarios) > 1 else f.id
            faults.append(g)
    durations = [s.duration_s for s in scenarios if s.duration_s]
    return Scenario(name="+".join(s.name for s in scenarios) or "none", faults=faults,
                    duration_s=max(durations) if durations else None)


class SensorFaultState:
    """Remembers what a stuck sensor froze at, across calls (live ticks or history chunks)."""

    def __init__(self, seed: int = 0) -> None:
        self.stuck_values: dict[str, float] = {}
        self.rng = np.random.default_rng(seed + 7919)


def apply_sensor_faults(scenario: Scenario, obs, state: SensorFaultState) -> None:
    """Change `obs` (an `observe.Observation`) in place where sensor faults are active."""
    for f in scenario.sensor_faults:
        loc = obs.locate(f.target, f.metric)
        if loc is None:
            continue
        values, col = loc
        act = f.active(obs.t_s)
        if not act.any():
            continue
        column = values[:, col]
        if f.mode == "stuck":
            if f.id not in state.stuck_values:
                state.stuck_values[f.id] = float(column[np.argmax(act)])
            column[act] = state.stuck_values[f.id]
        elif f.mode == "drift":
            column[act] += f.magnitude * (obs.t_s[act] - f.onset_s) / 3600.0
        elif f.mode == "dropout":
            column[act] = np.nan
        elif f.mode == "spike":
            hit = act & (state.rng.random(len(column)) < f.spike_probability)
            column[hit] += f.magnitude


def random_scenario(site: Site, duration_s: float, episodes_per_day: float, seed: int,
                    sensor_faults: bool = True, warmup_s: float = 3600.0) -> Scenario:
    """Randomised fault episodes for training histories: kinds, targets, onsets, magnitudes and
    durations drawn from the seed. Episodes last 10 min - 3 h (fouling and facility rises ramp over
    hours); the severe ones (all duty pumps lost without takeover, large restrictions) breach. Roughly `episodes_per_day` episodes per day."""
    rng = np.random.default_rng(seed + 104729)
    n = rng.poisson(episodes_per_day * duration_s / 86400.0)
    cdus = site.cdus
    racks = site.racks
    devices = [d for d in site.devices if d.enabled]
    faults: list[dict] = []
    kinds = ["pump_failure", "flow_restriction", "hx_fouling", "facility_water_rise", "leak", "load_surge"]
    weights = np.array([3, 3, 1, 1, 1, 2], dtype=float)
    if sensor_faults:
        kinds.append("sensor_fault")
        weights = np.append(weights, 2.0)
    weights /= weights.sum()
    onsets = np.sort(rng.uniform(warmup_s, max(warmup_s + 1, duration_s - 600), n))
    for i, onset in enumerate(onsets):
        kind = str(rng.choice(kinds, p=weights))
        dur = float(rng.uniform(600, 3 * 3600))
        base = {"id": f"ep{i:04d}-{kind}", "onset_s": round(float(onset), 1), "duration_s": round(dur, 1), "kind": kind}
        cdu = cdus[int(rng.integers(len(cdus)))]
        rack = racks[int(rng.integers(len(racks)))]
        if kind == "pump_failure":
            duty = list(range(1, cdu.working_pumps + 1))
            pumps = duty if rng.random() < 0.5 else [int(rng.choice(duty))]
            faults.append({**base, "target": cdu.id, "pumps": pumps, "standby_takeover": bool(rng.random() < 0.5),
                           "takeover_delay_s": float(rng.uniform(5, 30))})
        elif kind == "flow_restriction":
            faults.append({**base, "target": rack.id, "magnitude": round(float(rng.uniform(0.3, 0.95)), 3),
                           "ramp_s": float(rng.uniform(0, 1800))})
        elif kind == "hx_fouling":
            faults.append({**base, "target": cdu.id, "magnitude": round(float(rng.uniform(2, 8)), 2),
                           "ramp_s": float(rng.uniform(0.3, 1.0) * dur)})
        elif kind == "facility_water_rise":
            faults.append({**base, "target": cdu.id, "magnitude": round(float(rng.uniform(3, 16)), 2),
                           "ramp_s": float(rng.uniform(0.2, 0.8) * dur)})
        elif kind == "leak":
            target = rack.id if rng.random() < 0.6 else cdu.id
            faults.append({**base, "target": target, "magnitude": round(float(rng.uniform(0.5, 8)), 2),
                           "duration_s": round(min(dur, 3600.0), 1)})
        elif kind == "load_surge":
            faults.append({**base, "target": rack.id if rng.random() < 0.5 else cdu.id,
                           "magnitude": round(float(rng.uniform(1.1, 1.6)), 3), "ramp_s": float(rng.uniform(0, 300))})
        elif kind == "sensor_fault":
            from podwatch.collectors.profiles import load_profile

            dev = devices[int(rng.integers(len(devices)))]
            metric = str(rng.choice([p.metric for p in load_profile(dev.profile, site.profiles_dir).points]))
            mode = str(rng.choice(["stuck", "drift", "dropout", "spike"]))
            faults.append({**base, "target": dev.id, "metric": metric, "mode": mode,
                           "magnitude": round(float(rng.uniform(1, 10) * (1 if rng.random() < 0.5 else -1)), 2)})
    return Scenario.parse({"name": f"random-{seed}", "description": "randomised fault episodes",
                           "duration_s": duration_s, "faults": faults}, "random_scenario", site)
