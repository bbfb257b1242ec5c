"""Physics invariants of the site simulator (no servers, simulated time only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from podwatch.simulators.engine import Simulator
from podwatch.simulators.physics import CP_WATER_KJ_KG_K, Modifiers, SitePhysics
from podwatch.simulators.scenario import Scenario
from podwatch.site import load_site

ROOT = Path(__file__).resolve().parents[3]
START_MS = 1_763_000_000_000  # fixed simulated start: runs are reproducible


@pytest.fixture(scope="module")
def demo():
    return load_site(ROOT / "examples/sites/demo.yaml")


def pump_failure(site, takeover: bool) -> Scenario:
    return Scenario.parse({"name": "pf", "faults": [{"kind": "pump_failure", "target": "cdu-m1", "onset_s": 30,
                                                     "pumps": [1, 2], "standby_takeover": takeover,
                                                     "takeover_delay_s": 10}]}, site=site)


def test_energy_balance_heat_to_liquid_plus_air_equals_it_power(demo):
    physics = SitePhysics(demo, seed=1)
    mods = Modifiers.neutral(1, len(demo.racks), len(demo.cdus))
    for k in range(60):
        demand = physics.topo.rated_kw * (0.4 + 0.5 * np.sin(k / 7.0) ** 2)
        snap = physics.step(1.0, k + 1.0, demand, mods)
        htl = physics.topo.heat_to_liquid
        liquid = snap.rack_power_kw[0] * htl
        air = snap.rack_power_kw[0] * (1 - htl)
        np.testing.assert_allclose(liquid + air, snap.rack_power_kw[0], rtol=1e-12)
        # the PDU sides carry exactly the rack power
        np.testing.assert_allclose(snap.side_power_kw[0, 0::2] + snap.side_power_kw[0, 1::2], snap.rack_power_kw[0])
    # at steady state the loop removes the heat put into the liquid
    demand = physics.topo.rated_kw * 0.7
    for k in range(600):
        snap = physics.step(1.0, 100.0 + k, demand, mods)
    heat_in = np.bincount(physics.topo.rack_cdu, weights=snap.rack_power_kw[0] * physics.topo.heat_to_liquid)
    np.testing.assert_allclose(snap.cdu_heat_kw[0], heat_in, rtol=0.02)


def test_delta_t_matches_p_over_mdot_cp_at_steady_state(demo):
    physics = SitePhysics(demo, seed=2)
    mods = Modifiers.neutral(1, len(demo.racks), len(demo.cdus))
    demand = physics.topo.rated_kw * np.linspace(0.35, 1.0, len(demo.racks))
    for k in range(600):
        snap = physics.step(1.0, k + 1.0, demand, mods)
    q_liquid = snap.rack_power_kw[0] * physics.topo.heat_to_liquid
    mdot_kg_s = snap.rack_flow_lpm[0] / 60.0 * 1.0  # water 1 kg/L
    expected_dt = q_liquid / (mdot_kg_s * CP_WATER_KJ_KG_K)
    measured_dt = snap.rack_return_c[0] - snap.rack_supply_c[0]
    # the small loss to room air (0.02 kW/K) is the only difference: well under 1 %
    np.testing.assert_allclose(measured_dt, expected_dt, rtol=0.01)
    assert 4.0 < expected_dt.max() < 15.0  # 1.2 L/min/kW design flow -> ~10 K at rated heat


def test_energy_counters_only_increase(demo):
    sim = Simulator(demo, pump_failure(demo, takeover=False), seed=3, start_time=START_MS)
    last_sides = sim.state.side_energy_kwh.copy()
    last_nodes = sim.state.node_energy_kwh.copy()
    for _ in range(120):
        sim.step(5.0)
        assert np.all(sim.state.side_energy_kwh >= last_sides)
        assert np.all(sim.state.node_energy_kwh > last_nodes)
        last_sides, last_nodes = sim.state.side_energy_kwh.copy(), sim.state.node_energy_kwh.copy()
    # and what a PDU reports is that counter
    obs = sim.observe()
    assert obs.device_points("pdu-m1-r01-a")["pdu.energy_kwh"] == pytest.approx(sim.state.side_energy_kwh[0])


def test_no_throttling_below_the_limit(demo):
    sim = Simulator(demo, None, seed=4, start_time=START_MS)
    for _ in range(600):
        sim.step(1.0)
        below = sim.state.rack_return_c <= sim.state.topo.return_limit_c
        assert np.all(sim.state.throttle[below] == 1.0)
        np.testing.assert_allclose(sim.state.rack_power_kw, sim.state.rack_demand_kw)
    assert sim.truth.breaches == []


def test_throttle_falls_only_after_the_return_passed_the_limit(demo):
    sim = Simulator(demo, pump_failure(demo, takeover=False), seed=5, start_time=START_MS)
    ever_above = np.zeros(len(demo.racks), dtype=bool)
    throttled_seen = False
    for _ in range(240):
        before_above = sim.state.rack_return_c > sim.state.topo.return_limit_c
        ever_above |= before_above
        sim.step(1.0)
        throttled = sim.state.throttle < 1.0
        assert not np.any(throttled & ~ever_above), "a rack throttled without ever passing its return limit"
        throttled_seen |= throttled.any()
    assert throttled_seen
    # throttled racks draw less than they demand
    t = sim.state.throttle < 1.0
    assert np.all(sim.state.rack_power_kw[t] < sim.state.rack_demand_kw[t])


def test_pump_failure_without_standby_breaches(demo):
    sim = Simulator(demo, pump_failure(demo, takeover=False), seed=6, start_time=START_MS)
    sim.step(300.0)
    m1 = {r.id for r in demo.racks if r.cdu == "cdu-m1"}
    breached = set(sim.truth.breached_racks)
    assert breached and breached <= m1  # module 2 is untouched
    first = min(b.ts_ms for b in sim.truth.breaches)
    onset = sim.truth.faults[0].onset_ms
    assert 0 < first - onset < 120_000  # DLC failures breach in about a minute
    assert all("pump_failure-0" in b.causes for b in sim.truth.breaches)


def test_pump_failure_with_standby_takeover_does_not_breach(demo):
    sim = Simulator(demo, pump_failure(demo, takeover=True), seed=6, start_time=START_MS)
    sim.step(300.0)
    assert sim.truth.breaches == []
    obs = sim.observe().device_points("cdu-m1")
    assert obs["cdu.pump3.running"] == 1.0 and obs["cdu.pump1.running"] == 0.0
    # the fault registers tell the tripped pump from the standby now running (and a healthy idle one)
    assert (obs["cdu.pump1.fault"], obs["cdu.pump3.fault"]) == (1.0, 0.0)
    assert 0.5 * 1267 < obs["cdu.flow_lpm"] < 0.8 * 1267  # one pump: ~70 % of the 8 racks' design flow


def test_flow_restriction_hits_one_rack_only(demo):
    scenario = Scenario.parse({"faults": [{"kind": "flow_restriction", "target": "m1-r03", "onset_s": 10,
                                           "magnitude": 0.5}]}, site=demo)
    sim = Simulator(demo, scenario, seed=7, start_time=START_MS)
    sim.step(60.0)
    flow = sim.state.rack_flow_lpm
    i = sim.rack_index("m1-r03")
    assert flow[i] == pytest.approx(0.5 * demo.rack("m1-r03").design_flow_lpm, rel=0.01)
    others = np.delete(np.arange(len(flow)), i)
    np.testing.assert_allclose(flow[others], sim.state.topo.design_flow_lpm[others], rtol=1e-6)


def test_same_seed_same_run_different_seed_different_run(demo):
    def run(seed):
        sim = Simulator(demo, pump_failure(demo, takeover=False), seed=seed, start_time=START_MS)
        sim.step(120.0)
        return sim.state.rack_return_c.copy(), sim.readings()["pdu-m1-r01-a"], [b.ts_ms for b in sim.truth.breaches]

    a, b, c = run(11), run(11), run(12)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_meter_sees_it_plus_cooling_plus_losses(demo):
    sim = Simulator(demo, None, seed=8, start_time=START_MS)
    sim.step(120.0)
    meter = sim.readings()["meter-sub1"]["meter.power_kw"]
    it_kw = sim.state.rack_power_kw.sum()
    assert it_kw < meter < it_kw * 1.35  # overhead is cooling + distribution + transformer losses
    nodes = dict(zip(sim.state.topo.node_ids, sim.state.snapshot.node_power_kw[0]))
    assert nodes["xfmr-1"] > nodes["fdr-a"] + nodes["fdr-b"]  # transformer losses on top of its feeders


def test_inference_load_follows_the_trace_between_idle_and_rated(demo):
    sim = Simulator(demo, None, seed=9, start_time=START_MS)
    powers = []
    for _ in range(300):
        sim.step(1.0)
        powers.append(sim.state.rack_power_kw.copy())
    p = np.array(powers) / sim.state.topo.rated_kw
    assert p.min() >= 0.3 - 1e-9 and p.max() <= 1.0 + 1e-9
    assert p.std(axis=0).min() > 0.005  # real request bursts, not a constant


def test_fault_injected_while_running_is_in_the_ground_truth(demo):
    sim = Simulator(demo, None, seed=13, start_time=START_MS)
    sim.step(60.0)
    record = sim.inject({"kind": "pump_failure", "target": "cdu-m2", "pumps": [1, 2], "standby_takeover": False})
    assert record.onset_ms == START_MS + 60_000 and set(record.racks) == {r.id for r in demo.racks if r.cdu == "cdu-m2"}
    sim.step(240.0)
    assert sim.truth.breaches and all(b.causes == [record.id] for b in sim.truth.breaches)
    assert set(sim.truth.breached_racks) <= set(record.racks)
    with pytest.raises(Exception, match="faults\\[0\\].target"):
        sim.inject({"kind": "leak", "target": "nowhere", "magnitude": 1})


def test_a_worn_pump_is_made_up_by_the_others_until_they_fall_short_then_the_flow_falls(demo):
    """Pumps run at the speed that delivers the racks' demand: a worn duty pump makes them run
    faster at the same flow; once the duty pumps at full speed deliver less than the demand, the
    flow falls (parallel branches on a quadratic system curve), and with it the heat balance."""
    physics = SitePhysics(demo, seed=1)
    c = physics.topo.cdu_ids.index("cdu-m1")
    racks = physics.topo.rack_cdu == c
    demand_lpm = physics.topo.cdu_design_flow_lpm[c]
    pump_lpm = physics.topo.cdu_pump_flow_lpm[c]
    demand_kw = physics.topo.rated_kw * 0.8
    results = {}
    for remaining in (1.0, 0.9, 0.4):
        mods = Modifiers.neutral(1, len(demo.racks), len(demo.cdus))
        mods.pump_capacity[0, c, :2] = remaining
        for k in range(120):
            snap = physics.step(1.0, k + 1.0, demand_kw, mods)
        results[remaining] = (snap.cdu_flow_lpm[0, c], snap.pump_speed_pct[0, c, 0])
    capacity = 2 * pump_lpm * 0.4
    assert capacity < demand_lpm < 2 * pump_lpm * 0.9  # the site as the test assumes it
    assert results[1.0][0] == pytest.approx(demand_lpm, rel=1e-3)
    assert results[0.9][0] == pytest.approx(demand_lpm, rel=1e-3)  # made up by speed ...
    assert results[0.9][1] > results[1.0][1] + 5  # ... the pumps run faster
    assert results[0.4][1] == pytest.approx(100.0)  # at full speed ...
    assert results[0.4][0] == pytest.approx(capacity, rel=1e-2)  # ... the loop gets what they deliver
    assert np.all(snap.rack_return_c[0, racks] - snap.rack_supply_c[0, racks]
                  > 1.6 * physics.topo.rated_kw[racks] * 0.8 * physics.topo.heat_to_liquid[racks]
                  / (physics.topo.design_flow_lpm[racks] / 60 * CP_WATER_KJ_KG_K))


def test_pump_degradation_breach_is_in_the_ground_truth_with_its_cause(demo, tmp_path):
    from podwatch.simulators.history import generate_history

    scenario = Scenario.load(ROOT / "examples/scenarios/pump-degradation.yaml", demo)
    result = generate_history(demo, days=3300 / 86400, resolution_s=10, scenarios=[scenario], seed=5,
                              out_dir=tmp_path, start_ms=START_MS)
    truth = result.truth
    assert truth.faults[0].kind == "pump_degradation" and truth.faults[0].params["pumps"] == [1, 2]
    m1 = {r.id for r in demo.racks if r.cdu == "cdu-m1"}
    assert truth.breaches and {b.rack for b in truth.breaches} <= m1
    first = min(b.ts_ms for b in truth.breaches)
    # slow: the loop holds its flow for the first minutes of wear, the racks breach tens of minutes in
    assert 15 * 60 * 1000 < first - (START_MS + 600 * 1000) < 45 * 60 * 1000
    assert all(b.causes == [truth.faults[0].id] for b in truth.breaches)
    # the scenario's pumps never trip: no trip time in the truth (a tripping one is below)
    assert truth.faults[0].trip_ms is None


def test_a_worn_pump_trip_is_recorded_in_the_ground_truth(demo, tmp_path):
    from podwatch.simulators.history import generate_history
    from podwatch.simulators.truth import GroundTruth

    scenario = Scenario.parse({"faults": [
        {"kind": "pump_degradation", "target": "cdu-m1", "pumps": [1], "onset_s": 100, "ramp_s": 1000,
         "magnitude": 0.8, "trip_at_capacity": 0.3, "standby_takeover": False}]}, "trip", demo)
    result = generate_history(demo, days=200 / 86400, resolution_s=10, scenarios=[scenario], seed=5,
                              out_dir=tmp_path, start_ms=START_MS)
    (fault,) = result.truth.faults
    assert fault.trip_ms == START_MS + round(scenario.faults[0].trip_s() * 1000) == START_MS + 975_000
    assert GroundTruth.read_json(result.truth.write_json(tmp_path / "t.json")).faults[0].trip_ms == fault.trip_ms


def test_pdu_voltage_follows_the_site_voltage_when_whips_do_not_name_one():
    """A 400 V site: PDUs report ~231 V line-to-neutral, like the meters, not 415 V / sqrt(3)."""
    import yaml
    from podwatch.site import parse_site

    path = Path(__file__).parents[3] / "examples/sites/demo.yaml"
    text = path.read_text()
    assert "whips" not in text and "voltage_v: 415" in text
    data = yaml.safe_load(text.replace("voltage_v: 415", "voltage_v: 400"))
    site = parse_site(data, source=str(path), base=path.parent)
    sim = Simulator(site, seed=1, serve_modbus=False, mqtt_url=None)
    sim.step(5.0)
    pdu_v = [v for dev in sim.readings().values() for k, v in dev.items() if k == "pdu.l1.voltage_v"]
    assert pdu_v and all(abs(v - 400 / 3 ** 0.5) < 3 for v in pdu_v), pdu_v[:4]
