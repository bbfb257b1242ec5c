"""Small site dicts for capacity tests, parsed by the real site validator."""

from __future__ import annotations

from podwatch.site import Site, parse_site


def site_dict(modules: list[dict], transformer_kw: float = 4000.0, feeder_kw: float | None = 3000.0,
              pdus: bool = False, cdu_device: bool = False, meter: bool = False, timezone: str = "UTC") -> dict:
    """modules: [{racks: [rated_kw, ...], bus_a_kw, bus_b_kw, cdu_kw, pumps, pump_flow_lpm, redundancy,
    derating_a}]. Racks feed from the module's busways; busways hang from feeders fdr-a / fdr-b."""
    gateways = [{"id": "gw", "host": "127.0.0.1", "port": 15999}]
    transformer = {"id": "xfmr", "rating_kw": transformer_kw}
    if meter:
        transformer["meter"] = {"id": "meter-xfmr", "profile": "schneider-pm5560", "gateway": "gw", "unit_id": 250}
    feeders = []
    if feeder_kw is not None:
        feeders = [{"id": "fdr-a", "transformer": "xfmr", "side": "a", "rating_kw": feeder_kw},
                   {"id": "fdr-b", "transformer": "xfmr", "side": "b", "rating_kw": feeder_kw}]
    out_modules = []
    unit = 1
    for mi, m in enumerate(modules, start=1):
        mid = f"m{mi}"
        busways = [
            {"id": f"bus-{mid}-a", "feeder": "fdr-a", "side": "a", "rating_kw": m.get("bus_a_kw", 1000.0),
             "derating": m.get("derating_a", 1.0)},
            {"id": f"bus-{mid}-b", "feeder": "fdr-b", "side": "b", "rating_kw": m.get("bus_b_kw", 1000.0)},
        ]
        racks = []
        for ri, rated in enumerate(m["racks"], start=1):
            rack = {"id": f"{mid}-r{ri:02d}", "rated_kw": rated, "feeds": {"a": f"bus-{mid}-a", "b": f"bus-{mid}-b"}}
            if pdus:
                rack["pdus"] = {
                    "a": {"id": f"pdu-{mid}-r{ri:02d}-a", "profile": "raritan-px3", "gateway": "gw", "unit_id": unit},
                    "b": {"id": f"pdu-{mid}-r{ri:02d}-b", "profile": "raritan-px3", "gateway": "gw", "unit_id": unit + 1},
                }
                unit += 2
            racks.append(rack)
        cdu = {"id": f"cdu-{mid}", "capacity_kw": m.get("cdu_kw", 1350.0), "pumps": m.get("pumps", 3),
               "pump_redundancy": m.get("redundancy", "N+1"), "pump_flow_lpm": m.get("pump_flow_lpm", 900.0),
               "supply_setpoint_c": 32, "facility_supply_c": 26, "racks": [r["id"] for r in racks]}
        if cdu_device:
            cdu["device"] = {"id": f"cdu-{mid}", "profile": "podwatch-cdu", "gateway": "gw", "unit_id": 200 + mi}
        out_modules.append({"id": mid, "busways": busways, "cdus": [cdu], "racks": racks})
    return {"site": {"id": "t", "timezone": timezone}, "gateways": gateways,
            "power": {"transformers": [transformer], "feeders": feeders}, "modules": out_modules}


def small_site(modules: list[dict], **kw) -> Site:
    return parse_site(site_dict(modules, **kw))
