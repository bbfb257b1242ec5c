"""What devices report: physical state (`physics.Snapshot`) -> per-device readings with the
canonical metric names, sensor noise, three-phase detail and meter quantities.

One `Observation` holds, per device kind, a (T, devices) array per metric; live mode uses T = 1,
history mode a whole chunk of time. The Modbus servers and the MQTT publisher encode from it with
the device profiles; history writes it to Parquet. Measurement noise comes from its own random
generator (seeded), so it never disturbs the physics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from podwatch.site import Device, Site
from podwatch.simulators.physics import MAX_PUMPS, ROOM_AIR_C, Snapshot, Topology

SQRT3 = math.sqrt(3.0)
GRID_HZ = 60.0
RACK_VALVE_PCT = 80.0


@dataclass
class Group:
    kind: str
    devices: list[Device]
    values: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> (T, n_devices)


@dataclass
class Observation:
    t_s: np.ndarray  # (T,) simulated seconds since start
    ts_ms: np.ndarray  # (T,) Unix ms
    groups: dict[str, Group]
    _index: dict[str, tuple[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind, g in self.groups.items():
            for j, d in enumerate(g.devices):
                self._index[d.id] = (kind, j)

    def locate(self, device_id: str, metric: str) -> tuple[np.ndarray, int] | None:
        where = self._index.get(device_id)
        if where is None:
            return None
        values = self.groups[where[0]].values.get(metric)
        return None if values is None else (values, where[1])

    def device_points(self, device_id: str, row: int = -1) -> dict[str, float]:
        """metric -> value of one device at one instant (NaN = no value: dropout)."""
        kind, j = self._index[device_id]
        return {m: float(v[row, j]) for m, v in self.groups[kind].values.items()}


class Observer:
    """Turns snapshots into observations for one site (device bindings fixed at construction)."""

    def __init__(self, site: Site, topo: Topology, seed: int = 0) -> None:
        self.site, self.topo = site, topo
        self.rng = np.random.default_rng(seed + 1_000_003)
        rix = {r: i for i, r in enumerate(topo.rack_ids)}
        cix = {c: i for i, c in enumerate(topo.cdu_ids)}
        nix = {n: i for i, n in enumerate(topo.node_ids)}
        self.devices: dict[str, list[Device]] = {"pdu": [], "meter": [], "cdu": [], "rack": []}
        idx: dict[str, list[int]] = {k: [] for k in self.devices}
        for d in site.devices:
            if not d.enabled:
                continue
            if d.kind == "pdu":
                idx["pdu"].append(2 * rix[d.entity] + (0 if d.side == "a" else 1))
            elif d.kind == "meter":
                idx["meter"].append(nix[d.entity])
            elif d.kind == "cdu":
                idx["cdu"].append(cix[d.entity])
            elif d.kind == "rack":
                idx["rack"].append(rix[d.entity])
            else:
                continue
            self.devices[d.kind].append(d)
        self.idx = {k: np.array(v, dtype=np.int64) for k, v in idx.items()}
        # fixed per-device character: phase imbalance, voltage offsets
        n_pdu, n_met = len(self.idx["pdu"]), len(self.idx["meter"])
        self.pdu_phase = self._phase_split(n_pdu)
        self.met_phase = self._phase_split(n_met)
        self.pdu_v_offset = self.rng.normal(0, 0.004, (n_pdu, 3))
        self.met_v_offset = self.rng.normal(0, 0.003, (n_met, 3))
        self.rack_half_rated = np.repeat(topo.rated_kw, 2) / 2.0

    def _phase_split(self, n: int) -> np.ndarray:
        split = 1.0 / 3.0 + self.rng.normal(0, 0.01, (n, 3))
        return split / split.sum(axis=1, keepdims=True)

    def _noise(self, shape, sigma: float) -> np.ndarray:
        return self.rng.normal(0.0, sigma, shape)

    def observe(self, snap: Snapshot, start_ms: int) -> Observation:
        t = snap.t_s
        T = len(t)
        ts_ms = start_ms + np.round(t * 1000.0).astype(np.int64)
        hz = GRID_HZ + 0.012 * np.sin(2 * np.pi * t / 600.0) + self._noise(T, 0.003)
        groups = {
            "pdu": Group("pdu", self.devices["pdu"], self._pdu(snap, t, hz)),
            "meter": Group("meter", self.devices["meter"], self._meter(snap, t, hz)),
            "cdu": Group("cdu", self.devices["cdu"], self._cdu(snap, t)),
            "rack": Group("rack", self.devices["rack"], self._rack(snap)),
        }
        return Observation(t, ts_ms, groups)

    # ------------------------------------------------------------------ per kind

    def _three_phase(self, prefix: str, power_kw, v_ll_nominal, split, v_offset, t, load_frac, hz) -> dict:
        T, n = power_kw.shape
        out: dict[str, np.ndarray] = {}
        wander = 1.0 + 0.004 * np.sin(2 * np.pi * t / 7200.0)[:, None]
        pf = np.clip(0.955 + 0.03 * np.clip(load_frac, 0, 1.2) + self._noise((T, n), 0.002), 0.90, 0.999)
        p_noisy = power_kw * (1.0 + self._noise((T, n), 0.002))
        v_ln_nom = v_ll_nominal / SQRT3
        volts = []
        for p in range(3):
            v = v_ln_nom[None, :] * (wander + v_offset[None, :, p]) + self._noise((T, n), 0.3 * v_ln_nom / 240.0)
            pp = p_noisy * split[None, :, p]
            out[f"{prefix}.l{p + 1}.voltage_v"] = v
            out[f"{prefix}.l{p + 1}.current_a"] = pp * 1000.0 / (v * pf)
            out[f"{prefix}.l{p + 1}.power_kw"] = pp
            volts.append(v)
        out[f"{prefix}.power_kw"] = p_noisy
        out[f"{prefix}.apparent_power_kva"] = p_noisy / pf
        out[f"{prefix}.power_factor"] = pf
        out[f"{prefix}.frequency_hz"] = np.repeat(hz[:, None], n, axis=1)
        if prefix == "meter":
            va, vb, vc = volts
            out["meter.l12.voltage_v"] = np.sqrt(va ** 2 + vb ** 2 + va * vb)  # phasors 120 degrees apart
            out["meter.l23.voltage_v"] = np.sqrt(vb ** 2 + vc ** 2 + vb * vc)
            out["meter.l31.voltage_v"] = np.sqrt(vc ** 2 + va ** 2 + vc * va)
            out["meter.reactive_power_kvar"] = p_noisy * np.tan(np.arccos(pf))
        return out

    def _pdu(self, snap: Snapshot, t, hz) -> dict:
        idx = self.idx["pdu"]
        if idx.size == 0:
            return {}
        power = snap.side_power_kw[:, idx]
        out = self._three_phase("pdu", power, self.topo.side_voltage_ll[idx], self.pdu_phase, self.pdu_v_offset, t,
                                power / self.rack_half_rated[idx], hz)
        out["pdu.energy_kwh"] = snap.side_energy_kwh[:, idx].copy()
        return out

    def _meter(self, snap: Snapshot, t, hz) -> dict:
        idx = self.idx["meter"]
        if idx.size == 0:
            return {}
        power = snap.node_power_kw[:, idx]
        out = self._three_phase("meter", power, self.topo.node_voltage_ll[idx], self.met_phase, self.met_v_offset, t,
                                power / (self.topo.node_nameplate_kw[idx] * 0.6), hz)
        out["meter.energy_kwh"] = snap.node_energy_kwh[:, idx].copy()
        return out

    def _cdu(self, snap: Snapshot, t) -> dict:
        idx = self.idx["cdu"]
        if idx.size == 0:
            return {}
        T, n = len(t), idx.size
        tp = self.topo
        sup = snap.cdu_supply_c[:, idx] + self._noise((T, n), 0.05)
        ret = snap.cdu_return_c[:, idx] + self._noise((T, n), 0.05)
        dew = self.site.spec.thermal.room_dew_point_c + np.sin(2 * np.pi * (t - 6 * 3600) / 86400.0)[:, None] \
            + self._noise((T, n), 0.05)
        out = {
            "cdu.supply_temp_c": sup,
            "cdu.return_temp_c": ret,
            "cdu.delta_t_c": ret - sup,
            "cdu.supply_setpoint_c": np.repeat(tp.cdu_setpoint_c[idx][None, :], T, axis=0),
            "cdu.facility_supply_temp_c": snap.cdu_facility_supply_c[:, idx] + self._noise((T, n), 0.05),
            "cdu.facility_return_temp_c": snap.cdu_facility_return_c[:, idx] + self._noise((T, n), 0.05),
            "cdu.dew_point_c": dew,
            "cdu.supply_pressure_kpa": snap.cdu_supply_kpa[:, idx] + self._noise((T, n), 0.5),
            "cdu.return_pressure_kpa": snap.cdu_return_kpa[:, idx] + self._noise((T, n), 0.5),
            "cdu.diff_pressure_kpa": snap.cdu_dp_kpa[:, idx] + self._noise((T, n), 0.3),
            "cdu.valve_pct": snap.cdu_valve_pct[:, idx].copy(),
            "cdu.reservoir_level_pct": np.clip(snap.cdu_reservoir_pct[:, idx] + self._noise((T, n), 0.1), 0, 100),
            "cdu.leak_state": snap.cdu_leak_state[:, idx].astype(float),
            "cdu.status": snap.cdu_status[:, idx].astype(float),
            "cdu.flow_lpm": snap.cdu_flow_lpm[:, idx] * (1.0 + self._noise((T, n), 0.003)),
            "cdu.heat_removed_kw": snap.cdu_heat_kw[:, idx] * (1.0 + self._noise((T, n), 0.005)),
        }
        for p in range(MAX_PUMPS):
            installed = tp.pump_installed[idx, p]
            if not installed.any():
                continue
            speed = np.where(installed[None, :], snap.pump_speed_pct[:, idx, p], np.nan)
            out[f"cdu.pump{p + 1}.speed_pct"] = speed
            out[f"cdu.pump{p + 1}.running"] = np.where(installed[None, :], snap.pump_running[:, idx, p], np.nan)
            out[f"cdu.pump{p + 1}.fault"] = np.where(installed[None, :], snap.pump_fault[:, idx, p], np.nan)
        return out

    def _rack(self, snap: Snapshot) -> dict:
        idx = self.idx["rack"]
        if idx.size == 0:
            return {}
        T, n = snap.rack_power_kw.shape[0], idx.size
        power = snap.rack_power_kw[:, idx]
        air_kw = power * (1.0 - self.topo.heat_to_liquid[idx])
        return {
            "rack.liquid_supply_temp_c": snap.rack_supply_c[:, idx] + self._noise((T, n), 0.05),
            "rack.liquid_return_temp_c": snap.rack_return_c[:, idx] + self._noise((T, n), 0.05),
            "rack.liquid_flow_lpm": snap.rack_flow_lpm[:, idx] * (1.0 + self._noise((T, n), 0.004)),
            "rack.liquid_diff_pressure_kpa": snap.rack_dp_kpa[:, idx] + self._noise((T, n), 0.3),
            "rack.valve_pct": np.full((T, n), RACK_VALVE_PCT),
            "rack.power_kw": power * (1.0 + self._noise((T, n), 0.003)),
            "rack.leak_state": snap.rack_leak_state[:, idx].astype(float),
            "rack.inlet_air_temp_c": ROOM_AIR_C + 0.04 * air_kw + self._noise((T, n), 0.1),
        }


def stack(snaps: list[Snapshot]) -> Snapshot:
    """Concatenate snapshots along time."""
    from dataclasses import fields

    return Snapshot(**{f.name: np.concatenate([getattr(s, f.name) for s in snaps], axis=0) for f in fields(Snapshot)})
