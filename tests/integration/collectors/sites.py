"""Small valid sites built in code for the collector tests (one module, N racks, A/B PDUs)."""

from __future__ import annotations

from podwatch.collectors.profiles import load_profile
from podwatch.samples import Reading
from podwatch.site import Site, parse_site


def rack_site(racks: int, gateways: list[dict], pdu_a: dict | None = None, pdu_b: dict | None = None,
              sensors: dict | None = None, cdu_device: dict | None = None, defaults: dict | None = None,
              mqtt: dict | None = None, site_id: str = "t1") -> Site:
    """Racks r1..rN; `pdu_a`/`pdu_b`/`sensors` are device templates (strings may use {i}), None = no device."""
    rack = {"id": "r{i}", "rated_kw": 100, "feeds": {"a": "ba", "b": "bb"}}
    pdus = {}
    if pdu_a:
        pdus["a"] = {"id": "pdu-r{i}-a", "profile": "raritan-px3", **pdu_a}
    if pdu_b:
        pdus["b"] = {"id": "pdu-r{i}-b", "profile": "raritan-px3", **pdu_b}
    if pdus:
        rack["pdus"] = pdus
    if sensors:
        rack["sensors"] = {"id": "bms-r{i}", "profile": "nvidia-bms-rack", **sensors}
    cdu = {"id": "c1", "capacity_kw": 100 * racks, "pumps": 3, "pump_flow_lpm": 100 * racks,
           "racks": [f"r{i}" for i in range(1, racks + 1)]}
    if cdu_device:
        cdu["device"] = {"id": "cdu-1", "profile": "podwatch-cdu", **cdu_device}
    data = {
        "site": {"id": site_id, "timezone": "UTC"},
        "defaults": defaults or {"poll_interval_s": 1.0, "timeout_s": 0.5},
        "gateways": gateways,
        "power": {
            "transformers": [{"id": "x1", "rating_kva": 20000}],
            "feeders": [{"id": "fa", "transformer": "x1", "side": "a", "rating_kw": 8000},
                        {"id": "fb", "transformer": "x1", "side": "b", "rating_kw": 8000}],
        },
        "modules": [{
            "id": "m1",
            "busways": [{"id": "ba", "feeder": "fa", "side": "a", "rating_kw": 6000},
                        {"id": "bb", "feeder": "fb", "side": "b", "rating_kw": 6000}],
            "cdus": [cdu],
            "racks": [{"template": rack, "range": [1, racks]}],
        }],
    }
    if mqtt:
        data["mqtt"] = mqtt
    return parse_site(data)


PDU_VALUES = {"pdu.l1.voltage_v": 240.5, "pdu.l1.current_a": 31.25, "pdu.power_kw": 21.5, "pdu.apparent_power_kva": 22.0,
              "pdu.power_factor": 0.977, "pdu.frequency_hz": 50.0, "pdu.energy_kwh": 123456.789,
              "pdu.l1.power_kw": 7.25, "pdu.l2.voltage_v": 239.75, "pdu.l2.current_a": 30.5, "pdu.l2.power_kw": 7.0,
              "pdu.l3.voltage_v": 241.0, "pdu.l3.current_a": 29.75, "pdu.l3.power_kw": 7.25}


def pdu_values(unit: int) -> dict[str, float]:
    """Distinct per unit so a reading from the wrong unit shows: power_kw = 10 + unit / 10."""
    return {**PDU_VALUES, "pdu.power_kw": 10.0 + unit / 10.0}


def raritan():
    return load_profile("raritan-px3")


class MemorySink:
    """An in-memory implementation of the collectors' sink interface (test double of OUR interface)."""

    def __init__(self):
        self.readings: list[Reading] = []
        self.dead_letters: list[dict] = []

    async def send(self, reading: Reading) -> None:
        self.readings.append(reading)

    async def send_dead_letter(self, payload: bytes, reason: str, source: str, **meta) -> None:
        self.dead_letters.append({"payload": payload, "reason": reason, "source": source, **meta})

    def of(self, device: str) -> list[Reading]:
        return [r for r in self.readings if r.device == device]
