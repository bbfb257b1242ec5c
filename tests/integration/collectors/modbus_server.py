"""A real pymodbus 3.16 server (TCP, RTU-over-TCP or serial) serving device profiles, for the
collector tests and the benchmark: registers encoded with `encode_point` from the profile, one
SimDevice per unit id, with per-unit behaviour switches (answer an exception code) and a
server-side count of every request received (via `trace_pdu`, so requests to invalid addresses
are counted too).

Each register type's block covers its profile's whole address range (zeros in gaps) like a
real device that answers reads through unused registers; `omit` leaves chosen points out so the
device answers exception 02 for them (omit points at the end of a register map).
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.simulator import DataType, SimData, SimDevice

from podwatch.collectors.profiles import ModbusProfile, encode_point


def profile_blocks(profile: ModbusProfile, values: dict[str, float], omit: frozenset[str] = frozenset()):
    """(holding, input) SimData lists with the encoded values."""
    blocks = {}
    for rtype in ("holding", "input"):
        pts = [p for p in profile.points if p.register_type == rtype and p.metric not in omit]
        regs: dict[int, int] = {}
        for p in pts:
            words = encode_point(profile, p, values.get(p.metric, 0.0))
            for i, w in enumerate(words):
                regs[profile.wire_address(p) + i] = w
        for s in profile.static:
            if s.register_type == rtype:
                for i, w in enumerate(s.values):
                    regs[s.address + i] = w
        if not regs:
            blocks[rtype] = [SimData(60000, count=1, values=0, datatype=DataType.REGISTERS)]
            continue
        lo, hi = min(regs), max(regs)  # omitted points at the ends of the map fall outside the block
        blocks[rtype] = [SimData(lo, count=1, values=[regs.get(a, 0) for a in range(lo, hi + 1)],
                                 datatype=DataType.REGISTERS)]
    return blocks["holding"], blocks["input"]


class ProfileServer:
    """Serves {unit_id: (profile, values)} on one TCP port (or serial port)."""

    def __init__(self, units: dict[int, tuple[ModbusProfile, dict[str, float]]], port: int, host: str = "127.0.0.1",
                 framer: FramerType = FramerType.SOCKET, serial_port: str | None = None,
                 omit: dict[int, frozenset[str]] | None = None, baudrate: int = 19200, parity: str = "N"):
        self.units = units
        self.host, self.port = host, port
        self.framer = framer
        self.serial_port = serial_port
        self.omit = omit or {}
        self.baudrate, self.parity = baudrate, parity
        self.behaviour: dict[int, ExcCodes | None] = {}  # unit -> exception to answer
        self.busy_remaining: dict[int, int] = {}  # unit -> answer DEVICE_BUSY this many more times
        self.arrivals: dict[int, list[float]] = {}  # unit -> monotonic time of each request for its first address
        self.first_address: dict[int, int] = {}
        self.requests: Counter = Counter()  # (unit, fc, address) -> requests received
        self.server = None

    def _device(self, unit: int) -> SimDevice:
        profile, values = self.units[unit]
        hr, ir = profile_blocks(profile, values, self.omit.get(unit, frozenset()))
        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        return SimDevice(id=unit, simdata=(bits, list(bits), hr, ir), action=functools.partial(self._action, unit))

    async def _action(self, unit, function_code, start_address, address, count, current_registers, set_values):
        if self.busy_remaining.get(unit, 0) > 0:
            self.busy_remaining[unit] -= 1
            return ExcCodes.DEVICE_BUSY
        return self.behaviour.get(unit)

    def _trace(self, sending: bool, pdu):
        if not sending:
            address = getattr(pdu, "address", None)
            self.requests[(pdu.dev_id, pdu.function_code, address)] += 1
            if address == self.first_address.get(pdu.dev_id, -1):
                self.arrivals.setdefault(pdu.dev_id, []).append(asyncio.get_running_loop().time())
        return pdu

    def requests_to(self, unit: int) -> int:
        return sum(n for (u, _, _), n in self.requests.items() if u == unit)

    async def start(self) -> "ProfileServer":
        from pymodbus.server import ModbusSerialServer, ModbusTcpServer

        from podwatch.collectors.planner import plan_reads

        for u, (profile, _) in self.units.items():
            self.first_address[u] = plan_reads(profile).requests[0].start
        devices = [self._device(u) for u in sorted(self.units)]
        if self.serial_port:
            self.server = ModbusSerialServer(devices, framer=FramerType.RTU, port=self.serial_port,
                                             baudrate=self.baudrate, parity=self.parity, trace_pdu=self._trace)
        else:
            self.server = ModbusTcpServer(devices, address=(self.host, self.port), framer=self.framer,
                                          trace_pdu=self._trace)
        await self.server.serve_forever(background=True)
        return self

    async def set_values(self, unit: int, values: dict[str, float]) -> None:
        profile, old = self.units[unit]
        merged = {**old, **values}
        self.units[unit] = (profile, merged)
        for p in profile.points:
            if p.metric in values:
                fc = 16 if p.register_type == "holding" else 4  # pymodbus: fc4 writes the input block
                await self.server.async_setValues(unit, fc, profile.wire_address(p), encode_point(profile, p, values[p.metric]))

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown()
            self.server = None


class BlackHoleServer:
    """Accepts TCP connections and reads, never answers: a device that times out."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.host, self.port = host, port
        self.server = None
        self.bytes_received = 0
        self._writers = []

    async def _handle(self, reader, writer):
        self._writers.append(writer)
        try:
            while data := await reader.read(4096):
                self.bytes_received += len(data)
        except (ConnectionError, asyncio.CancelledError):
            pass

    async def start(self) -> "BlackHoleServer":
        self.server = await asyncio.start_server(self._handle, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in self._writers:
                w.close()
            await self.server.wait_closed()
            self.server = None
