"""Read planner: merging, gaps, maximum registers per request, large maps, address base."""

import pytest

from podwatch.collectors.planner import decode_request, plan_reads
from podwatch.collectors.profiles import ModbusProfile, encode_point, load_profile
from podwatch.errors import ConfigError


def profile(points, **kw) -> ModbusProfile:
    data = {"id": "p", "kind": "meter", "vendor": "v", "model": "m", "points": points, **kw}
    return ModbusProfile.model_validate(data)


METRICS = ["meter.l1.current_a", "meter.l2.current_a", "meter.l3.current_a", "meter.l1.voltage_v",
           "meter.l2.voltage_v", "meter.l3.voltage_v", "meter.power_kw", "meter.energy_kwh"]


def pts(*specs):
    """(address, data_type[, register]) -> points with distinct catalog metrics."""
    out = []
    for metric, spec in zip(METRICS, specs):
        addr, dt, *reg = spec
        out.append({"metric": metric, "address": addr, "data_type": dt, "register": reg[0] if reg else "holding"})
    return out


def shape(plan):
    return [(r.function_code, r.start, r.count, len(r.points)) for r in plan.requests]


def test_contiguous_points_merge_into_one_request():
    plan = plan_reads(profile(pts((0, "float32"), (2, "float32"), (4, "int16"))))
    assert shape(plan) == [(3, 0, 5, 3)]
    assert [p.register_offset for p in plan.requests[0].points] == [0, 2, 4]


@pytest.mark.parametrize("max_gap,expected", [
    (0, [(3, 0, 2, 1), (3, 5, 2, 1)]),  # gap of 3 unused registers: not read through
    (2, [(3, 0, 2, 1), (3, 5, 2, 1)]),
    (3, [(3, 0, 7, 2)]),               # exactly the gap: merged
    (10, [(3, 0, 7, 2)]),
])
def test_gap_is_read_through_only_up_to_max_gap(max_gap, expected):
    plan = plan_reads(profile(pts((0, "float32"), (5, "float32")), max_gap=max_gap))
    assert shape(plan) == expected
    assert plan.requests[0].gap_registers == (3 if len(expected) == 1 else 0)


def test_holding_and_input_registers_never_share_a_request():
    plan = plan_reads(profile(pts((0, "int16", "input"), (1, "int16", "holding"), (2, "int16", "input"))))
    assert shape(plan) == [(3, 1, 1, 1), (4, 0, 3, 2)]


def test_max_registers_per_read_splits_requests():
    points = pts(*[(2 * i, "float32") for i in range(8)])  # 16 contiguous registers
    assert shape(plan_reads(profile(points, max_registers_per_read=6))) == [(3, 0, 6, 3), (3, 6, 6, 3), (3, 12, 4, 2)]
    assert shape(plan_reads(profile(points), max_registers_per_read=5)) == [(3, 0, 4, 2), (3, 4, 4, 2), (3, 8, 4, 2), (3, 12, 4, 2)]
    # a 32-bit value is never split across requests
    for r in plan_reads(profile(points), max_registers_per_read=3).requests:
        assert r.count <= 3 and all(p.register_offset + p.register_count <= r.count for p in r.points)


def test_large_map_over_125_registers_is_split_at_the_protocol_limit():
    from podwatch.metrics import CATALOG

    metrics = sorted(m for m in CATALOG if m.startswith(("meter.", "pdu.", "cdu.")))[:40]
    points = [{"metric": m, "address": 1000 + 4 * i, "data_type": "float64"} for i, m in enumerate(metrics)]
    assert len(metrics) == 40  # 160 contiguous registers
    plan = plan_reads(profile(points))
    assert all(r.count <= 125 for r in plan.requests)
    assert shape(plan) == [(3, 1000, 124, 31), (3, 1124, 36, 9)]
    assert sorted(plan.metrics) == sorted(metrics)


def test_address_base_1_reads_one_register_lower_on_the_wire():
    plan = plan_reads(profile(pts((3000, "float32"), (3002, "float32")), address_base=1))
    assert shape(plan) == [(3, 2999, 4, 2)]


def test_a_64_bit_point_that_cannot_fit_is_a_config_error_naming_the_numbers():
    with pytest.raises(ConfigError) as info:
        plan_reads(profile(pts((0, "int64"))), max_registers_per_read=2)
    assert "meter.l1.current_a: int64 needs 4 registers but max_registers_per_read is 2" in info.value.errors[0]


def test_overrides_are_validated():
    with pytest.raises(ConfigError, match="outside 1..125"):
        plan_reads(profile(pts((0, "int16"))), max_registers_per_read=126)


@pytest.mark.parametrize("pid", ["raritan-px3", "schneider-pm5560", "sunspec-213", "podwatch-cdu"])
def test_builtin_profiles_plan_every_point_once_and_decode_encoded_values(pid):
    prof = load_profile(pid)
    plan = plan_reads(prof)
    assert sorted(plan.metrics) == sorted(p.metric for p in prof.points)
    # serve the encoded values as a device would, decode through the plan
    values = {p.metric: 10.0 + i for i, p in enumerate(prof.points)}
    decoded = {}
    for req in plan.requests:
        regs = [0] * req.count
        for p in prof.points:
            start = prof.wire_address(p) - req.start
            if p.register_type == req.register_type and 0 <= start < req.count:
                regs[start:start + p.register_count] = encode_point(prof, p, values[p.metric])
        decode_request(req, regs, decoded)
    assert decoded == pytest.approx(values, rel=1e-6)


def test_short_response_is_refused():
    plan = plan_reads(profile(pts((0, "float32"), (2, "float32"))))
    with pytest.raises(ValueError, match="expected 4 registers, got 2"):
        decode_request(plan.requests[0], [0, 0], {})
