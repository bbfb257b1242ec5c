"""Hand-made sample frames for the thermal-analytics unit tests: a healthy demo site at 1 s,
with knobs to break one thing at a time."""

from __future__ import annotations

import math
from datetime import datetime, timedelta

import polars as pl

from podwatch.site import Site

T0 = datetime(2026, 11, 22, 3, 0, 0)


def healthy_rows(site: Site, start_s: int = 0, seconds: int = 60, *, load: float = 0.9,
                 override=None, noise: bool = True, pump_faults: bool = False) -> pl.DataFrame:
    """Long rows (ts, device, metric, value, quality) of a healthy site, 1 s apart.

    `override(t_s, device_kind, entity, metric, value) -> value` changes any point; `pump_faults`
    adds the CDUs' pump fault registers (all healthy)."""
    rows: dict[str, list] = {"ts": [], "device": [], "metric": [], "value": [], "quality": []}

    def put(t: int, device: str, kind: str, entity: str, metric: str, value: float) -> None:
        if override is not None:
            value = override(t, kind, entity, metric, value)
        rows["ts"].append(T0 + timedelta(seconds=t))
        rows["device"].append(device)
        rows["metric"].append(metric)
        rows["value"].append(value)
        rows["quality"].append(0)

    for t in range(start_s, start_s + seconds):
        wiggle = 0.05 * math.sin(t * 0.7) if noise else 0.0
        for d in site.devices:
            if d.kind == "pdu":
                rack = site.rack(d.entity)
                put(t, d.id, "pdu", d.entity, "pdu.power_kw", rack.rated_kw * load / 2 + wiggle)
            elif d.kind == "rack":
                rack = site.rack(d.entity)
                cdu = site.cdu(rack.cdu)
                power = rack.rated_kw * load
                flow = rack.design_flow_lpm
                dt = power * cdu.heat_to_liquid / (flow / 60 * 4.18)
                put(t, d.id, "rack", d.entity, "rack.liquid_supply_temp_c", cdu.supply_setpoint_c + wiggle)
                put(t, d.id, "rack", d.entity, "rack.liquid_return_temp_c", cdu.supply_setpoint_c + dt + wiggle)
                put(t, d.id, "rack", d.entity, "rack.liquid_flow_lpm", flow + wiggle)
                put(t, d.id, "rack", d.entity, "rack.power_kw", power + wiggle)
                put(t, d.id, "rack", d.entity, "rack.leak_state", 0.0)
            elif d.kind == "cdu":
                cdu = site.cdu(d.entity)
                racks = site.racks_of_cdu(cdu.id)
                power = sum(r.rated_kw * load for r in racks)
                flow = sum(r.design_flow_lpm for r in racks)
                dt = power * cdu.heat_to_liquid / (flow / 60 * 4.18)
                put(t, d.id, "cdu", d.entity, "cdu.supply_temp_c", cdu.supply_setpoint_c + wiggle)
                put(t, d.id, "cdu", d.entity, "cdu.return_temp_c", cdu.supply_setpoint_c + dt + wiggle)
                put(t, d.id, "cdu", d.entity, "cdu.flow_lpm", flow + wiggle)
                put(t, d.id, "cdu", d.entity, "cdu.facility_supply_temp_c", cdu.facility_supply_c + wiggle)
                put(t, d.id, "cdu", d.entity, "cdu.dew_point_c", 12.0 + wiggle)
                put(t, d.id, "cdu", d.entity, "cdu.leak_state", 0.0)
                put(t, d.id, "cdu", d.entity, "cdu.reservoir_level_pct", 80.0 + wiggle)
                for n in range(1, cdu.pumps + 1):
                    put(t, d.id, "cdu", d.entity, f"cdu.pump{n}.running", 1.0 if n <= cdu.working_pumps else 0.0)
                    if pump_faults:
                        put(t, d.id, "cdu", d.entity, f"cdu.pump{n}.fault", 0.0)
            elif d.kind == "meter":
                put(t, d.id, "meter", d.entity, "meter.power_kw", 2000 + wiggle)
    return pl.DataFrame(rows, schema={"ts": pl.Datetime("us"), "device": pl.String, "metric": pl.String,
                                      "value": pl.Float64, "quality": pl.UInt8})
