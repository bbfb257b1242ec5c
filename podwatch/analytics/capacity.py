"""Usable capacity of every power node and CDU of a site, with the redundancy rules applied.

This module owns the answer to "how much may this node carry, continuously, and still survive its
design failure?" — nothing here looks at telemetry (see `load.py` for the load side).

Rules (docs/analytics.md, "Capacity, headroom and stranded power"):
- Power nodes: usable = nameplate x derating x 80 % (continuous-load rule). `podwatch.site` already
  computes this per node (`PowerNode.usable_kw`); the rack feed of one side is that side's whips.
- A/B (2N) feeds: either side must carry the whole load after the other fails, so a rack, or a
  module fed by an A and a B busway, can use the *weaker* side's usable capacity — never the sum.
  Per node this is automatic (each node is checked against the full failover load behind it, see
  `load.py`); for pairs (`rack_power_usable_kw`, `module_power_usable_kw`) it is `min(A, B)`.
- N+1 / 2N units (pumps, CDUs): usable = what is left after the largest unit(s) fail
  (`redundant_capacity`). A CDU's usable heat is the smaller of its heat-exchanger capacity and
  the heat its pumps can carry with the largest pump failed (flow / design L/min per kW).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from podwatch.site import CONTINUOUS_LOAD_FACTOR, Site

NODE_KINDS = ("transformer", "feeder", "busway", "rack_feed", "cdu")
DEFAULT_FLOW_LPM_PER_KW = 1.2  # RackSpec default design flow per kW of rated load


def usable_power_kw(nameplate_kw: float, derating: float = 1.0,
                    continuous_factor: float = CONTINUOUS_LOAD_FACTOR) -> float:
    """Continuous usable power of a breaker/conductor/transformer: nameplate x derating x 80 %."""
    if nameplate_kw < 0 or not 0 < derating <= 1 or not 0 < continuous_factor <= 1:
        raise ValueError(f"bad rating: nameplate {nameplate_kw} kW, derating {derating}, factor {continuous_factor}")
    return nameplate_kw * derating * continuous_factor


def ab_usable_kw(side_a_kw: float, side_b_kw: float) -> float:
    """A/B (2N): each side must carry everything alone, so the pair is worth its weaker side."""
    return min(side_a_kw, side_b_kw)


def redundant_capacity(unit_capacities: Sequence[float], redundancy: str = "N+1") -> float:
    """Capacity of a group of units that survives its design failure.

    'N': all units are needed (no failure tolerated) -> the sum.
    'N+1': the largest unit may fail -> sum minus the largest.
    '2N': half the units (the largest half) may fail -> sum minus the largest half.
    """
    units = sorted((float(u) for u in unit_capacities), reverse=True)
    if any(u < 0 for u in units):
        raise ValueError(f"unit capacities must be >= 0, got {list(unit_capacities)}")
    if not units:
        return 0.0
    if redundancy == "N":
        return sum(units)
    if redundancy == "N+1":
        return sum(units[1:])
    if redundancy == "2N":
        return sum(units[len(units) // 2 + len(units) % 2:]) if len(units) > 1 else 0.0
    raise ValueError(f"unknown redundancy '{redundancy}' (expected N, N+1 or 2N)")


@dataclass(frozen=True)
class NodeCapacity:
    """Usable capacity of one node, in the unit its load is measured in (kW electric for power
    nodes, kW heat to liquid for CDUs)."""

    node: str
    kind: str  # transformer | feeder | busway | rack_feed | cdu
    module: str | None
    side: str | None
    nameplate_kw: float
    usable_kw: float
    provisioned_kw: float  # rated load allocated behind the node (failover view; heat for CDUs)
    racks: tuple[str, ...]  # racks whose full load this node must carry after a failure
    limited_by: str  # what sets usable_kw, in words


@dataclass(frozen=True)
class CduCapacity:
    """Heat and flow limits of one CDU after its pump redundancy rule."""

    cdu: str
    module: str
    heat_capacity_kw: float  # heat exchanger at the design approach
    flow_available_lpm: float  # pumps left after the largest fails (N+1) / half (2N)
    design_flow_lpm: float  # sum of the racks' design flows
    heat_to_liquid: float
    flow_lpm_per_kw: float  # rated-weighted design flow per kW of IT load of its racks
    usable_heat_kw: float  # min(heat capacity, heat the available flow can carry)
    provisioned_heat_kw: float
    racks: tuple[str, ...]
    limited_by: str


def racks_behind(site: Site, node_id: str) -> list[str]:
    """Racks with `node_id` on their A or B power path (each rack once)."""
    out = []
    for rack in site.racks:
        if node_id in (f"{rack.id}/a", f"{rack.id}/b"):
            out.append(rack.id)
            continue
        path_ids = {n.id for n in site.power_path(rack.feed_a)} | {n.id for n in site.power_path(rack.feed_b)}
        if node_id in path_ids:
            out.append(rack.id)
    return out


def cdu_capacity(site: Site, cdu_id: str) -> CduCapacity:
    spec = next((c for c in site.cdus if c.id == cdu_id), None)
    if spec is None:
        raise KeyError(f"unknown CDU '{cdu_id}'")
    module = site.module_of_cdu(cdu_id)
    racks = [r for r in site.racks if r.cdu == cdu_id]
    rated_kw = sum(r.rated_kw for r in racks)
    design_flow_lpm = sum(r.design_flow_lpm for r in racks)
    flow_per_kw = design_flow_lpm / rated_kw if rated_kw > 0 else DEFAULT_FLOW_LPM_PER_KW
    flow_available = redundant_capacity([spec.pump_flow_lpm] * spec.pumps, spec.pump_redundancy)
    if spec.pump_redundancy == "N":
        # No standby: nothing survives a pump failure, but the loop still runs; count all pumps and
        # let the redundancy check (streaming rules) shout about it.
        flow_available = spec.pumps * spec.pump_flow_lpm
    flow_heat_kw = flow_available / flow_per_kw * spec.heat_to_liquid
    if flow_heat_kw < spec.capacity_kw:
        usable, limited = flow_heat_kw, (f"pump flow: {flow_available:.0f} L/min with {spec.pump_redundancy} "
                                         f"at {flow_per_kw:.2f} L/min/kW")
    else:
        usable, limited = spec.capacity_kw, f"heat exchanger {spec.capacity_kw:g} kW at {spec.approach_c:g} K approach"
    return CduCapacity(cdu=cdu_id, module=module, heat_capacity_kw=spec.capacity_kw, flow_available_lpm=flow_available,
                       design_flow_lpm=design_flow_lpm, heat_to_liquid=spec.heat_to_liquid,
                       flow_lpm_per_kw=flow_per_kw, usable_heat_kw=usable,
                       provisioned_heat_kw=rated_kw * spec.heat_to_liquid,
                       racks=tuple(r.id for r in racks), limited_by=limited)


def site_capacities(site: Site) -> dict[str, NodeCapacity]:
    """Usable capacity of every power node and CDU, keyed by node id."""
    rated = {r.id: r.rated_kw for r in site.racks}
    out: dict[str, NodeCapacity] = {}
    for node in site.power_nodes.values():
        racks = tuple(racks_behind(site, node.id))
        limited = ("one side's whips at 80 % (either side must carry the whole rack)" if node.kind == "rack_feed"
                   else "rating x derating x 80 % continuous")
        out[node.id] = NodeCapacity(node=node.id, kind=node.kind, module=node.module, side=node.side,
                                    nameplate_kw=node.nameplate_kw, usable_kw=node.usable_kw,
                                    provisioned_kw=sum(rated[r] for r in racks), racks=racks, limited_by=limited)
    for cdu_spec in site.cdus:
        c = cdu_capacity(site, cdu_spec.id)
        out[c.cdu] = NodeCapacity(node=c.cdu, kind="cdu", module=c.module, side=None,
                                   nameplate_kw=c.heat_capacity_kw, usable_kw=c.usable_heat_kw,
                                   provisioned_kw=c.provisioned_heat_kw, racks=c.racks, limited_by=c.limited_by)
    return out


def rack_power_usable_kw(site: Site, rack_id: str) -> float:
    """A rack's usable power: the weaker of its A and B rack feeds (not their sum)."""
    return ab_usable_kw(site.power_nodes[f"{rack_id}/a"].usable_kw, site.power_nodes[f"{rack_id}/b"].usable_kw)


def module_power_usable_kw(site: Site, module_id: str) -> float:
    """A module's usable power: per side, the usable of the busways/feeders its racks' feeds use;
    the module is worth the weaker side."""
    racks = [r for r in site.racks if r.module == module_id]
    if not racks:
        return 0.0
    side_a = sum(site.power_nodes[n].usable_kw for n in sorted({r.feed_a for r in racks}))
    side_b = sum(site.power_nodes[n].usable_kw for n in sorted({r.feed_b for r in racks}))
    return ab_usable_kw(side_a, side_b)
