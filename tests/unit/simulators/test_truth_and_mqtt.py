"""Ground-truth breach bookkeeping and MQTT payload rendering (pure functions)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from podwatch.collectors.profiles import load_profile
from podwatch.simulators.mqtt_publisher import bms_messages, metadata_messages
from podwatch.simulators.truth import BreachTracker, FaultRecord, GroundTruth
from podwatch.site import Device


def tracker(faults=()):
    truth = GroundTruth(site="s", start_ms=1_000_000, seed=0, scenario="x", faults=list(faults))
    return truth, BreachTracker(truth, ["r1", "r2"], ["c1", "c1"], np.array([55.0, 55.0]),
                                [(f, set(f.racks)) for f in faults])


def test_breach_time_is_interpolated_and_counted_once_until_rearmed():
    fault = FaultRecord("f1", "pump_failure", "c1", 1_000_000, None, None, ["r1"], {})
    truth, tr = tracker([fault])
    tr.update(10.0, np.array([50.0, 40.0]))
    tr.update(11.0, np.array([60.0, 40.0]))  # crosses 55 halfway through the step
    assert [(b.rack, b.ts_ms, b.causes) for b in truth.breaches] == [("r1", 1_010_500, ["f1"])]
    tr.update(12.0, np.array([54.5, 40.0]))  # below the limit but not 1 K below: still the same breach
    tr.update(13.0, np.array([56.0, 40.0]))
    assert len(truth.breaches) == 1
    tr.update(14.0, np.array([53.0, 40.0]))  # rearmed
    tr.update(15.0, np.array([55.5, 40.0]))
    assert len(truth.breaches) == 2 and truth.first_breach_ms("r1") == 1_010_500 and truth.first_breach_ms("r2") is None


def test_truth_round_trips_through_json(tmp_path):
    fault = FaultRecord("f1", "leak", "r1", 5, 9, 2.0, ["r1", "r2"], {"ramp_s": 0.0})
    truth, tr = tracker([fault])
    tr.update(1.0, np.array([56.0, 56.0]))
    back = GroundTruth.read_json(truth.write_json(tmp_path / "t.json"))
    assert back == truth


def _device(profile_id: str) -> Device:
    return Device(id="bms-1", kind="rack", profile=profile_id, protocol="mqtt", host=None, port=None, unit_id=1,
                  serial=None, gateway=None, poll_interval_s=1.0, timeout_s=0.5, entity="r1", module="m1", side=None,
                  tag_path="site/m1/r1", enabled=True, path="x")


def test_bms_json_one_message_per_point_in_device_units():
    profile = load_profile("nvidia-bms-rack")
    points = {"rack.power_kw": 101.5, "rack.liquid_return_temp_c": 41.25, "rack.liquid_flow_lpm": float("nan")}
    msgs = dict(bms_messages(_device("nvidia-bms-rack"), profile, points, 1_763_000_000_123, "site"))
    assert set(msgs) == {"BMS/v1/PUB/Value/Rack/RackPower/site/m1/r1",
                         "BMS/v1/PUB/Value/Rack/RackLiquidReturnTemperature/site/m1/r1"}  # NaN (dropout): not sent
    power = json.loads(msgs["BMS/v1/PUB/Value/Rack/RackPower/site/m1/r1"])
    assert power == {"value": pytest.approx(101_500.0), "timestamp": 1_763_000_000_123, "quality": 1}
    meta = dict(metadata_messages(_device("nvidia-bms-rack"), profile))
    assert json.loads(meta["BMS/v1/PUB/Metadata/Rack/RackPower/site/m1/r1"])["metric"] == "rack.power_kw"


def test_generic_json_one_object_per_device():
    profile = load_profile("generic-json-rack")
    (topic, payload), = bms_messages(_device("generic-json-rack"), profile,
                                     {"rack.power_kw": 90.0, "rack.liquid_supply_temp_c": 32.1}, 5, "demo")
    assert topic == "podwatch/demo/telemetry/bms-1"
    assert json.loads(payload) == {"ts": 5, "power_kw": 90.0, "supply_temp_c": 32.1}
