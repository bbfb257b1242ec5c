"""Site physics: power, coolant hydraulics and heat, vectorised with numpy over all racks and CDUs.

`SitePhysics` holds the state of one site and advances it with `step(dt_s, t_s, demand_kw, mods)`;
it never reads the wall clock, so a test drives it with any time step and a seed makes it
deterministic. Live mode (`engine.Simulator`) calls it every simulated second; history mode
(`history.generate_history`) calls it once per output row with the load and the fault modifiers
computed for a whole chunk of time at once.

The model, per step:

* **Load**: demand (from `workload`) x scenario load multiplier, capped at 117 % of rated
  (GB300-class peak), x the rack's throttle factor = rack IT power.
* **Throttling**: while a rack's coolant return is above its `return_limit_c` the GPUs throttle:
  the throttle factor falls by `THROTTLE_RATE_PER_K_S` per kelvin over the limit per second (floor
  30 %; 0 = thermal shutdown when 15 K over). It recovers (`THROTTLE_RECOVERY_PER_S`) only once
  the return is 1 K below the limit. Below the limit it never falls.
* **Hydraulics**: each CDU holds the loop's differential pressure at its design value with its
  running pumps; a rack's flow at design pressure is its design flow x its restriction factor
  (1 = clear). When the running pumps cannot deliver the racks' demand (pump failure, low
  reservoir), the pressure falls as (capacity / demand)^2 and every rack's flow with its square
  root (parallel branches on a quadratic system curve). Pumps run at the speed that delivers the
  demand (flow ~ speed, affinity law), 100 % when short. A degrading pump (`pump_capacity` < 1)
  delivers only that share of its rated flow at full speed: the others speed up to make up for it
  until the running pumps together fall short of the racks' demand, then the flow falls. N+1: one standby pump starts
  `takeover_delay_s` after a duty pump fails, unless the scenario disables takeover. Flow follows
  with a 3 s lag (pump spin-up/down).
* **Heat**: all rack IT power ends up as heat, `heat_to_liquid` of it in the coolant, the rest in
  the room air. Each rack's coolant and cold plates have a heat capacity of `RACK_HEAT_CAPACITY_KJ_K`;
  return temperature follows
  ``C dT/dt = Q_liquid - m_dot c_p (T - T_supply)``, integrated exactly over the step, so at
  steady state ``dT = Q / (m_dot c_p)`` (water: 1 kg/L, c_p 4.18 kJ/kg/K) and the time constant
  is C / (m_dot c_p), ~20-30 s at design flow; with no flow the return rises by ~Q/C per second
  (a small loss to room air, `AMBIENT_LOSS_KW_K`, bounds it once the GPUs have shut down).
* **CDU supply control**: the facility-water valve opens as far as needed to hold the supply
  setpoint; the coldest reachable supply is facility water + approach, where the approach is the
  design approach x the heat load fraction x the fouling factor. Supply follows its target with a
  60 s lag (the facility loop is slower than the racks).
* **Reservoir and leaks**: a leak drains the loop's reservoir (`RESERVOIR_L`); below 20 % the pumps
  start drawing air (capacity falls), below 5 % they lose prime. Once no leak is active the
  makeup system refills it at `MAKEUP_LPM`.
* **Electrical**: rack power splits A/B ~50/50 with a small fixed imbalance, each side three
  phases; energy counters integrate power every step and only increase. Power nodes (busway,
  feeder, transformer) carry their racks' sides plus the CDUs' cooling overhead (pumps ~ speed^3,
  controls, facility heat rejection, air cooling) with 0.5 % distribution loss per level;
  transformers add no-load and load (I^2R) losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

from podwatch.site import Site
from podwatch.simulators.workload import RackLoadParams

CP_WATER_KJ_KG_K = 4.18
WATER_KG_PER_L = 1.0
RACK_HEAT_CAPACITY_KJ_K = 250.0  # ~45 L of coolant in the rack manifold and cold plates, plus the plates' copper
FLOW_TAU_S = 3.0
SUPPLY_TAU_S = 60.0
MAX_LOAD_FACTOR = 1.17  # GB300-class racks peak ~155 kW on 132 kW nominal
THROTTLE_RATE_PER_K_S = 0.02
THROTTLE_RECOVERY_PER_S = 0.01
THROTTLE_FLOOR = 0.30
SHUTDOWN_FLOOR = 0.0  # thermal shutdown: the GPUs power off
SHUTDOWN_MARGIN_K = 15.0
MAX_PUMPS = 4
DESIGN_LOOP_DP_KPA = 150.0
RACK_DP_SHARE = 0.6  # share of the loop differential pressure seen across a rack's manifold
STATIC_PRESSURE_KPA = 120.0  # expansion tank / fill pressure on the return side
RESERVOIR_L = 200.0
RESERVOIR_START_PCT = 80.0
MAKEUP_LPM = 10.0  # auto-fill from the makeup tank once no leak is active
AMBIENT_LOSS_KW_K = 0.02  # rack coolant/cold plates lose a little heat to room air (matters only without flow)
PUMP_HYDRAULIC_EFFICIENCY = 0.6
CDU_CONTROLS_KW = 0.5
FACILITY_REJECTION_KW_PER_KW = 0.08  # dry coolers + facility pumps per kW of heat to liquid (warm water)
AIR_COOLING_KW_PER_KW = 0.25  # CRAH fans + chilled water per kW of heat to air
DISTRIBUTION_LOSS = 0.005  # per level: rack feed -> busway -> feeder
TRANSFORMER_NO_LOAD_LOSS = 0.0015
TRANSFORMER_LOAD_LOSS = 0.009  # at nameplate, scales with (load / nameplate)^2
FACILITY_DESIGN_DT_K = 6.0
ROOM_AIR_C = 24.0


@dataclass
class Modifiers:
    """What the scenario does to the physics at each of T time steps (arrays with leading T)."""

    load_mult: np.ndarray  # (T, racks) demand multiplier
    restriction: np.ndarray  # (T, racks) remaining hydraulic conductance, 1 = clear
    fouling: np.ndarray  # (T, cdus) approach multiplier, 1 = clean heat exchanger
    facility_offset_c: np.ndarray  # (T, cdus) facility water above design
    leak_lpm: np.ndarray  # (T, cdus) coolant lost from each CDU loop
    rack_leak_state: np.ndarray  # (T, racks) rack leak detector 0/1/2
    cdu_leak_state: np.ndarray  # (T, cdus) CDU leak detector 0/1/2 (before the low-level check)
    pump_failed: np.ndarray  # (T, cdus, MAX_PUMPS) bool
    pump_capacity: np.ndarray  # (T, cdus, MAX_PUMPS) share of its rated flow a pump still delivers, 1 = healthy
    takeover_enabled: np.ndarray  # (T, cdus) bool: standby may start
    takeover_delay_s: np.ndarray  # (T, cdus)

    @classmethod
    def neutral(cls, steps: int, n_racks: int, n_cdus: int) -> "Modifiers":
        return cls(
            load_mult=np.ones((steps, n_racks)), restriction=np.ones((steps, n_racks)),
            fouling=np.ones((steps, n_cdus)), facility_offset_c=np.zeros((steps, n_cdus)),
            leak_lpm=np.zeros((steps, n_cdus)), rack_leak_state=np.zeros((steps, n_racks)),
            cdu_leak_state=np.zeros((steps, n_cdus)), pump_failed=np.zeros((steps, n_cdus, MAX_PUMPS), dtype=bool),
            pump_capacity=np.ones((steps, n_cdus, MAX_PUMPS)),
            takeover_enabled=np.ones((steps, n_cdus), dtype=bool), takeover_delay_s=np.full((steps, n_cdus), 10.0))

    def row(self, i: int) -> "Modifiers":
        return Modifiers(**{f.name: getattr(self, f.name)[i:i + 1] for f in fields(self)})


def _clip(x, lo, hi):
    """np.clip without its Python-level overhead (it dominates on arrays of a few dozen values)."""
    return np.minimum(np.maximum(x, lo), hi)


class _ModRow:
    """One time row of Modifiers, read as m["field"] without copying."""

    __slots__ = ("mods", "row")

    def __init__(self, mods: Modifiers, row: int) -> None:
        self.mods, self.row = mods, row

    def __getitem__(self, name: str) -> np.ndarray:
        return getattr(self.mods, name)[self.row]


@dataclass
class Snapshot:
    """The physical state at T instants (leading axis T). History stacks one row per step; live mode
    takes T = 1. `observe.observe()` turns it into device readings."""

    t_s: np.ndarray  # (T,) simulated seconds since start
    rack_demand_kw: np.ndarray
    rack_power_kw: np.ndarray
    rack_throttle: np.ndarray
    rack_flow_lpm: np.ndarray
    rack_supply_c: np.ndarray
    rack_return_c: np.ndarray
    rack_dp_kpa: np.ndarray
    rack_leak_state: np.ndarray
    side_power_kw: np.ndarray  # (T, 2*racks): [rack0 a, rack0 b, rack1 a, ...]
    side_energy_kwh: np.ndarray
    cdu_supply_c: np.ndarray
    cdu_return_c: np.ndarray
    cdu_flow_lpm: np.ndarray
    cdu_heat_kw: np.ndarray
    cdu_valve_pct: np.ndarray
    cdu_facility_supply_c: np.ndarray
    cdu_facility_return_c: np.ndarray
    cdu_reservoir_pct: np.ndarray
    cdu_leak_state: np.ndarray
    cdu_supply_kpa: np.ndarray
    cdu_return_kpa: np.ndarray
    cdu_dp_kpa: np.ndarray
    cdu_status: np.ndarray
    cdu_overhead_kw: np.ndarray
    pump_speed_pct: np.ndarray  # (T, cdus, MAX_PUMPS)
    pump_running: np.ndarray  # (T, cdus, MAX_PUMPS)
    pump_fault: np.ndarray  # (T, cdus, MAX_PUMPS): failed (tripped) pumps, 1.0; healthy ones, running or standby, 0.0
    node_power_kw: np.ndarray  # (T, nodes)
    node_energy_kwh: np.ndarray


SNAPSHOT_FIELDS = [f.name for f in fields(Snapshot)]


@dataclass
class Topology:
    """Static arrays derived from the site file."""

    rack_ids: list[str]
    cdu_ids: list[str]
    node_ids: list[str]  # non-rack power nodes (transformers, feeders, busways)
    rack_cdu: np.ndarray  # (racks,) CDU index
    rated_kw: np.ndarray
    design_flow_lpm: np.ndarray
    return_limit_c: np.ndarray
    heat_to_liquid: np.ndarray  # per rack (from its CDU)
    side_frac_a: np.ndarray  # (racks,) share of rack power on the A side
    cdu_capacity_kw: np.ndarray
    cdu_approach_c: np.ndarray
    cdu_setpoint_c: np.ndarray
    cdu_facility_c: np.ndarray
    cdu_pump_flow_lpm: np.ndarray
    cdu_pumps: np.ndarray  # installed
    cdu_working: np.ndarray  # duty pumps
    pump_installed: np.ndarray  # (cdus, MAX_PUMPS) bool
    pump_duty: np.ndarray  # (cdus, MAX_PUMPS) bool
    cdu_design_flow_lpm: np.ndarray
    node_from_sides: np.ndarray  # (nodes, 2*racks) loss-compounded aggregation
    node_from_cdus: np.ndarray  # (nodes, cdus) cooling overhead shares
    node_is_transformer: np.ndarray
    node_nameplate_kw: np.ndarray
    node_voltage_ll: np.ndarray
    side_voltage_ll: np.ndarray  # (2*racks,)

    @classmethod
    def from_site(cls, site: Site, rng: np.random.Generator) -> "Topology":
        racks = site.racks
        cdus = site.cdus
        rack_index = {r.id: i for i, r in enumerate(racks)}
        cdu_index = {c.id: i for i, c in enumerate(cdus)}
        n_r, n_c = len(racks), len(cdus)
        rack_cdu = np.array([cdu_index[r.cdu] for r in racks], dtype=np.int64)
        design_flow = np.array([r.design_flow_lpm for r in racks])
        pump_installed = np.zeros((n_c, MAX_PUMPS), dtype=bool)
        pump_duty = np.zeros((n_c, MAX_PUMPS), dtype=bool)
        for i, c in enumerate(cdus):
            pump_installed[i, :min(c.pumps, MAX_PUMPS)] = True
            pump_duty[i, :min(c.working_pumps, MAX_PUMPS)] = True
        # power nodes: everything but the rack feeds, in a stable order
        node_ids = [n.id for n in site.power_nodes.values() if n.kind != "rack_feed"]
        node_index = {nid: i for i, nid in enumerate(node_ids)}
        defaults_v = site.spec.defaults.voltage_v
        volts: dict[str, float] = {}
        for t in site.spec.power.transformers:
            volts[t.id] = (t.secondary_kv * 1000.0) if t.secondary_kv else (t.voltage_v or defaults_v)
        for f in site.spec.power.feeders:
            volts[f.id] = f.voltage_v or volts.get(f.transformer, defaults_v)
        for m in site.spec.modules:
            for b in m.busways:
                volts[b.id] = b.voltage_v or volts.get(b.feeder, defaults_v)
        node_voltage = np.array([volts.get(nid, defaults_v) for nid in node_ids])
        n_sides = 2 * n_r
        from_sides = np.zeros((len(node_ids), n_sides))
        from_cdus = np.zeros((len(node_ids), n_c))
        for i, r in enumerate(racks):
            for s, side in enumerate(("a", "b")):
                path = site.power_path(f"{r.id}/{side}")  # rack feed first, transformer last
                for level, node in enumerate(path[1:], start=1):
                    from_sides[node_index[node.id], 2 * i + s] = (1.0 + DISTRIBUTION_LOSS) ** level
        for ci, c in enumerate(cdus):
            parents = sorted({getattr(site.rack(rid), f"feed_{side}") for rid in c.racks for side in ("a", "b")})
            for parent in parents:
                for level, node in enumerate(site.power_path(parent)):
                    from_cdus[node_index[node.id], ci] += (1.0 + DISTRIBUTION_LOSS) ** level / len(parents)
        side_v = np.repeat([r.spec.whips.voltage_v for r in racks], 2).astype(float)
        return cls(
            rack_ids=[r.id for r in racks], cdu_ids=[c.id for c in cdus], node_ids=node_ids,
            rack_cdu=rack_cdu, rated_kw=np.array([r.rated_kw for r in racks]), design_flow_lpm=design_flow,
            return_limit_c=np.array([r.return_limit_c for r in racks]),
            heat_to_liquid=np.array([cdus[rack_cdu[i]].heat_to_liquid for i in range(n_r)]),
            side_frac_a=np.clip(0.5 + rng.normal(0, 0.012, n_r), 0.46, 0.54),
            cdu_capacity_kw=np.array([c.capacity_kw for c in cdus]),
            cdu_approach_c=np.array([c.approach_c for c in cdus]),
            cdu_setpoint_c=np.array([c.supply_setpoint_c for c in cdus]),
            cdu_facility_c=np.array([c.facility_supply_c for c in cdus]),
            cdu_pump_flow_lpm=np.array([c.pump_flow_lpm for c in cdus]),
            cdu_pumps=np.array([c.pumps for c in cdus]), cdu_working=np.array([c.working_pumps for c in cdus]),
            pump_installed=pump_installed, pump_duty=pump_duty,
            cdu_design_flow_lpm=np.bincount(rack_cdu, weights=design_flow, minlength=n_c),
            node_from_sides=from_sides, node_from_cdus=from_cdus,
            node_is_transformer=np.array([site.power_nodes[n].kind == "transformer" for n in node_ids]),
            node_nameplate_kw=np.array([site.power_nodes[n].nameplate_kw for n in node_ids]),
            node_voltage_ll=node_voltage, side_voltage_ll=side_v)


@dataclass
class SitePhysics:
    """Mutable physical state of one site; `step()` advances it (see the module docstring)."""

    site: Site
    seed: int = 0
    topo: Topology = field(init=False)
    load: RackLoadParams = field(init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.topo = Topology.from_site(self.site, self.rng)
        self.load = RackLoadParams.draw([r.workload for r in self.site.racks], self.rng)
        tp = self.topo
        n_r, n_c = len(tp.rack_ids), len(tp.cdu_ids)
        self.t_s = 0.0
        self.rack_demand_kw = tp.rated_kw * 0.6
        self.throttle = np.ones(n_r)
        self.rack_power_kw = self.rack_demand_kw.copy()
        self.rack_flow_lpm = tp.design_flow_lpm.copy()
        self.cdu_supply_c = tp.cdu_setpoint_c.copy()
        self.rack_supply_c = self.cdu_supply_c[tp.rack_cdu]
        g = self.rack_flow_lpm / 60.0 * WATER_KG_PER_L * CP_WATER_KJ_KG_K
        self.rack_return_c = self.rack_supply_c + self.rack_power_kw * tp.heat_to_liquid / g
        self.above_limit = np.zeros(n_r, dtype=bool)
        self.reservoir_pct = np.full(n_c, RESERVOIR_START_PCT)
        self.pump_failed_since = np.full((n_c, MAX_PUMPS), np.nan)
        self.standby_on = np.zeros((n_c, MAX_PUMPS), dtype=bool)
        self.side_energy_kwh = self.rng.uniform(2e5, 6e5, 2 * n_r)  # PDUs have been in service a while
        self.node_energy_kwh = self.rng.uniform(1e7, 3e7, len(tp.node_ids))
        self._last: Snapshot | None = None
        # fill every derived quantity once with a zero-length step
        self.step(0.0, 0.0, self.rack_demand_kw, Modifiers.neutral(1, n_r, n_c))

    # ------------------------------------------------------------------ the step

    def step(self, dt_s: float, t_s: float, demand_kw: np.ndarray, mods: Modifiers, row: int = 0) -> Snapshot:
        """Advance by `dt_s` to simulated time `t_s` with rack demand `demand_kw` (racks,) and the
        scenario's modifiers for this step (row `row` of `mods`). Returns the new state (T = 1)."""
        tp = self.topo
        m = _ModRow(mods, row)
        self.t_s = t_s
        rc = tp.rack_cdu

        # --- pumps: duty pumps, failures, N+1 standby takeover
        failed = m["pump_failed"] & tp.pump_installed
        newly = failed & np.isnan(self.pump_failed_since)
        self.pump_failed_since[newly] = t_s
        self.pump_failed_since[~failed] = np.nan
        self.standby_on &= ~failed
        running = tp.pump_duty & ~failed
        if failed.any():
            for c in np.flatnonzero((failed & tp.pump_duty).any(axis=1)):
                missing = int(tp.cdu_working[c] - running[c].sum() - self.standby_on[c].sum())
                first_failure = np.nanmin(self.pump_failed_since[c])
                if (missing > 0 and m["takeover_enabled"][c]
                        and t_s - first_failure >= m["takeover_delay_s"][c] - 1e-9):
                    spare = np.flatnonzero(tp.pump_installed[c] & ~tp.pump_duty[c] & ~failed[c] & ~self.standby_on[c])
                    self.standby_on[c, spare[:missing]] = True
        else:
            self.standby_on[:] = False  # duty pumps back: standby returns to standby
        running = running | self.standby_on
        level_factor = _clip((self.reservoir_pct - 5.0) / 15.0, 0.0, 1.0)  # air in the pumps below 20 %
        # a worn pump (`pump_capacity` < 1: bearing wear, impeller erosion, cavitation) delivers
        # that share of its rated flow at full speed
        capacity_lpm = (running * _clip(m["pump_capacity"], 0.0, 1.0)).sum(axis=1) * tp.cdu_pump_flow_lpm * level_factor
        conductance = tp.design_flow_lpm * _clip(m["restriction"], 0.0, 1.0)
        demand_lpm = np.bincount(rc, weights=conductance, minlength=len(tp.cdu_ids))
        short = capacity_lpm < demand_lpm
        dp_ratio = np.where(short, (capacity_lpm / np.maximum(demand_lpm, 1e-9)) ** 2, 1.0)
        speed_frac = np.where(short, np.where(capacity_lpm > 0, 1.0, 0.0),
                              demand_lpm / np.maximum(capacity_lpm, 1e-9))
        pump_speed = np.where(running, 100.0 * speed_frac[:, None], 0.0)
        target_flow = conductance * np.sqrt(dp_ratio[rc])
        a_flow = 1.0 - math.exp(-dt_s / FLOW_TAU_S) if dt_s > 0 else 0.0
        flow = self.rack_flow_lpm + (target_flow - self.rack_flow_lpm) * a_flow
        self.rack_flow_lpm = np.where(np.abs(flow - target_flow) < 1e-3, target_flow, flow)  # settle exactly

        # --- load and throttling (throttle reacts to the return temperature of the previous step)
        demand = np.minimum(demand_kw * m["load_mult"], tp.rated_kw * MAX_LOAD_FACTOR)
        over_k = self.rack_return_c - tp.return_limit_c
        floor = np.where(over_k > SHUTDOWN_MARGIN_K, SHUTDOWN_FLOOR, THROTTLE_FLOOR)
        throttle = np.where(over_k > 0, self.throttle - THROTTLE_RATE_PER_K_S * over_k * dt_s,
                            np.where(over_k < -1.0, self.throttle + THROTTLE_RECOVERY_PER_S * dt_s, self.throttle))
        self.throttle = _clip(throttle, floor, 1.0)
        self.rack_demand_kw = demand
        self.rack_power_kw = demand * self.throttle

        # --- heat: rack return temperatures (exact first-order solution over dt)
        q_liquid = self.rack_power_kw * tp.heat_to_liquid
        self.rack_supply_c = self.cdu_supply_c[rc]
        g = self.rack_flow_lpm / 60.0 * WATER_KG_PER_L * CP_WATER_KJ_KG_K  # kW/K
        g_total = g + AMBIENT_LOSS_KW_K
        t_ss = (q_liquid + g * self.rack_supply_c + AMBIENT_LOSS_KW_K * ROOM_AIR_C) / g_total
        decay = np.exp(-dt_s * g_total / RACK_HEAT_CAPACITY_KJ_K)
        self.rack_return_c = t_ss + (self.rack_return_c - t_ss) * decay

        # --- CDU: mixed return, heat removed, supply control against facility water
        n_c = len(tp.cdu_ids)
        mdot_cp = np.bincount(rc, weights=g, minlength=n_c)
        heat_in = np.bincount(rc, weights=q_liquid, minlength=n_c)
        mixed = np.bincount(rc, weights=g * self.rack_return_c, minlength=n_c)
        mean_ret = np.bincount(rc, weights=self.rack_return_c, minlength=n_c) / np.maximum(np.bincount(rc, minlength=n_c), 1)
        cdu_return = np.where(mdot_cp > 1e-6, mixed / np.maximum(mdot_cp, 1e-9), mean_ret)
        cdu_flow = np.bincount(rc, weights=self.rack_flow_lpm, minlength=n_c)
        facility = tp.cdu_facility_c + m["facility_offset_c"]
        approach = tp.cdu_approach_c * np.maximum(m["fouling"], 1.0) * np.maximum(heat_in / tp.cdu_capacity_kw, 0.05)
        margin = tp.cdu_setpoint_c - facility
        valve = np.where(margin > 0, 100.0 * approach / np.maximum(margin, 1e-9), 100.0)
        valve = _clip(valve, 5.0, 100.0)
        target_supply = np.maximum(tp.cdu_setpoint_c, facility + approach)
        a_sup = 1.0 - math.exp(-dt_s / SUPPLY_TAU_S) if dt_s > 0 else 0.0
        self.cdu_supply_c = self.cdu_supply_c + (target_supply - self.cdu_supply_c) * a_sup
        heat_removed = np.maximum(mdot_cp * (cdu_return - self.cdu_supply_c), 0.0)
        fac_mdot_cp = valve / 100.0 * tp.cdu_capacity_kw / FACILITY_DESIGN_DT_K  # kW/K at this valve opening
        fac_return = facility + heat_in / np.maximum(fac_mdot_cp, 1e-9)

        # --- reservoir, leaks, pressures
        leak = m["leak_lpm"]
        makeup = np.where((leak <= 0) & (self.reservoir_pct < RESERVOIR_START_PCT), MAKEUP_LPM, 0.0)
        self.reservoir_pct = _clip(self.reservoir_pct + (makeup - leak) * dt_s / 60.0 / RESERVOIR_L * 100.0,
                                     0.0, np.maximum(self.reservoir_pct, RESERVOIR_START_PCT))
        low_level = np.where(self.reservoir_pct < 30.0, 2, np.where(self.reservoir_pct < 60.0, 1, 0))
        cdu_leak = np.maximum(m["cdu_leak_state"], low_level)
        static = STATIC_PRESSURE_KPA * _clip(self.reservoir_pct / 50.0, 0.2, 1.0)
        loop_dp = DESIGN_LOOP_DP_KPA * dp_ratio
        rack_dp = RACK_DP_SHARE * loop_dp[rc] * np.where(conductance > 0, 1.0, 0.0)

        # --- status: 0 OK, 1 Warning, 2 Critical
        off_setpoint = np.abs(self.cdu_supply_c - tp.cdu_setpoint_c) > 2.0
        warn = (failed & tp.pump_installed).any(axis=1) | off_setpoint | (cdu_leak >= 1)
        crit = (cdu_flow < 0.5 * tp.cdu_design_flow_lpm) | (cdu_leak >= 2)
        status = np.where(crit, 2, np.where(warn, 1, 0))

        # --- electrical: sides, nodes, energy counters
        side_power = np.empty(2 * len(tp.rack_ids))
        side_power[0::2] = self.rack_power_kw * tp.side_frac_a
        side_power[1::2] = self.rack_power_kw * (1.0 - tp.side_frac_a)
        pump_kw = (tp.cdu_pump_flow_lpm / 60000.0 * DESIGN_LOOP_DP_KPA / PUMP_HYDRAULIC_EFFICIENCY)[:, None] \
            * (pump_speed / 100.0) ** 3
        q_air = np.bincount(rc, weights=self.rack_power_kw - q_liquid, minlength=n_c)
        overhead = pump_kw.sum(axis=1) + CDU_CONTROLS_KW + FACILITY_REJECTION_KW_PER_KW * heat_in \
            + AIR_COOLING_KW_PER_KW * q_air
        node_power = tp.node_from_sides @ side_power + tp.node_from_cdus @ overhead
        load_ratio = node_power / tp.node_nameplate_kw
        node_power = node_power + np.where(
            tp.node_is_transformer,
            tp.node_nameplate_kw * (TRANSFORMER_NO_LOAD_LOSS + TRANSFORMER_LOAD_LOSS * load_ratio ** 2), 0.0)
        self.side_energy_kwh = self.side_energy_kwh + side_power * dt_s / 3600.0
        self.node_energy_kwh = self.node_energy_kwh + node_power * dt_s / 3600.0

        snap = Snapshot(
            t_s=np.array([t_s]), rack_demand_kw=demand[None], rack_power_kw=self.rack_power_kw[None],
            rack_throttle=self.throttle[None], rack_flow_lpm=self.rack_flow_lpm[None],
            rack_supply_c=self.rack_supply_c[None], rack_return_c=self.rack_return_c[None], rack_dp_kpa=rack_dp[None],
            rack_leak_state=m["rack_leak_state"][None], side_power_kw=side_power[None],
            side_energy_kwh=self.side_energy_kwh[None], cdu_supply_c=self.cdu_supply_c[None],
            cdu_return_c=cdu_return[None], cdu_flow_lpm=cdu_flow[None], cdu_heat_kw=heat_removed[None],
            cdu_valve_pct=valve[None], cdu_facility_supply_c=facility[None], cdu_facility_return_c=fac_return[None],
            cdu_reservoir_pct=self.reservoir_pct[None], cdu_leak_state=cdu_leak[None],
            cdu_supply_kpa=(static + loop_dp)[None], cdu_return_kpa=static[None], cdu_dp_kpa=loop_dp[None],
            cdu_status=status[None], cdu_overhead_kw=overhead[None], pump_speed_pct=pump_speed[None],
            pump_running=running[None].astype(float), pump_fault=failed[None].astype(float), node_power_kw=node_power[None],
            node_energy_kwh=self.node_energy_kwh[None])
        self._last = snap
        return snap

    @property
    def snapshot(self) -> Snapshot:
        """The state after the last step (T = 1)."""
        assert self._last is not None
        return self._last
