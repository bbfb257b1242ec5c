"""Scenario files: parsing, errors with field paths, modifiers over time, sensor faults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from podwatch.errors import ConfigError
from podwatch.simulators.engine import Simulator
from podwatch.simulators.scenario import Scenario, random_scenario
from podwatch.site import load_site

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "examples/scenarios").glob("*.yaml"))


@pytest.fixture(scope="module")
def demo():
    return load_site(ROOT / "examples/sites/demo.yaml")


@pytest.fixture(scope="module")
def example_sites():
    """Example sites by id (a scenario's `site:` names the one it was written for; default demo)."""
    sites = {}
    for path in sorted((ROOT / "examples/sites").glob("*.yaml")):
        site = load_site(path)
        sites[site.id] = site
    return sites


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_scenario_loads_against_its_site(path, example_sites):
    site_id = Scenario.load(path).site or "demo"
    scenario = Scenario.load(path, example_sites[site_id])
    assert scenario.faults and scenario.duration_s


def test_a_scenario_for_another_site_says_so_once(demo):
    with pytest.raises(ConfigError) as exc:
        Scenario.load(ROOT / "examples/scenarios/rtu-chain-faults.yaml", demo)
    assert exc.value.errors == ["site: scenario written for site 'hall_3.retrofit', but the site is 'demo'"]


def test_two_overlapping_faults_each_shape_their_own_cdu(demo):
    scenario = Scenario.load(ROOT / "examples/scenarios/two-faults.yaml", demo)
    mods = scenario.modifiers(np.array([30.0, 125.0, 200.0, 700.0]), demo)
    surge = mods.load_mult[:, [r.cdu == "cdu-m1" for r in demo.racks]]
    np.testing.assert_allclose(surge[:, 0], [1.0, 1.0 + 0.4 * 65 / 120, 1.4, 1.0])  # ramp over 120 s, 600 s long
    calm = mods.load_mult[:, [r.cdu == "cdu-m2" for r in demo.racks]]
    np.testing.assert_allclose(calm, 1.0)
    cdu_m2 = [c.id for c in demo.cdus].index("cdu-m2")
    assert [bool(mods.pump_failed[k, cdu_m2, 0]) for k in range(4)] == [False, True, True, True]
    assert not mods.pump_failed[:, 1 - cdu_m2].any()


def test_expected_example_set_exists():
    names = {p.stem for p in EXAMPLES}
    assert {"pump-failure", "pump-failure-standby", "flow-restriction", "fouling", "facility-water-rise", "leak",
            "load-surge", "sensor-faults", "device-faults", "pump-degradation"} <= names


def test_bad_scenario_reports_every_error_with_its_path(demo):
    data = {"name": "bad", "faults": [
        {"kind": "pump_failure", "target": "cdu-m9", "onset_s": 10},
        {"kind": "flow_restriction", "target": "m1-r01", "onset_s": -5, "magnitude": 2},
        {"kind": "melt", "target": "x", "onset_s": 1},
    ]}
    with pytest.raises(ConfigError) as exc:
        Scenario.parse(data, "bad.yaml", demo)
    text = "\n".join(exc.value.errors)
    assert "faults[1].onset_s" in text and "faults[1].magnitude" in text and "faults[2]" in text
    with pytest.raises(ConfigError) as exc:
        Scenario.parse({"faults": [{"kind": "pump_failure", "target": "cdu-m9", "onset_s": 10},
                                   {"kind": "pump_failure", "target": "cdu-m1", "onset_s": 10, "pumps": [7]},
                                   {"kind": "sensor_fault", "target": "cdu-m1", "metric": "rack.power_kw",
                                    "mode": "stuck", "onset_s": 1}]}, "bad.yaml", demo)
    errors = exc.value.errors
    assert errors[0].startswith("faults[0].target: 'cdu-m9'")
    assert errors[1].startswith("faults[1].pumps: [7]")
    assert errors[2].startswith("faults[2].metric: 'rack.power_kw'")


def test_ramp_and_duration_shape_the_modifiers(demo):
    scenario = Scenario.parse({"faults": [
        {"kind": "hx_fouling", "target": "cdu-m2", "onset_s": 100, "ramp_s": 100, "duration_s": 300, "magnitude": 3},
        {"kind": "load_surge", "target": "*", "onset_s": 0, "magnitude": 1.2}]}, site=demo)
    mods = scenario.modifiers(np.array([50.0, 150.0, 200.0, 399.0, 400.0]), demo)
    np.testing.assert_allclose(mods.fouling[:, 1], [1.0, 2.0, 3.0, 3.0, 1.0])
    np.testing.assert_allclose(mods.fouling[:, 0], 1.0)
    np.testing.assert_allclose(mods.load_mult, 1.2)


def test_sensor_faults_change_reports_not_physics(demo):
    scenario = Scenario.load(ROOT / "examples/scenarios/sensor-faults.yaml", demo)
    sim = Simulator(demo, scenario, seed=1, start_time=1_763_000_000_000)
    sim.step(70.0)
    stuck = sim.readings()["cdu-m1"]["cdu.supply_temp_c"]
    sim.step(60.0)
    r = sim.readings()
    assert r["cdu-m1"]["cdu.supply_temp_c"] == stuck  # frozen
    assert np.isnan(r["bms-m1-r02"]["rack.liquid_return_temp_c"])  # dropout
    truth_flow = sim.state.snapshot.cdu_flow_lpm[0][sim.cdu_ids.index("cdu-m2")]
    assert r["cdu-m2"]["cdu.flow_lpm"] == pytest.approx(truth_flow - 300 * 70 / 3600, rel=0.01)  # drift -300 L/min/h


def test_random_scenario_is_reproducible_and_valid(demo):
    a = random_scenario(demo, 10 * 86400, 3.0, seed=5)
    b = random_scenario(demo, 10 * 86400, 3.0, seed=5)
    assert a.model_dump() == b.model_dump()
    assert 10 <= len(a.faults) <= 60
    assert a.check(demo) == []


def test_a_target_that_names_two_kinds_of_thing_is_ambiguous():
    from podwatch.site import parse_site

    site = parse_site({
        "site": {"id": "amb"},
        "power": {"transformers": [{"id": "t", "rating_kva": 2000}],
                  "feeders": [{"id": "a", "transformer": "t", "side": "a", "rating_a": 2000},
                              {"id": "b", "transformer": "t", "side": "b", "rating_a": 2000}]},
        "modules": [{"id": "x1", "cdus": [{"id": "c1", "capacity_kw": 500, "racks": ["x1"]}],
                     "racks": [{"id": "x1", "rated_kw": 100, "feeds": {"a": "a", "b": "b"}}]}]})
    with pytest.raises(ConfigError) as exc:
        Scenario.parse({"faults": [{"kind": "load_surge", "target": "x1", "onset_s": 0, "magnitude": 1.2}]}, site=site)
    assert exc.value.errors == ["faults[0].target: 'x1' is both a rack and a module; rename one in the site file"]
    assert Scenario.parse({"faults": [{"kind": "flow_restriction", "target": "x1", "onset_s": 0, "magnitude": 0.5}]},
                          site=site).faults  # only racks can be restricted: not ambiguous


def test_pump_degradation_wears_its_pumps_and_trips_them_at_the_set_capacity(demo):
    scenario = Scenario.parse({"name": "wear", "faults": [
        {"kind": "pump_degradation", "target": "cdu-m1", "pumps": [1, 2], "onset_s": 100, "ramp_s": 1000,
         "magnitude": 0.8, "trip_at_capacity": 0.4, "standby_takeover": False, "duration_s": 2000}]}, "wear", demo)
    fault = scenario.faults[0]
    t = np.array([50.0, 600.0, 849.0, 851.0, 1500.0, 2200.0])
    mods = scenario.modifiers(t, demo)
    c = [c.id for c in demo.cdus].index("cdu-m1")
    np.testing.assert_allclose(mods.pump_capacity[:, c, 0], [1.0, 0.6, 1 - 0.8 * 0.749, 1 - 0.8 * 0.751, 0.2, 1.0])
    np.testing.assert_allclose(mods.pump_capacity[:, c, 1], mods.pump_capacity[:, c, 0])
    np.testing.assert_allclose(mods.pump_capacity[:, c, 2], 1.0)  # the standby pump is not worn
    np.testing.assert_allclose(mods.pump_capacity[:, 1 - c], 1.0)
    # remaining capacity reaches 0.4 at 100 + 1000 * 0.6 / 0.8 = 850 s: tripped from then until repaired
    assert fault.trip_s() == pytest.approx(850.0)
    assert mods.pump_failed[:, c, 0].tolist() == [False, False, False, True, True, False]
    assert mods.takeover_enabled[:, c].tolist() == [True, True, True, False, False, True]
    assert sorted(fault.abrupt_instants_s()) == [100.0, pytest.approx(850.0), 2100.0]


def test_pump_degradation_checks_its_pumps_and_target(demo):
    with pytest.raises(ConfigError) as exc:
        Scenario.parse({"faults": [
            {"kind": "pump_degradation", "target": "cdu-m1", "onset_s": 0, "magnitude": 0.5, "pumps": [5]},
            {"kind": "pump_degradation", "target": "m1-r01", "onset_s": 0, "magnitude": 0.5}]}, "bad", demo)
    assert exc.value.errors == ["faults[0].pumps: [5] not installed on cdu-m1 (pumps 1..3)",
                                "faults[1].target: 'm1-r01' is not a valid pump_degradation target (a CDU id)"]
    with pytest.raises(ConfigError) as exc:
        Scenario.parse({"faults": [{"kind": "pump_degradation", "target": "cdu-m1", "onset_s": 0, "magnitude": 1.5}]},
                       "bad", demo)
    assert "faults[0].magnitude" in " ".join(exc.value.errors)
