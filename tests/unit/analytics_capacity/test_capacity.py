"""Usable capacity: 80 % rule, derating, A/B weaker side, N+1 / 2N units."""

from __future__ import annotations

import pytest

from podwatch.analytics.capacity import (ab_usable_kw, cdu_capacity, module_power_usable_kw, rack_power_usable_kw,
                                         racks_behind, redundant_capacity, site_capacities, usable_power_kw)
from tests.unit.analytics_capacity.sites import small_site


@pytest.mark.parametrize("nameplate, derating, expected", [
    (1000.0, 1.0, 800.0),   # 80 % continuous rule
    (1000.0, 0.9, 720.0),   # derating applies before the 80 % rule
    (2500.0, 0.5, 1000.0),
])
def test_usable_power_is_nameplate_times_derating_times_80_percent(nameplate, derating, expected):
    assert usable_power_kw(nameplate, derating) == pytest.approx(expected)


def test_usable_power_rejects_bad_derating():
    with pytest.raises(ValueError, match="derating"):
        usable_power_kw(1000.0, 1.5)


def test_site_power_nodes_apply_rule_and_derating():
    site = small_site([{"racks": [100.0], "bus_a_kw": 1000.0, "bus_b_kw": 1000.0, "derating_a": 0.9}])
    caps = site_capacities(site)
    assert caps["xfmr"].usable_kw == pytest.approx(4000.0 * 0.8)
    assert caps["bus-m1-a"].usable_kw == pytest.approx(1000.0 * 0.9 * 0.8)
    assert caps["bus-m1-b"].usable_kw == pytest.approx(800.0)


@pytest.mark.parametrize("a, b, expected", [(800.0, 640.0, 640.0), (500.0, 900.0, 500.0), (700.0, 700.0, 700.0)])
def test_ab_pair_is_worth_its_weaker_side_not_the_sum(a, b, expected):
    assert ab_usable_kw(a, b) == expected
    assert ab_usable_kw(a, b) != a + b


def test_module_power_counts_weaker_busway_only():
    site = small_site([{"racks": [100.0, 100.0], "bus_a_kw": 1000.0, "bus_b_kw": 800.0}])
    assert module_power_usable_kw(site, "m1") == pytest.approx(640.0)  # B: 800 x 0.8, not 800 + 640
    assert rack_power_usable_kw(site, "m1-r01") == pytest.approx(site.power_nodes["m1-r01/a"].usable_kw)


@pytest.mark.parametrize("units, redundancy, expected", [
    ([900, 900, 900], "N+1", 1800),        # three pumps, one may fail
    ([1350, 1350], "N+1", 1350),           # two CDUs N+1: one CDU's worth
    ([600, 1350, 2300], "N+1", 1950),      # the largest unit is the one that fails
    ([900, 900, 900, 900], "2N", 1800),    # half may fail
    ([900, 900], "N", 1800),               # no redundancy: everything
    ([], "N+1", 0),
])
def test_redundant_capacity_is_what_survives_the_largest_failure(units, redundancy, expected):
    assert redundant_capacity(units, redundancy) == pytest.approx(expected)


def test_redundant_capacity_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="redundancy"):
        redundant_capacity([1, 2], "N+2")


def test_cdu_usable_heat_is_limited_by_pumps_after_largest_fails():
    # 3 x 500 L/min N+1 -> 1000 L/min; racks design 1.2 L/min/kW -> 833 kW IT -> x0.88 = 733 kW heat
    site = small_site([{"racks": [120.0] * 6, "cdu_kw": 1350.0, "pumps": 3, "pump_flow_lpm": 500.0}])
    cap = cdu_capacity(site, "cdu-m1")
    assert cap.flow_available_lpm == pytest.approx(1000.0)
    assert cap.usable_heat_kw == pytest.approx(1000.0 / 1.2 * 0.88)
    assert "pump flow" in cap.limited_by


def test_cdu_usable_heat_is_heat_exchanger_when_pumps_suffice():
    site = small_site([{"racks": [120.0] * 4, "cdu_kw": 600.0, "pumps": 3, "pump_flow_lpm": 900.0}])
    cap = cdu_capacity(site, "cdu-m1")
    assert cap.usable_heat_kw == pytest.approx(600.0)
    assert cap.provisioned_heat_kw == pytest.approx(480.0 * 0.88)


def test_racks_behind_counts_each_rack_once_at_shared_nodes():
    site = small_site([{"racks": [100.0, 100.0]}, {"racks": [50.0]}])
    assert racks_behind(site, "xfmr") == ["m1-r01", "m1-r02", "m2-r01"]
    assert racks_behind(site, "bus-m1-b") == ["m1-r01", "m1-r02"]
    assert racks_behind(site, "m2-r01/a") == ["m2-r01"]
    caps = site_capacities(site)
    assert caps["xfmr"].provisioned_kw == pytest.approx(250.0)  # not 500: A and B paths share it
    assert caps["fdr-a"].provisioned_kw == pytest.approx(250.0)  # full racks: failover view
