"""Every example site simulates to physically coherent readings (no servers): each transformer
meter carries its racks' PDU power plus cooling and losses, every rack's coolant flow is near its
design flow and its return sits between supply and the limit, and every CDU removes the heat its
racks put into the liquid. Catches example files whose topology does not add up."""

from __future__ import annotations

from pathlib import Path

import pytest

from podwatch.simulators.engine import Simulator
from podwatch.site import load_site

ROOT = Path(__file__).resolve().parents[3]
SITES = sorted((ROOT / "examples" / "sites").glob("*.yaml"))


@pytest.mark.parametrize("path", SITES, ids=[p.stem for p in SITES])
def test_example_site_is_physically_coherent(path):
    site = load_site(path)
    sim = Simulator(site, seed=5, start_time=1_763_000_000_000)
    sim.step(240.0)  # several rack time constants: returns settle
    r = sim.readings()
    pdu_kw = sum(v["pdu.power_kw"] for d, v in r.items() if site.device(d).kind == "pdu")
    it_kw = float(sim.state.rack_power_kw.sum())
    pdus = [d for d in site.devices if d.kind == "pdu"]
    if pdus and len(pdus) == 2 * len(site.racks):  # both sides metered: PDUs see all IT power
        assert pdu_kw == pytest.approx(it_kw, rel=0.02)
    rated = sum(rk.rated_kw for rk in site.racks)
    assert 0.2 * rated < it_kw <= 1.17 * rated
    meters = {d.entity: r[d.id]["meter.power_kw"] for d in site.devices if d.kind == "meter"}
    transformers = [n for n in site.power_nodes.values() if n.kind == "transformer"]
    if all(t.id in meters for t in transformers):
        total = sum(meters[t.id] for t in transformers)
        assert it_kw < total < 1.25 * it_kw  # + cooling overhead and distribution/transformer losses
    for i, rack in enumerate(sim.rack_ids):
        spec = site.rack(rack)
        assert sim.state.rack_return_c[i] < spec.return_limit_c, rack
    for d in site.devices:
        if d.kind == "cdu":
            cdu = site.cdu(d.entity)
            design_lpm = sum(site.rack(x).design_flow_lpm for x in cdu.racks)
            assert r[d.id]["cdu.flow_lpm"] == pytest.approx(design_lpm, rel=0.05), d.id
            assert r[d.id]["cdu.supply_temp_c"] == pytest.approx(cdu.supply_setpoint_c, abs=1.0), d.id
            assert r[d.id]["cdu.return_temp_c"] > r[d.id]["cdu.supply_temp_c"] + 2.0, d.id
