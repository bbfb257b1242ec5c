"""A small site on free loopback ports for protocol tests: one Modbus TCP gateway (two racks' A/B
PDUs, the CDU, a feeder meter), one RTU-over-TCP gateway (SunSpec substation meter), BMS sensors."""

from __future__ import annotations

from pathlib import Path

import pytest

from podwatch import procs
from podwatch.site import load_site

SITE_YAML = """
site: {{id: t1, timezone: UTC}}
gateways:
  - {{id: gw, host: 127.0.0.1, port: {tcp_port}}}
  - {{id: gw-rtu, protocol: modbus-rtu-over-tcp, host: 127.0.0.1, port: {rtu_port}}}
power:
  transformers:
    - {{id: x1, rating_kva: 2000, meter: {{id: meter-x1, profile: sunspec-213, gateway: gw-rtu, unit_id: 5}}}}
  feeders:
    - {{id: fa, transformer: x1, side: a, rating_a: 2000,
       meter: {{id: meter-fa, profile: schneider-pm5560, gateway: gw, unit_id: 50}}}}
    - {{id: fb, transformer: x1, side: b, rating_a: 2000}}
modules:
  - id: m1
    cdus:
      - {{id: cdu-1, capacity_kw: 600, pumps: 2, pump_redundancy: N+1, pump_flow_lpm: 600, supply_setpoint_c: 32,
         facility_supply_c: 26, racks: [r1, r2], device: {{id: cdu-1, profile: podwatch-cdu, gateway: gw, unit_id: 200}}}}
    racks:
      - template:
          id: "r{{j}}"
          rated_kw: 132
          feeds: {{a: fa, b: fb}}
          pdus:
            a: {{id: "pdu-r{{j}}-a", profile: raritan-px3, gateway: gw, unit_id: "{{j}}"}}
            b: {{id: "pdu-r{{j}}-b", profile: raritan-px3, gateway: gw, unit_id: "{{j+100}}"}}
          sensors: {{id: "bms-r{{j}}", profile: nvidia-bms-rack}}
        for: {{j: [1, 2]}}
"""


@pytest.fixture
def small_site(tmp_path: Path):
    path = tmp_path / "site.yaml"
    path.write_text(SITE_YAML.format(tcp_port=procs.free_port(), rtu_port=procs.free_port()))
    return load_site(path)
