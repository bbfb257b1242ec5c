"""Device profile model: every built-in profile parses, maps catalog metrics, and round-trips values."""

from __future__ import annotations

import struct

import pytest

from podwatch.collectors.profiles import (
    ModbusProfile, available_profiles, decode_point, decode_value, encode_point, encode_value,
)
from podwatch.metrics import CATALOG

PROFILES = available_profiles()


def test_builtin_profiles_cover_every_device_kind():
    assert {p.kind for p in PROFILES.values()} == {"pdu", "meter", "cdu", "rack"}
    assert {"raritan-px3", "schneider-pm5560", "sunspec-213", "podwatch-cdu", "nvidia-bms-rack"} <= set(PROFILES)


@pytest.mark.parametrize("pid", sorted(PROFILES))
def test_profile_points_are_catalog_metrics_with_matching_units(pid):
    for point in PROFILES[pid].points:
        metric = CATALOG[point.metric]
        assert point.unit is None or point.unit == metric.unit, (point.metric, point.unit, metric.unit)


@pytest.mark.parametrize("pid", sorted(p for p in PROFILES if isinstance(PROFILES[p], ModbusProfile)))
def test_modbus_points_do_not_overlap_and_round_trip(pid):
    profile = PROFILES[pid]
    used: dict[tuple[str, int], str] = {}
    for point in profile.points:
        for k in range(point.register_count):
            key = (point.register_type, profile.wire_address(point) + k)
            assert key not in used, f"{point.metric} overlaps {used[key]}"
            used[key] = point.metric
        value = 12.5 if point.scale == 1 else 123.4
        decoded = decode_point(profile, point, encode_point(profile, point, value))
        assert decoded == pytest.approx(value, rel=1e-3, abs=point.scale)


def test_schneider_profile_is_one_based_on_the_wire():
    pm = PROFILES["schneider-pm5560"]
    current_a = next(p for p in pm.points if p.metric == "meter.l1.current_a")
    assert current_a.address == 3000 and pm.wire_address(current_a) == 2999


def test_word_orders_match_independent_struct_packing():
    big = struct.unpack(">HH", struct.pack(">f", 97.25))
    assert encode_value(97.25, "float32", "ABCD") == list(big)
    assert encode_value(97.25, "float32", "CDAB") == [big[1], big[0]]
    swapped = struct.unpack(">HH", struct.pack("<f", 97.25))  # fully little-endian bytes
    assert encode_value(97.25, "float32", "DCBA") == list(swapped)
    assert decode_value([big[0], big[1]], "float32", "ABCD") == 97.25


def test_unavailable_markers_decode_to_none():
    assert decode_value([0x8000], "int16") is None
    assert decode_value([0xFFFF], "uint16") is None
    assert decode_value(encode_value(float("nan"), "float32"), "float32") is None
