"""Capacity planner: do N more racks of a given power fit, and where (`podwatch plan`).

This module owns the placement question. A new rack goes into a *position*: a (module, A feed,
B feed, CDU) combination that existing racks of the site already use. It adds its full rated
power to every node on its A path and on its B path (either side must carry it alone after a
failure; a transformer both paths share counts it once), its heat (rated x heat-to-liquid share)
to its CDU, and its design flow to the CDU's pumps. Each new rack's own whips must carry it on one side.

Every resource is expressed as *IT kW still available* ("margin"):
- power node: usable − forecast P99 peak (7-day horizon preferred, else 24 h; the rated load
  behind the node when there is no forecast);
- CDU heat: (usable heat − P99 heat) / heat-to-liquid share;
- CDU pump flow: (flow with the largest pump failed − design flow of its racks) / L/min per kW;
- rack whips of the new rack: one side's usable − rack kW (per rack, not cumulative; a rack its
  own whips cannot carry fits nowhere, so this is checked first and is not part of the search).

The plan is the allocation of the N racks to positions that maximises the smallest margin left
on any resource it touches (ties: the second smallest, and so on — "leximin", which spreads racks
away from the tightest resources); it fits when that smallest margin is >= 0. The limiting resource is the one
holding that smallest margin (when it does not fit, the one with the largest shortfall in the
least-bad allocation). Small problems are solved exactly (branch and bound over allocations);
large ones greedily, one rack at a time (the result says which), with a pruned feasibility search
to confirm a "no". When the answer is no, the
alternatives say how many racks do fit, the largest rack power at which N fit, other modules
that could take them, and how much the limiting resource would have to grow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from podwatch.analytics.capacity import cdu_capacity
from podwatch.site import CONTINUOUS_LOAD_FACTOR, RackWhips, Site

PREFERRED_HORIZONS = ("7d", "24h")
EXACT_BUDGET = 50_000  # search nodes explored before falling back to greedy
MAX_COUNT = 5_000  # racks per plan: 35 s on the 20-position campus site at 10,000; a 20 MW site holds ~150
EPS = 1e-9


@dataclass(frozen=True)
class Position:
    """Where a new rack can go: an A feed, a B feed and a CDU that existing racks already use."""

    module: str
    feed_a: str
    feed_b: str
    cdu: str

    @property
    def label(self) -> str:
        return f"{self.module} (A {self.feed_a}, B {self.feed_b}, {self.cdu})"


@dataclass(frozen=True)
class Resource:
    id: str  # e.g. 'bus-m1-a', 'cdu-m1 heat', 'cdu-m1 pump flow', 'new rack whips'
    kind: str  # transformer | feeder | busway | cdu_heat | cdu_flow | rack_whips
    margin_kw: float  # IT kW it can still take before the new racks
    basis: str  # how the margin was obtained, in words
    per_rack_only: bool = False  # whips: each rack brings its own


@dataclass(frozen=True)
class ResourceCheck:
    id: str
    kind: str
    margin_before_kw: float
    margin_after_kw: float
    basis: str


@dataclass
class PlanResult:
    rack_kw: float
    count: int
    module: str | None
    fits: bool
    placements: dict[str, int]  # position label -> racks placed there
    limiting_resource: str | None
    limiting_margin_kw: float  # IT kW left at the limiting resource (negative: shortfall)
    checks: list[ResourceCheck]
    exact: bool
    alternatives: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        where = f" in module {self.module}" if self.module else ""
        head = (f"YES: {self.count} rack(s) of {self.rack_kw:g} kW fit{where}" if self.fits
                else f"NO: {self.count} rack(s) of {self.rack_kw:g} kW do not fit{where}")
        lines = [head]
        if self.placements:
            label = "placement" if self.fits else "least-bad placement"
            lines.append(f"{label}: " + "; ".join(f"{n} x {p}" for p, n in self.placements.items() if n))
        if self.limiting_resource:
            verb = "margin left" if self.limiting_margin_kw >= 0 else "short by"
            lines.append(f"limiting resource: {self.limiting_resource} — {verb} {abs(self.limiting_margin_kw):.1f} kW")
        lines += [f"alternative: {a}" for a in self.alternatives]
        lines += [f"note: {n}" for n in self.notes]
        return lines


# --------------------------------------------------------------------------- inputs


def _p99_by_node(forecasts) -> tuple[dict[str, float], str | None]:
    """node -> P99 kW from forecast rows (preferring the 7-day horizon) or a plain mapping."""
    if isinstance(forecasts, Mapping):
        return {k: float(v) for k, v in forecasts.items() if v is not None}, None
    rows = list(forecasts or [])
    out: dict[str, float] = {}
    used = None
    for horizon in PREFERRED_HORIZONS:
        for r in rows:
            if r.horizon == horizon and r.p99_kw is not None and r.node not in out:
                out[r.node] = float(r.p99_kw)
                used = used or horizon
    return out, used


def positions(site: Site, module: str | None = None) -> list[Position]:
    seen: dict[tuple, Position] = {}
    for r in site.racks:
        if module is not None and r.module != module:
            continue
        key = (r.module, r.feed_a, r.feed_b, r.cdu)
        seen.setdefault(key, Position(*key))
    return sorted(seen.values(), key=lambda p: (p.module, p.feed_a, p.feed_b, p.cdu))


def _at_site_voltage(site: Site, whips: RackWhips) -> RackWhips:
    """Whips rated in amperes are at the site's `defaults.voltage_v` unless they name a voltage."""
    if whips.voltage_v is None:
        return whips.model_copy(update={"voltage_v": site.spec.defaults.voltage_v})
    return whips


def build_resources(site: Site, p99: Mapping[str, float], rack_kw: float, flow_lpm_per_kw: float,
                    whips: RackWhips, notes: list[str] | None = None) -> tuple[dict[str, Resource], dict[Position, list[str]]]:
    """Every resource a new rack could touch, and the resources on each position's paths."""
    notes = notes if notes is not None else []
    whips = _at_site_voltage(site, whips)
    resources: dict[str, Resource] = {}
    rated = {r.id: r.rated_kw for r in site.racks}

    def rated_behind(node_id: str) -> float:
        return sum(rated[r.id] for r in site.racks
                   if node_id in {n.id for n in site.power_path(r.feed_a)} | {n.id for n in site.power_path(r.feed_b)})

    def power_resource(node_id: str) -> None:
        if node_id in resources:
            return
        node = site.power_nodes[node_id]
        if node_id in p99:
            load, basis = p99[node_id], f"usable {node.usable_kw:.1f} − P99 {p99[node_id]:.1f} kW"
        else:
            load = rated_behind(node_id)
            basis = f"usable {node.usable_kw:.1f} − rated {load:.1f} kW (no forecast)"
            notes.append(f"{node_id}: no forecast; its racks' rated load was assumed")
        resources[node_id] = Resource(node_id, node.kind, node.usable_kw - load, basis)

    by_position: dict[Position, list[str]] = {}
    whip_usable = whips.side_kva() * site.spec.defaults.power_factor * CONTINUOUS_LOAD_FACTOR
    resources["new rack whips"] = Resource("new rack whips", "rack_whips", whip_usable,
                                           f"one side: {whips.per_side} x {whips.rating_a:g} A at {whips.voltage_v:g} V, "
                                           f"80 % = {whip_usable:.1f} kW", per_rack_only=True)
    for pos in positions(site):
        ids = []
        for feed in (pos.feed_a, pos.feed_b):
            for node in site.power_path(feed):
                power_resource(node.id)
                if node.id not in ids:
                    ids.append(node.id)
        cap = cdu_capacity(site, pos.cdu)
        heat_id, flow_id = f"{pos.cdu} heat", f"{pos.cdu} pump flow"
        if heat_id not in resources:
            if pos.cdu in p99:
                heat_load, basis = p99[pos.cdu], f"P99 heat {p99[pos.cdu]:.1f} kW"
            else:
                heat_load, basis = cap.provisioned_heat_kw, f"rated heat {cap.provisioned_heat_kw:.1f} kW (no forecast)"
                notes.append(f"{pos.cdu}: no forecast; its racks' rated heat was assumed")
            resources[heat_id] = Resource(
                heat_id, "cdu_heat", (cap.heat_capacity_kw - heat_load) / cap.heat_to_liquid,
                f"(heat capacity {cap.heat_capacity_kw:g} − {basis}) / {cap.heat_to_liquid:g} to liquid")
            resources[flow_id] = Resource(
                flow_id, "cdu_flow", (cap.flow_available_lpm - cap.design_flow_lpm) / flow_lpm_per_kw,
                f"(pumps {cap.flow_available_lpm:.0f} L/min after redundancy − design {cap.design_flow_lpm:.0f} L/min) "
                f"/ {flow_lpm_per_kw:g} L/min/kW")
        by_position[pos] = ids + [heat_id, flow_id]
    return resources, by_position


# --------------------------------------------------------------------------- search


def leximin_key(after: Mapping[str, float]) -> tuple[float, ...]:
    """Margins after placement, smallest first, rounded so float noise does not break ties."""
    return tuple(sorted(round(v, 6) for v in after.values()))


def _order(resources: Mapping[str, Resource]) -> dict[str, int]:
    return {rid: i for i, rid in enumerate(resources)}


def evaluate(alloc: tuple[int, ...], pos_list: list[Position], by_position: Mapping[Position, list[str]],
             resources: Mapping[str, Resource], rack_kw: float) -> tuple[float, str | None, dict[str, float]]:
    """(smallest margin after placing `alloc`, its resource, margins after of every touched resource).
    Ties go to the resource listed first (nearest the rack on the first position)."""
    added: dict[str, int] = {}
    for n, pos in zip(alloc, pos_list):
        if n:
            for rid in by_position[pos]:
                added[rid] = added.get(rid, 0) + n
    after = {}
    for rid, n in added.items():
        res = resources[rid]
        after[rid] = res.margin_kw - rack_kw * (1 if res.per_rack_only else n)
    if not after:
        return float("inf"), None, after
    order = _order(resources)
    worst = min(after, key=lambda rid: (after[rid], order[rid]))
    return after[worst], worst, after


def _best_allocation(pos_list, by_position, resources, rack_kw, count) -> tuple[tuple[int, ...], bool]:
    """The leximin-best allocation: largest smallest margin, then largest second smallest, ...
    Exact branch and bound; greedy (one rack at a time) beyond EXACT_BUDGET evaluations."""
    g = len(pos_list)
    if g == 1:
        return (count,), True
    state = {"key": None, "alloc": None, "budget": EXACT_BUDGET}

    def key_of(alloc: tuple[int, ...]) -> tuple[float, ...]:
        return leximin_key(evaluate(alloc, pos_list, by_position, resources, rack_kw)[2])

    def dfs(prefix: tuple[int, ...], left: int) -> None:
        if state["budget"] <= 0:
            return
        state["budget"] -= 1
        if len(prefix) == g - 1:
            alloc = prefix + (left,)
            key = key_of(alloc)
            if state["key"] is None or key > state["key"]:
                state["key"], state["alloc"] = key, alloc
            return
        for n in range(left, -1, -1):
            nxt = prefix + (n,)
            if state["key"] is not None:
                # margins only shrink as racks are added, so a prefix whose smallest margin is
                # already below the best allocation's smallest can never win
                partial = key_of(nxt + (0,) * (g - len(nxt)))
                if partial and partial[0] < state["key"][0]:
                    continue
            dfs(nxt, left - n)

    dfs((), count)
    if state["budget"] > 0 and state["alloc"] is not None:
        return state["alloc"], True
    alloc = [0] * g
    for _ in range(count):
        choices = []
        for i in range(g):
            alloc[i] += 1
            choices.append((key_of(tuple(alloc)), -i))
            alloc[i] -= 1
        _, neg_i = max(choices)
        alloc[-neg_i] += 1
    return tuple(alloc), False


def _solve(site, p99, rack_kw, count, module, flow_lpm_per_kw, whips, notes):
    resources, by_position = build_resources(site, p99, rack_kw, flow_lpm_per_kw, whips, notes)
    pos_list = positions(site, module)
    alloc, exact = _best_allocation(pos_list, by_position, resources, rack_kw, count)
    value, worst, after = evaluate(alloc, pos_list, by_position, resources, rack_kw)
    if not exact and value < -EPS:
        # greedy said no: make sure with the (pruned, exhaustive) feasibility search
        found = _feasible(pos_list, by_position, resources, rack_kw, count)
        if found is not None:
            alloc = found
            value, worst, after = evaluate(alloc, pos_list, by_position, resources, rack_kw)
    return resources, pos_list, alloc, exact, value, worst, after


def plan(site: Site, forecasts: Iterable | Mapping[str, float] | None, rack_kw: float, count: int,
         module: str | None = None, flow_lpm_per_kw: float = 1.2, whips: RackWhips | None = None) -> PlanResult:
    """Whether and where `count` new racks of `rack_kw` fit (see the module docstring).

    `forecasts`: `forecasts` rows (ForecastRow-like objects with node, horizon, p99_kw) or a
    mapping node id -> P99 kW (CDU ids -> P99 heat kW)."""
    if not math.isfinite(rack_kw) or rack_kw <= 0 or count < 1:
        raise ValueError(f"--rack-kw must be a number > 0 and --count >= 1 (got {rack_kw:g} kW, {count})")
    if not math.isfinite(flow_lpm_per_kw) or flow_lpm_per_kw <= 0:
        raise ValueError(f"--flow-lpm-per-kw must be a number > 0 (got {flow_lpm_per_kw:g}); liquid-cooled racks are "
                         "designed for 1.0-1.5 L/min per kW")
    if count > MAX_COUNT:
        raise ValueError(f"--count: at most {MAX_COUNT:,} racks per plan (got {count:,}); the search places racks "
                         "one at a time beyond small problems, so a larger count would run for minutes")
    if module is not None and module not in {m.id for m in site.modules}:
        raise ValueError(f"--module: unknown module '{module}' (site has {', '.join(m.id for m in site.modules)})")
    whips = _at_site_voltage(site, whips or RackWhips())
    notes: list[str] = []
    p99, horizon = _p99_by_node(forecasts)
    if horizon:
        notes.append(f"margins use the {horizon} P99 peak forecasts")
    if not positions(site, module):
        where = f"module {module}" if module else "the site"
        return PlanResult(rack_kw, count, module, False, {}, None, 0.0, [], True,
                          [f"{where} has no rack position yet (no existing rack shows which feeds and CDU to use)"], notes)
    resources, pos_list, alloc, exact, value, worst, after = _solve(site, p99, rack_kw, count, module, flow_lpm_per_kw,
                                                                    whips, notes)
    notes = list(dict.fromkeys(notes))
    whip = resources["new rack whips"]
    whip_check = ResourceCheck(whip.id, whip.kind, whip.margin_kw, whip.margin_kw - rack_kw, whip.basis)
    if whip.margin_kw - rack_kw < -EPS:
        # the rack's own entry cannot carry it on one side: no placement helps
        return PlanResult(rack_kw, count, module, False, {}, whip.id, whip.margin_kw - rack_kw, [whip_check], True,
                          [f"racks of up to {whip.margin_kw:.1f} kW fit these whips ({whip.basis}); "
                           "give the rack more or larger whips per side"], notes)
    fits = value >= -EPS
    checks = [ResourceCheck(rid, resources[rid].kind, resources[rid].margin_kw, after[rid], resources[rid].basis)
              for rid in sorted(after, key=lambda r: after[r])] + [whip_check]
    result = PlanResult(rack_kw=rack_kw, count=count, module=module, fits=fits,
                        placements={p.label: n for p, n in zip(pos_list, alloc) if n}, limiting_resource=worst,
                        limiting_margin_kw=value, checks=checks, exact=exact, notes=notes)
    if not exact:
        result.notes.append("large problem: placement found greedily (one rack at a time), not exhaustively")
    if not fits:
        result.alternatives = _alternatives(site, p99, rack_kw, count, module, flow_lpm_per_kw, whips, worst, value)
    return result


def _feasible(pos_list, by_position, resources, rack_kw, count) -> tuple[int, ...] | None:
    """An allocation that leaves every touched margin >= 0, or None. Depth-first with pruning: margins only
    shrink as racks are added, so a prefix with a negative margin is abandoned at once. Much
    cheaper than the leximin search; used for the alternatives."""
    g = len(pos_list)
    budget = [EXACT_BUDGET]

    def margins_after(prefix: tuple[int, ...]) -> dict[str, float]:
        """Margin of every resource after the prefix (untouched ones at their starting margin)."""
        used: dict[str, int] = {}
        for n, pos in zip(prefix, pos_list):
            for rid in by_position[pos]:
                used[rid] = used.get(rid, 0) + n
        return {rid: res.margin_kw - rack_kw * used.get(rid, 0) for rid, res in resources.items()
                if not res.per_rack_only}

    def room(prefix: tuple[int, ...], left: int) -> bool:
        """Necessary condition: the prefix is within every margin, and the remaining groups can
        still hold `left` racks (each alone, and through every resource they all share)."""
        margins = margins_after(prefix)
        if any(margins[rid] < -EPS for n, pos in zip(prefix, pos_list) if n for rid in by_position[pos]):
            return False
        rest = pos_list[len(prefix):]
        if not rest:
            return left == 0
        alone = [min(int(max(margins[r], 0.0) // rack_kw + EPS) for r in by_position[p]) for p in rest]
        if sum(alone) < left:
            return False
        shared = set.intersection(*(set(by_position[p]) for p in rest))
        return all(max(margins[r], 0.0) // rack_kw + EPS >= left for r in shared)

    def dfs(prefix: tuple[int, ...], left: int) -> tuple[int, ...] | None:
        budget[0] -= 1
        if budget[0] <= 0:
            return None
        if len(prefix) == g - 1:
            return prefix + (left,) if room(prefix + (left,), 0) else None
        for n in range(left, -1, -1):
            nxt = prefix + (n,)
            if room(nxt, left - n):
                found = dfs(nxt, left - n)
                if found is not None:
                    return found
        return None

    def ok(prefix: tuple[int, ...]) -> bool:
        return evaluate(prefix + (0,) * (g - len(prefix)), pos_list, by_position, resources, rack_kw)[0] >= -EPS

    if g == 1:
        return (count,) if ok((count,)) else None
    return dfs((), count) if room((), count) else None


def _fits(site, p99, rack_kw, count, module, flow_lpm_per_kw, whips) -> bool:
    whips = _at_site_voltage(site, whips)
    whip_usable = whips.side_kva() * site.spec.defaults.power_factor * CONTINUOUS_LOAD_FACTOR
    if rack_kw > whip_usable + EPS:
        return False
    resources, by_position = build_resources(site, p99, rack_kw, flow_lpm_per_kw, whips, [])
    pos_list = positions(site, module)
    return bool(pos_list) and _feasible(pos_list, by_position, resources, rack_kw, count) is not None


def _alternatives(site, p99, rack_kw, count, module, flow_lpm_per_kw, whips, worst, value) -> list[str]:
    out = []
    lo_n, hi_n = 0, count  # largest n < count that fits: binary search (fewer racks always fit if more do)
    while hi_n - lo_n > 1:
        mid_n = (lo_n + hi_n) // 2
        if _fits(site, p99, rack_kw, mid_n, module, flow_lpm_per_kw, whips):
            lo_n = mid_n
        else:
            hi_n = mid_n
    fewer = lo_n
    where = f" in module {module}" if module else ""
    out.append(f"{fewer} rack(s) of {rack_kw:g} kW fit{where}" if fewer else f"no rack of {rack_kw:g} kW fits{where}")
    lo, hi = 0.0, rack_kw
    for _ in range(24):  # bisection on rack power, to ~1e-7 of the asked power
        mid = (lo + hi) / 2
        if _fits(site, p99, mid, count, module, flow_lpm_per_kw, whips):
            lo = mid
        else:
            hi = mid
    if lo >= 1.0:
        out.append(f"{count} rack(s) fit{where} at up to {lo:.1f} kW each")
    if module is not None:
        others = [m.id for m in site.modules if m.id != module and positions(site, m.id)
                  and _fits(site, p99, rack_kw, count, m.id, flow_lpm_per_kw, whips)]
        if others:
            out.append(f"{count} rack(s) of {rack_kw:g} kW fit in module(s) {', '.join(others)}")
        elif _fits(site, p99, rack_kw, count, None, flow_lpm_per_kw, whips):
            out.append(f"{count} rack(s) of {rack_kw:g} kW fit when spread across modules")
    if worst:
        out.append(f"raise {worst} by {-value:.1f} kW (IT) to take all {count}")
    return out
