"""docs/devices.md is generated from the profiles; it must not drift."""

from pathlib import Path

from podwatch.simulators.devicedoc import render_devices_md

ROOT = Path(__file__).resolve().parents[3]


def test_devices_md_matches_the_profiles():
    text = (ROOT / "docs/devices.md").read_text()
    assert text == render_devices_md(), "regenerate: python -m podwatch.simulators.devicedoc > docs/devices.md"
    for needle in ("| `pdu.power_kw` | 12306 | 12306 | holding (3) | float32 | ABCD | 0.001 | W | kW |",
                   "| `meter.power_kw` | 3060 | 3059 | holding (3) | float32 | ABCD |",
                   "| `cdu.flow_lpm` | 32 | 32 | input (4) | float32 | CDAB |",
                   "BMS/v1/PUB/Value/Rack/{point}/{tag_path}", "mosquitto_sub"):
        assert needle in text
