"""The Modbus read planner: which requests a poll of one device sends, computed once per device.

Per register type (holding = FC3, input = FC4) the profile's points are sorted by wire address
and merged greedily into requests: a point joins the current request when the unused registers
between them are at most `max_gap` and the request stays within `max_registers_per_read`
(protocol maximum 125; some devices and gateways answer only shorter reads). Reading through a
small gap costs a few bytes; an extra request costs a round trip, which on a serial bus or a
busy gateway is the expensive part.

Each planned point keeps its offset inside the request's registers and a compiled decoder, so
the poll loop decodes a response with one `bytes` conversion and a `struct.unpack_from` per
point (see `compile_decoder`); the values are identical to `profiles.decode_point`.

`podwatch collect --plan --site FILE` prints the plan of every device.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from math import isfinite
from operator import add, eq, mul

from podwatch.collectors.profiles import (
    _STRUCT,
    REGISTER_COUNT,
    UNAVAILABLE_RAW,
    ModbusProfile,
    RegisterPoint,
    WordOrder,
)
from podwatch.errors import ConfigError

MODBUS_MAX_REGISTERS_PER_READ = 125
FUNCTION_CODE = {"holding": 3, "input": 4}

Decoder = Callable[[bytes], "float | None"]


def compile_decoder(data_type: str, order: WordOrder, scale: float, offset: float, byte_offset: int) -> Decoder:
    """A function that decodes one point from the big-endian bytes of a whole response.

    `data` is the response's registers packed as big-endian 16-bit words (the wire bytes);
    word and byte order are then undone per point. Same rules as `profiles.decode_value`:
    NaN/inf floats and the 'not available' integer markers decode to None."""
    n_bytes = REGISTER_COUNT[data_type] * 2
    fmt = _STRUCT[data_type]
    is_float = data_type.startswith("float")
    unavailable = UNAVAILABLE_RAW.get(data_type)
    unpack = struct.Struct(fmt).unpack_from
    end = byte_offset + n_bytes
    identity = scale == 1.0 and offset == 0.0

    if order == "ABCD":
        def raw_of(data: bytes):
            return unpack(data, byte_offset)[0]
    else:
        swap_words = order in ("CDAB", "DCBA")
        swap_bytes = order in ("BADC", "DCBA")

        def raw_of(data: bytes):
            chunk = data[byte_offset:end]
            words = [chunk[i:i + 2] for i in range(0, n_bytes, 2)]
            if swap_words:
                words.reverse()
            if swap_bytes:
                words = [w[::-1] for w in words]
            return unpack(b"".join(words), 0)[0]

    isfinite = math.isfinite
    if is_float:
        def decode(data: bytes) -> float | None:
            raw = raw_of(data)
            if not isfinite(raw):
                return None
            return raw if identity else raw * scale + offset
    else:
        def decode(data: bytes) -> float | None:
            raw = raw_of(data)
            if raw == unavailable:
                return None
            return float(raw) if identity else raw * scale + offset
    return decode


@dataclass(frozen=True)
class PlannedPoint:
    """One point inside a request: `register_offset` registers after the request's start."""

    metric: str
    register_offset: int
    register_count: int
    data_type: str
    word_order: str
    decode: Decoder

    def __repr__(self) -> str:  # the decoder is noise in plan output
        return f"PlannedPoint({self.metric} @+{self.register_offset} {self.data_type} {self.word_order})"


@dataclass(frozen=True)
class ReadRequest:
    """One Modbus read: function code 3 or 4, wire start address, register count."""

    register_type: str
    function_code: int
    start: int
    count: int
    points: tuple[PlannedPoint, ...]
    # set by the planner: the compiled decode plan of this request (see RequestDecoder)
    decoder: "RequestDecoder | None" = field(default=None, compare=False, repr=False)

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(p.metric for p in self.points)

    @property
    def gap_registers(self) -> int:
        """Registers read that no point uses (the price of merging)."""
        return self.count - sum(p.register_count for p in self.points)

    def describe(self) -> str:
        return (f"fc{self.function_code} start={self.start} count={self.count} "
                f"points={len(self.points)} ({', '.join(p.metric for p in self.points)})")


@dataclass(frozen=True)
class ReadPlan:
    profile_id: str
    max_registers_per_read: int
    max_gap: int
    requests: tuple[ReadRequest, ...]

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(p.metric for r in self.requests for p in r.points)

    @property
    def registers_read(self) -> int:
        return sum(r.count for r in self.requests)


def plan_reads(profile: ModbusProfile, max_registers_per_read: int | None = None, max_gap: int | None = None) -> ReadPlan:
    """Plan the requests of one poll of a device with this profile.

    `max_registers_per_read` / `max_gap` override the profile's values (per site or device).
    Raises ConfigError when a point cannot fit into one request at all."""
    max_regs = profile.max_registers_per_read if max_registers_per_read is None else max_registers_per_read
    gap = profile.max_gap if max_gap is None else max_gap
    if not 1 <= max_regs <= MODBUS_MAX_REGISTERS_PER_READ:
        raise ConfigError(profile.id, [f"max_registers_per_read: {max_regs} is outside 1..{MODBUS_MAX_REGISTERS_PER_READ}"])
    if gap < 0:
        raise ConfigError(profile.id, [f"max_gap: {gap} must be >= 0"])
    errors: list[str] = []
    requests: list[ReadRequest] = []
    for register_type in ("holding", "input"):
        points = sorted((p for p in profile.points if p.register_type == register_type),
                        key=lambda p: (profile.wire_address(p), p.metric))
        group: list[RegisterPoint] = []
        group_start = group_end = 0  # group_end: one past the last register used
        for p in points:
            start = profile.wire_address(p)
            end = start + p.register_count
            if start < 0 or end > 65536:
                errors.append(f"{p.metric}: wire address {start}..{end - 1} is outside 0..65535 "
                              f"(address {p.address}, address_base {profile.address_base})")
                continue
            if p.register_count > max_regs:
                errors.append(f"{p.metric}: {p.data_type} needs {p.register_count} registers but "
                              f"max_registers_per_read is {max_regs}")
                continue
            if group and start - group_end <= gap and max(end, group_end) - group_start <= max_regs:
                group.append(p)
                group_end = max(group_end, end)
                continue
            if group:
                requests.append(_request(profile, register_type, group_start, group_end, group))
            group, group_start, group_end = [p], start, end
        if group:
            requests.append(_request(profile, register_type, group_start, group_end, group))
    if errors:
        raise ConfigError(f"profile {profile.id}", errors)
    return ReadPlan(profile.id, max_regs, gap, tuple(requests))


def _request(profile: ModbusProfile, register_type: str, start: int, end: int, group: list[RegisterPoint]) -> ReadRequest:
    planned = []
    for p in group:
        off = profile.wire_address(p) - start
        order = profile.order_of(p)
        planned.append(PlannedPoint(p.metric, off, p.register_count, p.data_type, order,
                                    compile_decoder(p.data_type, order, p.scale, p.offset, off * 2)))
    request = ReadRequest(register_type, FUNCTION_CODE[register_type], start, end - start, tuple(planned))
    object.__setattr__(request, "decoder", compile_request_decoder(request, {p.metric: p for p in group}))
    return request


# Hot path: a request's decode plan is compiled once, at plan time (`compile_request_decoder`):
# the registers go to wire bytes through one precompiled `struct.Struct(">{count}H")`, and the
# ABCD (big-endian) points are unpacked by ONE precompiled struct call over the whole response
# (pad bytes skip the gaps). Then, instead of a Python branch per point, the whole request is
# checked at once: the sum of the raw values is finite only when every float is (a NaN or an
# infinity makes the sum NaN/inf; the sum of at most 62 float32 or 31 64-bit values cannot
# overflow), and `map(eq, raw, markers)` finds a 'not available' integer marker in C. A clean
# response (the usual case) is scaled in C by `map(mul, ...)`/`map(add, ...)` (`raw * scale +
# offset`, the same operations as `profiles.decode_value`, so the same bits); a response with a non-finite float or a marker falls
# back to the per-point rules. Other word orders (and overlapping points) use their per-point
# decoder. tests/unit/collectors/test_decode_plan.py checks every profile and random register
# contents against `profiles.decode_point`.


class RequestDecoder:
    """The compiled decode plan of one request: `to_bytes(*registers)` packs a response's
    registers into wire bytes; `decode_into(data, into)` writes every point's value (or None)
    into `into` and returns how many points decoded to None."""

    __slots__ = ("to_bytes", "_metrics", "_scales", "_offsets", "_markers", "_identity", "_unpack_from",
                 "_fast", "_slow")

    def __init__(self, request: "ReadRequest", by_metric: dict[str, RegisterPoint]):
        self.to_bytes = struct.Struct(f">{request.count}H").pack
        fmt = [">"]
        pos = 0
        fast: list[tuple[str, bool, int | None, float, float, bool]] = []
        slow: list[PlannedPoint] = []
        for p in sorted(request.points, key=lambda q: q.register_offset):
            if p.word_order != "ABCD" or p.register_offset * 2 < pos:  # other order or overlapping point
                slow.append(p)
                continue
            gap = p.register_offset * 2 - pos
            if gap:
                fmt.append(f"{gap}x")
            fmt.append(_STRUCT[p.data_type][1])
            pos = (p.register_offset + p.register_count) * 2
            rp = by_metric[p.metric]
            fast.append((p.metric, p.data_type.startswith("float"), UNAVAILABLE_RAW.get(p.data_type),
                         rp.scale, rp.offset, rp.scale == 1.0 and rp.offset == 0.0))
        self._fast = tuple(fast)
        self._slow = tuple(slow)
        self._metrics = tuple(f[0] for f in fast)
        self._markers = tuple(f[2] for f in fast) if any(f[2] is not None for f in fast) else None
        self._scales = tuple(f[3] for f in fast)
        self._offsets = tuple(f[4] for f in fast) if any(f[4] != 0.0 for f in fast) else None
        self._identity = all(f[5] for f in fast)
        self._unpack_from = struct.Struct("".join(fmt)).unpack_from

    def decode_into(self, data: bytes, into: dict) -> int:
        nones = 0
        if self._metrics:
            raw = self._unpack_from(data, 0)
            markers = self._markers
            if isfinite(sum(raw)) and (markers is None or not any(map(eq, raw, markers))):
                if self._identity:
                    into.update(zip(self._metrics, map(float, raw)))
                elif self._offsets is None:  # raw * scale (+ 0.0: the same value), in C
                    into.update(zip(self._metrics, map(mul, raw, self._scales)))
                else:  # raw * scale + offset, in C (no fused multiply-add: bit-identical to the reference)
                    into.update(zip(self._metrics, map(add, map(mul, raw, self._scales), self._offsets)))
            else:  # a non-finite float or a 'not available' marker: the per-point rules
                for (metric, is_float, unavailable, scale, offset, identity), r in zip(self._fast, raw):
                    if (not isfinite(r)) if is_float else (r == unavailable):
                        into[metric] = None
                        nones += 1
                    else:
                        into[metric] = float(r) if identity else r * scale + offset
        for p in self._slow:
            value = into[p.metric] = p.decode(data)
            if value is None:
                nones += 1
        return nones


def compile_request_decoder(request: "ReadRequest", by_metric: dict[str, RegisterPoint]) -> RequestDecoder:
    return RequestDecoder(request, by_metric)


def registers_to_bytes(registers: list[int]) -> bytes:
    """Registers of a response -> their big-endian wire bytes (input of the compiled decoders)."""
    return struct.pack(f">{len(registers)}H", *registers)


def response_bytes(request: ReadRequest, registers: list[int]) -> bytes:
    """A response's registers as wire bytes; ValueError when the device answered too few registers
    (extra registers are ignored)."""
    n = len(registers)
    if n != request.count:
        if n < request.count:
            raise ValueError(f"fc{request.function_code} start={request.start}: expected {request.count} registers, "
                             f"got {n}")
        registers = registers[:request.count]
    if request.decoder is not None:
        return request.decoder.to_bytes(*registers)
    return registers_to_bytes(registers)


def decode_request(request: ReadRequest, registers: list[int], into: dict[str, float | None]) -> int:
    """Decode every point of one request's response into `into` (metric -> value or None); returns
    how many points decoded to None."""
    data = response_bytes(request, registers)
    if request.decoder is not None:
        return request.decoder.decode_into(data, into)
    nones = 0
    for p in request.points:
        value = into[p.metric] = p.decode(data)
        nones += value is None
    return nones
