"""The catalog of canonical metric names. Every name carries its unit as a suffix
(`_kw`, `_c`, `_lpm`, `_kpa`, `_pct`, `_v`, `_a`, `_hz`, `_kwh`, `_kvar`, `_kva`) or is a
documented dimensionless/state value. Device profiles map registers and MQTT points onto these
names; storage, analytics and dashboards use only these names. `docs/metrics.md` is generated
from this module (`podwatch config metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    unit: str
    kind: str  # device kind the metric belongs to: pdu, meter, cdu, rack
    description: str


def _phases(prefix: str, kind: str, suffix: str, unit: str, what: str) -> list[Metric]:
    return [Metric(f"{prefix}.l{p}.{suffix}", unit, kind, f"{what}, phase L{p}") for p in (1, 2, 3)]


LEAK_STATES = {0: "OK", 1: "Warning", 2: "Critical"}  # Redfish LeakDetector states
MAX_PUMPS = 4

_CATALOG: list[Metric] = [
    # Rack PDU (one per feed side: A or B), modelled on the Raritan PX3 inlet block.
    *_phases("pdu", "pdu", "voltage_v", "V", "Inlet RMS voltage line-to-neutral"),
    *_phases("pdu", "pdu", "current_a", "A", "Inlet RMS current"),
    *_phases("pdu", "pdu", "power_kw", "kW", "Inlet active power"),
    Metric("pdu.power_kw", "kW", "pdu", "Inlet active power, all phases"),
    Metric("pdu.apparent_power_kva", "kVA", "pdu", "Inlet apparent power, all phases"),
    Metric("pdu.power_factor", "1", "pdu", "Inlet power factor (0..1)"),
    Metric("pdu.frequency_hz", "Hz", "pdu", "Line frequency"),
    Metric("pdu.energy_kwh", "kWh", "pdu", "Active energy delivered (monotonic counter)"),
    # Substation / switchgear meter, modelled on Schneider PM5xxx and SunSpec 213.
    *_phases("meter", "meter", "voltage_v", "V", "Voltage line-to-neutral"),
    Metric("meter.l12.voltage_v", "V", "meter", "Voltage line-to-line L1-L2"),
    Metric("meter.l23.voltage_v", "V", "meter", "Voltage line-to-line L2-L3"),
    Metric("meter.l31.voltage_v", "V", "meter", "Voltage line-to-line L3-L1"),
    *_phases("meter", "meter", "current_a", "A", "Current"),
    *_phases("meter", "meter", "power_kw", "kW", "Active power"),
    Metric("meter.power_kw", "kW", "meter", "Total active power"),
    Metric("meter.reactive_power_kvar", "kvar", "meter", "Total reactive power"),
    Metric("meter.apparent_power_kva", "kVA", "meter", "Total apparent power"),
    Metric("meter.power_factor", "1", "meter", "Total power factor (0..1)"),
    Metric("meter.frequency_hz", "Hz", "meter", "Line frequency"),
    Metric("meter.energy_kwh", "kWh", "meter", "Active energy imported (monotonic counter)"),
    # CDU (coolant distribution unit); names follow Redfish CoolingUnit / CoolingLoop.
    Metric("cdu.supply_temp_c", "°C", "cdu", "Secondary (technology) loop supply temperature"),
    Metric("cdu.return_temp_c", "°C", "cdu", "Secondary loop return temperature"),
    Metric("cdu.delta_t_c", "K", "cdu", "Return minus supply temperature"),
    Metric("cdu.supply_setpoint_c", "°C", "cdu", "Supply temperature setpoint"),
    Metric("cdu.flow_lpm", "L/min", "cdu", "Secondary loop flow"),
    Metric("cdu.supply_pressure_kpa", "kPa", "cdu", "Secondary supply pressure (gauge)"),
    Metric("cdu.return_pressure_kpa", "kPa", "cdu", "Secondary return pressure (gauge)"),
    Metric("cdu.diff_pressure_kpa", "kPa", "cdu", "Supply minus return pressure"),
    *[Metric(f"cdu.pump{n}.speed_pct", "%", "cdu", f"Pump {n} speed") for n in range(1, MAX_PUMPS + 1)],
    *[Metric(f"cdu.pump{n}.running", "1", "cdu", f"Pump {n} running (1) or stopped/failed (0)") for n in range(1, MAX_PUMPS + 1)],
    *[Metric(f"cdu.pump{n}.fault", "1", "cdu", f"Pump {n} faulted (1: tripped/failed, out of service) or healthy (0), "
             "which tells a failed pump from a standby one") for n in range(1, MAX_PUMPS + 1)],
    Metric("cdu.valve_pct", "%", "cdu", "Facility-water control valve position"),
    Metric("cdu.facility_supply_temp_c", "°C", "cdu", "Facility (primary) water supply temperature"),
    Metric("cdu.facility_return_temp_c", "°C", "cdu", "Facility (primary) water return temperature"),
    Metric("cdu.reservoir_level_pct", "%", "cdu", "Coolant reservoir level"),
    Metric("cdu.leak_state", "state", "cdu", "Leak detector: 0 OK, 1 Warning, 2 Critical"),
    Metric("cdu.dew_point_c", "°C", "cdu", "Room dew point at the CDU"),
    Metric("cdu.heat_removed_kw", "kW", "cdu", "Heat removed from the secondary loop"),
    Metric("cdu.status", "state", "cdu", "Unit status: 0 OK, 1 Warning, 2 Critical"),
    # Rack liquid-cooling and leak sensors (NVIDIA BMS event bus over MQTT).
    Metric("rack.liquid_supply_temp_c", "°C", "rack", "Rack manifold coolant supply temperature"),
    Metric("rack.liquid_return_temp_c", "°C", "rack", "Rack manifold coolant return temperature"),
    Metric("rack.liquid_flow_lpm", "L/min", "rack", "Rack coolant flow"),
    Metric("rack.liquid_diff_pressure_kpa", "kPa", "rack", "Rack manifold differential pressure"),
    Metric("rack.valve_pct", "%", "rack", "Rack control valve position"),
    Metric("rack.power_kw", "kW", "rack", "Rack IT power as reported by the rack (BMS)"),
    Metric("rack.leak_state", "state", "rack", "Rack leak detection: 0 OK, 1 Warning, 2 Critical"),
    Metric("rack.inlet_air_temp_c", "°C", "rack", "Rack front inlet air temperature"),
]

CATALOG: dict[str, Metric] = {m.name: m for m in _CATALOG}


def is_known(name: str) -> bool:
    return name in CATALOG


def metrics_for(kind: str) -> list[Metric]:
    return [m for m in _CATALOG if m.kind == kind]
