"""The compiled decode plan of a request (`planner.RequestDecoder`, the poll loop's hot path) against
a straightforward reference decode: each point on its own through `profiles.decode_point` (word
order, struct, NaN/inf and 'not available' markers, `raw * scale + offset`).

Register contents come from hypothesis, biased towards the words that make NaN, infinities and the
SunSpec markers, so the decoder's whole-request checks (finite sum, marker scan) and its per-point
fallback are both exercised. Every built-in Modbus profile is checked with its own plan and with
small reads (many requests), plus a synthetic map holding every data type x word order x scale, an
overlapping point and a gap."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podwatch.collectors.planner import decode_request, plan_reads, response_bytes
from podwatch.collectors.profiles import ModbusProfile, available_profiles, decode_point
from podwatch.metrics import CATALOG

# words that build NaN / inf (float32 high word, float64 top word), markers (0x8000, 0xFFFF), zero
SPECIAL_WORDS = [0x7FC0, 0x7F80, 0xFF80, 0x7FF8, 0x7FF0, 0xFFF0, 0x8000, 0xFFFF, 0x0000, 0x0001]
WORDS = st.one_of(st.integers(0, 0xFFFF), st.sampled_from(SPECIAL_WORDS))

MODBUS_PROFILES = sorted(pid for pid, p in available_profiles().items() if isinstance(p, ModbusProfile))


def synthetic_profile() -> ModbusProfile:
    """Every data type in every word order (scaled, offset and identity) in both register types,
    with one-register gaps and an overlapping point."""
    metrics = iter(CATALOG)
    points = []
    address = 0
    types = ["int16", "uint16", "bool", "int32", "uint32", "float32", "int64", "uint64", "float64"]
    scalings = [(1.0, 0.0), (0.1, 0.0), (0.001, -40.0), (10.0, 2.5)]
    for i, data_type in enumerate(types):
        for j, order in enumerate(["ABCD", "CDAB", "BADC", "DCBA"]):
            scale, offset = scalings[(i + j) % len(scalings)]
            points.append({"metric": next(metrics), "address": address, "data_type": data_type,
                           "word_order": order, "scale": scale, "offset": offset,
                           "register": "holding" if (i + j) % 3 else "input"})
            address += {"int16": 1, "uint16": 1, "bool": 1, "int32": 2, "uint32": 2, "float32": 2}.get(data_type, 4)
        address += 1  # a one-register gap, read through
    # a point overlapping the first float32's low word, big-endian (decoded on its own, not by the bulk unpack)
    first_float = next(p for p in points if p["data_type"] == "float32" and p["register"] == "holding")
    points.append({"metric": next(metrics), "address": first_float["address"] + 1, "data_type": "uint16",
                   "register": "holding"})
    return ModbusProfile.model_validate({"id": "synthetic", "kind": "meter", "vendor": "v", "model": "m",
                                         "max_gap": 8, "points": points})


def plans():
    """(name, profile, plan): every built-in Modbus profile as planned and with 10-register reads."""
    out = []
    profiles = available_profiles()
    for pid in MODBUS_PROFILES:
        out.append((pid, profiles[pid], plan_reads(profiles[pid])))
        out.append((f"{pid} max 10 registers", profiles[pid], plan_reads(profiles[pid], max_registers_per_read=10)))
    synthetic = synthetic_profile()
    out.append(("synthetic", synthetic, plan_reads(synthetic)))
    return out


PLANS = plans()


def reference_decode(profile: ModbusProfile, request, registers: list[int]) -> dict[str, float | None]:
    by_metric = {p.metric: p for p in profile.points}
    out = {}
    for planned in request.points:
        point = by_metric[planned.metric]
        words = registers[planned.register_offset:planned.register_offset + planned.register_count]
        out[planned.metric] = decode_point(profile, point, words)
    return out


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for metric, value in expected.items():
        if value is None:
            assert got[metric] is None, metric
        else:
            assert got[metric] is not None and math.isfinite(got[metric]), metric
            assert got[metric] == value, (metric, got[metric], value)  # same operations: the same value


def test_every_profile_is_covered():
    assert {"sunspec-213", "schneider-pm5560", "raritan-px3", "podwatch-cdu"} <= set(MODBUS_PROFILES)
    synthetic = next(plan for name, _, plan in PLANS if name == "synthetic")
    assert {r.function_code for r in synthetic.requests} == {3, 4}
    assert max(len(r.points) for r in synthetic.requests) >= 20  # read through gaps: mixed types and orders
    assert all(r.decoder is not None for _, _, plan in PLANS for r in plan.requests)


@pytest.mark.parametrize("name,profile,plan", PLANS, ids=[name for name, _, _ in PLANS])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_compiled_plan_decodes_like_the_reference(name, profile, plan, data):
    for request in plan.requests:
        registers = data.draw(st.lists(WORDS, min_size=request.count, max_size=request.count), label=request.describe())
        expected = reference_decode(profile, request, registers)
        got: dict = {}
        nones = decode_request(request, registers, got)
        assert_same(got, expected)
        assert nones == sum(v is None for v in expected.values())


@pytest.mark.parametrize("name,profile,plan", PLANS, ids=[name for name, _, _ in PLANS])
def test_clean_and_all_marker_responses(name, profile, plan):
    """The two extremes: a response of small words (every value finite, no marker: the bulk path)
    and one of 0xFFFF words (NaN floats, uint markers: the per-point path)."""
    for fill in (0x0001, 0xFFFF, 0x8000):
        for request in plan.requests:
            registers = [fill] * request.count
            got: dict = {}
            nones = decode_request(request, registers, got)
            expected = reference_decode(profile, request, registers)
            assert_same(got, expected)
            assert nones == sum(v is None for v in expected.values())
            if fill == 0x0001:
                assert nones == 0


def test_short_response_is_refused_and_extra_registers_are_ignored():
    _, profile, plan = PLANS[0]
    request = plan.requests[0]
    with pytest.raises(ValueError, match=f"expected {request.count} registers, got {request.count - 1}"):
        response_bytes(request, [0] * (request.count - 1))
    registers = [0x0001] * request.count
    assert response_bytes(request, registers + [0x1234, 0x5678]) == response_bytes(request, registers)
    got: dict = {}
    decode_request(request, registers + [0xFFFF], got)
    assert_same(got, reference_decode(profile, request, registers))
