"""Capacity planner: hand-checked cases, and the exact search against brute-force enumeration."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podwatch.analytics.capacity import site_capacities
from podwatch.analytics.planner import _fits, plan, positions
from podwatch.site import CONTINUOUS_LOAD_FACTOR, RackWhips
from tests.unit.analytics_capacity.sites import small_site

FLOW_PER_KW = 1.2


def test_fits_and_names_the_tightest_busway():
    site = small_site([{"racks": [100.0, 100.0], "bus_a_kw": 500.0, "bus_b_kw": 600.0}])
    p99 = {"xfmr": 150.0, "fdr-a": 150.0, "fdr-b": 150.0, "bus-m1-a": 150.0, "bus-m1-b": 150.0, "cdu-m1": 130.0}
    result = plan(site, p99, rack_kw=100.0, count=2)
    assert result.fits
    assert result.placements == {"m1 (A bus-m1-a, B bus-m1-b, cdu-m1)": 2}
    assert result.limiting_resource == "bus-m1-a"  # 500 x 0.8 = 400 - 150 - 200 = 50 kW left
    assert result.limiting_margin_kw == pytest.approx(50.0)


def test_does_not_fit_gives_shortfall_and_alternatives():
    site = small_site([{"racks": [100.0], "bus_a_kw": 500.0, "bus_b_kw": 500.0}])
    p99 = {"xfmr": 90.0, "fdr-a": 90.0, "fdr-b": 90.0, "bus-m1-a": 90.0, "bus-m1-b": 90.0, "cdu-m1": 80.0}
    result = plan(site, p99, rack_kw=120.0, count=3)
    assert not result.fits
    assert result.limiting_resource in ("bus-m1-a", "bus-m1-b")
    assert result.limiting_margin_kw == pytest.approx(400.0 - 90.0 - 360.0)
    text = "\n".join(result.alternatives)
    assert "2 rack(s) of 120 kW fit" in text
    assert "at up to 103.3 kW each" in text  # (400 - 90) / 3
    assert "short by 50.0 kW" in "\n".join(result.summary_lines())


def test_rack_its_whips_cannot_carry_fits_nowhere():
    site = small_site([{"racks": [100.0]}])
    result = plan(site, {}, rack_kw=170.0, count=1)
    assert not result.fits and result.limiting_resource == "new rack whips"
    assert result.limiting_margin_kw == pytest.approx(RackWhips().side_kva() * 0.95 * 0.8 - 170.0)


def test_module_restriction_suggests_other_module():
    site = small_site([{"racks": [100.0], "bus_a_kw": 300.0, "bus_b_kw": 300.0}, {"racks": [100.0]}])
    p99 = {n: 90.0 for n in ("bus-m1-a", "bus-m1-b", "bus-m2-a", "bus-m2-b")}
    p99.update({"xfmr": 180.0, "fdr-a": 180.0, "fdr-b": 180.0, "cdu-m1": 80.0, "cdu-m2": 80.0})
    result = plan(site, p99, rack_kw=150.0, count=2, module="m1")
    assert not result.fits
    assert any("module(s) m2" in a for a in result.alternatives)
    assert plan(site, p99, rack_kw=150.0, count=2, module="m2").fits


def test_missing_forecast_falls_back_to_rated_load_and_says_so():
    site = small_site([{"racks": [100.0, 100.0], "bus_a_kw": 400.0, "bus_b_kw": 400.0}])
    result = plan(site, {}, rack_kw=100.0, count=2)
    assert not result.fits  # 320 usable - 200 rated = 120 < 200
    assert any("no forecast" in n for n in result.notes)


def test_bad_arguments_are_clear():
    site = small_site([{"racks": [100.0]}])
    with pytest.raises(ValueError, match="unknown module 'mX'"):
        plan(site, {}, 100.0, 1, module="mX")
    with pytest.raises(ValueError, match="--rack-kw"):
        plan(site, {}, -5.0, 1)


@pytest.mark.parametrize("rack_kw", [float("nan"), float("inf")])
def test_rack_power_that_is_not_a_number_is_rejected(rack_kw):
    # `--rack-kw nan` used to answer "NO ... short by nan kW" with alternatives in nan
    site = small_site([{"racks": [100.0]}])
    with pytest.raises(ValueError, match="--rack-kw must be a number > 0"):
        plan(site, {}, rack_kw, 1)


@pytest.mark.parametrize("flow", [0.0, -1.2, float("nan")])
def test_design_flow_per_kw_must_be_positive(flow):
    # `--flow-lpm-per-kw 0` ended in a ZeroDivisionError traceback; -1 and nan gave nonsense margins
    site = small_site([{"racks": [100.0]}])
    with pytest.raises(ValueError, match="--flow-lpm-per-kw must be a number > 0"):
        plan(site, {}, 100.0, 1, flow_lpm_per_kw=flow)


@pytest.mark.timeout(10)
def test_huge_count_is_a_clear_error_not_an_endless_search():
    # `--count 10000000` on a site with two positions ran for many minutes (greedy, one rack at a time)
    site = small_site([{"racks": [100.0]}, {"racks": [100.0]}])
    with pytest.raises(ValueError, match="--count: at most 5,000 racks"):
        plan(site, {}, 100.0, 10_000_000)


# --------------------------------------------------------------------------- brute force


def brute_force(site, p99, rack_kw, count, module):
    """Independent enumeration: every allocation of `count` racks over the positions; margins in IT kW."""
    whip_kw = RackWhips().side_kva() * site.spec.defaults.power_factor * CONTINUOUS_LOAD_FACTOR
    if rack_kw > whip_kw:
        return False, rack_kw and whip_kw - rack_kw, {"new rack whips"}
    pos = positions(site, module)
    caps = site_capacities(site)
    best_value, limiting = None, set()
    for alloc in itertools.product(range(count + 1), repeat=len(pos)):
        if sum(alloc) != count:
            continue
        margins = {}
        for n, p in zip(alloc, pos):
            if not n:
                continue
            nodes = {x.id for x in site.power_path(p.feed_a)} | {x.id for x in site.power_path(p.feed_b)}
            for node in nodes:
                load = p99.get(node, caps[node].provisioned_kw)
                margins[node] = margins.get(node, caps[node].usable_kw - load) - n * rack_kw
            cdu = site.cdu(p.cdu)
            racks = [r for r in site.racks if r.cdu == p.cdu]
            heat = p99.get(p.cdu, sum(r.rated_kw for r in racks) * cdu.heat_to_liquid)
            h = f"{p.cdu} heat"
            margins[h] = margins.get(h, (cdu.capacity_kw - heat) / cdu.heat_to_liquid) - n * rack_kw
            flow_avail = (cdu.pumps - 1) * cdu.pump_flow_lpm  # N+1 in these sites
            f = f"{p.cdu} pump flow"
            design = sum(r.design_flow_lpm for r in racks)
            margins[f] = margins.get(f, (flow_avail - design) / FLOW_PER_KW) - n * rack_kw
        value = min(margins.values())
        argmins = {k for k, v in margins.items() if abs(v - value) < 1e-6}
        if best_value is None or value > best_value + 1e-6:
            best_value, limiting = value, set(argmins)
        elif abs(value - best_value) <= 1e-6:
            limiting |= argmins
    return best_value >= -1e-9, best_value, limiting


@st.composite
def planning_problem(draw):
    n_modules = draw(st.integers(1, 3))
    modules = []
    for _ in range(n_modules):
        racks = draw(st.lists(st.sampled_from([50.0, 80.0, 100.0, 132.0, 150.0]), min_size=1, max_size=3))
        rated = sum(racks)
        pumps = draw(st.integers(2, 3))
        modules.append({
            "racks": racks,
            "bus_a_kw": draw(st.floats(rated * 0.8, rated * 5.0)),
            "bus_b_kw": draw(st.floats(rated * 0.8, rated * 5.0)),
            "cdu_kw": rated * 0.88 * draw(st.floats(1.0, 4.0)),
            "pumps": pumps,
            "pump_flow_lpm": rated * FLOW_PER_KW / (pumps - 1) * draw(st.floats(1.0, 4.0)),
        })
    total = sum(sum(m["racks"]) for m in modules)
    site = small_site(modules, transformer_kw=total * draw(st.floats(1.0, 5.0)),
                      feeder_kw=total * draw(st.floats(1.0, 5.0)))
    caps = site_capacities(site)
    p99 = {}
    for node, cap in caps.items():
        if cap.kind == "rack_feed" or draw(st.booleans()) and draw(st.booleans()) and draw(st.booleans()):
            continue  # some nodes without a forecast
        p99[node] = cap.provisioned_kw * draw(st.floats(0.2, 1.05))
    rack_kw = draw(st.sampled_from([20.0, 60.0, 100.0, 132.0, 165.0]))
    count = draw(st.integers(1, 4))
    module = draw(st.sampled_from([None] + [f"m{i}" for i in range(1, n_modules + 1)]))
    return site, p99, rack_kw, count, module


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planning_problem())
def test_planner_matches_brute_force(problem):
    site, p99, rack_kw, count, module = problem
    fits, best, limiting = brute_force(site, p99, rack_kw, count, module)
    result = plan(site, p99, rack_kw, count, module=module)
    assert result.exact
    assert result.fits == fits
    assert result.limiting_margin_kw == pytest.approx(best, abs=1e-6)
    assert result.limiting_resource in limiting
    # the cheaper feasibility search used for the alternatives agrees too
    assert _fits(site, p99, rack_kw, count, module, FLOW_PER_KW, RackWhips()) == fits
    if fits:
        assert sum(result.placements.values()) == count
        assert all(c.margin_after_kw >= -1e-9 for c in result.checks)


def test_new_rack_whips_are_at_the_site_voltage():
    """A 400 V site: the new rack's 5 x 60 A whips carry 400 V x sqrt(3) x 60 A each, not 415 V."""
    from podwatch.site import parse_site
    from tests.unit.analytics_capacity.sites import site_dict

    data = site_dict([{"racks": [100.0]}])
    data["defaults"] = {"voltage_v": 400}
    site = parse_site(data)
    result = plan(site, {}, rack_kw=170.0, count=1)
    usable_400 = 5 * 3 ** 0.5 * 400 * 60 / 1000.0 * site.spec.defaults.power_factor * CONTINUOUS_LOAD_FACTOR
    assert result.limiting_resource == "new rack whips"
    assert result.limiting_margin_kw == pytest.approx(usable_400 - 170.0)
    assert not _fits(site, {}, 160.0, 1, None, FLOW_PER_KW, RackWhips())  # 157.9 kW usable at 400 V (163.7 at 415 V)


def test_new_racks_get_the_whips_of_the_existing_racks_unless_told():
    """edge-5mw racks take 6 x 63 A at 400 V a side; the planner sized every new rack on a fixed
    5 x 60 A (159.6 kW usable a side instead of 201.1), so a 180 kW rack 'fitted nowhere'."""
    from pathlib import Path

    from podwatch.analytics.capacity_commands import _new_rack_whips
    from podwatch.site import load_site

    site = load_site(Path(__file__).parents[3] / "examples" / "sites" / "edge-5mw.yaml")
    whips = _new_rack_whips(site, None, None, None)
    assert (whips.per_side, whips.rating_a, whips.voltage_v) == (6, 63.0, 400.0)
    told = _new_rack_whips(site, None, 4, 32.0)
    assert (told.per_side, told.rating_a, told.voltage_v) == (4, 32.0, 400.0)
    assert whips.side_kva() * site.spec.defaults.power_factor * 0.8 == pytest.approx(201.13, abs=0.01)
