"""Decode table: every data type x word order x scale/offset, against struct packing written here.

Both decoders are checked: `profiles.decode_value` (the profile model) and the planner's compiled
per-point decoder that the poll loop uses."""

import math
import struct

import pytest

from podwatch.collectors.planner import compile_decoder, registers_to_bytes
from podwatch.collectors.profiles import decode_value, encode_value

# (data type, struct code, sample raw value)
TYPES = [
    ("int16", "h", -12345), ("uint16", "H", 54321), ("bool", "H", 1),
    ("int32", "i", -123456789), ("uint32", "I", 3_000_000_123), ("float32", "f", 1234.5),
    ("int64", "q", -1_234_567_890_123), ("uint64", "Q", 4_503_599_627_370_497), ("float64", "d", -98765.4321),
]
ORDERS = ["ABCD", "CDAB", "BADC", "DCBA"]
SCALES = [(1.0, 0.0), (0.1, 0.0), (0.001, -40.0), (10.0, 2.5)]


def wire_registers(code: str, raw, order: str) -> list[int]:
    """Independent expectation: big-endian bytes, then split into words and reorder per the
    definition (A = most significant byte): CDAB swaps words, BADC swaps bytes in words, DCBA both."""
    be = struct.pack(">" + code, raw)
    words = [be[i:i + 2] for i in range(0, len(be), 2)]
    if order in ("CDAB", "DCBA"):
        words = words[::-1]
    if order in ("BADC", "DCBA"):
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


@pytest.mark.parametrize("scale,offset", SCALES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("data_type,code,raw", TYPES)
def test_decode_matches_struct(data_type, code, raw, order, scale, offset):
    regs = wire_registers(code, raw, order)
    raw_expected = struct.unpack(">" + code, struct.pack(">" + code, raw))[0]  # float32 rounding
    expected = raw_expected * scale + offset
    assert decode_value(regs, data_type, order, scale, offset) == pytest.approx(expected, rel=1e-12)
    # compiled decoder, with the point placed after 3 unrelated registers inside a bigger response
    response = [0xDEAD, 0xBEEF, 0x1234] + regs + [0xFFFF]
    decode = compile_decoder(data_type, order, scale, offset, byte_offset=3 * 2)
    assert decode(registers_to_bytes(response)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("data_type,code,raw", TYPES)
def test_encode_is_the_inverse_on_the_wire(data_type, code, raw, order):
    value = float(raw) if not data_type.startswith("float") else struct.unpack(">" + code, struct.pack(">" + code, raw))[0]
    assert encode_value(value, data_type, order) == wire_registers(code, raw, order)


def test_word_order_matters():
    regs = wire_registers("f", 1234.5, "CDAB")
    assert decode_value(regs, "float32", "CDAB") == 1234.5
    assert decode_value(regs, "float32", "ABCD") != 1234.5


@pytest.mark.parametrize("data_type,code,raw", [("int16", "h", -32768), ("uint16", "H", 0xFFFF),
                                                ("int32", "i", -(2**31)), ("uint32", "I", 0xFFFFFFFF)])
def test_not_available_markers_decode_to_none(data_type, code, raw):
    regs = wire_registers(code, raw, "ABCD")
    assert decode_value(regs, data_type) is None
    assert compile_decoder(data_type, "ABCD", 1.0, 0.0, 0)(registers_to_bytes(regs)) is None


@pytest.mark.parametrize("data_type,code", [("float32", "f"), ("float64", "d")])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("order", ORDERS)
def test_non_finite_floats_decode_to_none(data_type, code, bad, order):
    regs = wire_registers(code, bad, order)
    assert decode_value(regs, data_type, order) is None
    assert compile_decoder(data_type, order, 0.1, 5.0, 0)(registers_to_bytes(regs)) is None


def test_wrong_register_count_is_refused():
    with pytest.raises(ValueError, match="float32 needs 2 registers, got 1"):
        decode_value([1], "float32")
