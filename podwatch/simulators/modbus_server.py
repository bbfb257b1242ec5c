"""Modbus device servers: one pymodbus 3.16 server per host:port (a gateway serves several unit
ids on one port), one `SimDevice` per unit id, registers laid out from the device profile.

Layout: for each register table (holding = FC3, input = FC4) of a profile, one contiguous block from
the lowest to the highest wire address the profile uses (points and `static` registers), so a
collector's merged read across small gaps is answered (gaps read 0); an address outside the block
is answered with exception 2 (illegal data address), as a real device does. A profile without
input registers still gets a one-register input block (pymodbus needs every table non-empty).
Values are encoded with `podwatch.collectors.profiles.encode_point` — the same code the collectors
decode with — and written with `server.async_setValues` on every update.

Faults (set by the simulator from the scenario):
* `exception_units[unit] = code`: the device's action hook answers every request with that
  Modbus exception (0x0B = gateway target device failed to respond, 0x06 busy, ...).
* `silent_units`: requests to that unit are dropped on arrival (a receive-side `trace_pdu` hook
  returns None), so clients time out, as with a dead device behind a gateway.
* A unit id no device has: a TCP gateway answers 0x0B; on RTU framings the request goes unanswered.

Read limits from the site file (a device's or its gateway's `max_registers_per_read` / `max_gap`,
the device's `Device.max_registers_per_read` / `max_gap`) are enforced as real hardware does: a
longer read is answered with exception 03 (illegal data value), a read spanning more than `max_gap`
unused registers with exception 02 (illegal data address). Without limits every read inside the
block is answered. `largest_read[unit]` records the longest read each unit was asked for.

Framing: `modbus-tcp` uses the MBAP socket framer; `modbus-rtu-over-tcp` serves RTU frames (with
CRC) over a TCP socket, like a serial gateway in transparent mode. `serve_serial()` serves the same
devices on a serial port or pty (RTU framer), e.g. one end of a `socat` pty pair.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import partial

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from podwatch.collectors.profiles import ModbusProfile, encode_point
from podwatch.site import Device

log = logging.getLogger(__name__)
FC_FOR_TABLE = {"holding": 3, "input": 4}


@dataclass
class RegisterBlock:
    table: str  # holding | input
    start: int
    template: list[int]  # static registers filled in, the rest 0


@dataclass
class DeviceRegisters:
    """The register image of one device, built from its profile."""

    device: Device
    profile: ModbusProfile
    blocks: dict[str, RegisterBlock] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spans: dict[str, list[int]] = {}
        for p in self.profile.points:
            a = self.profile.wire_address(p)
            spans.setdefault(p.register_type, []).extend([a, a + p.register_count - 1])
        for s in self.profile.static:
            spans.setdefault(s.register_type, []).extend([s.address, s.address + len(s.values) - 1])
        for table, addrs in spans.items():
            lo, hi = min(addrs), max(addrs)
            self.blocks[table] = RegisterBlock(table, lo, [0] * (hi - lo + 1))
        for s in self.profile.static:
            b = self.blocks[s.register_type]
            b.template[s.address - b.start:s.address - b.start + len(s.values)] = [v & 0xFFFF for v in s.values]
        self._slots = [(p, self.blocks[p.register_type], self.profile.wire_address(p) - self.blocks[p.register_type].start)
                       for p in self.profile.points]
        used: dict[str, set[int]] = {}
        for p in self.profile.points:
            a = self.profile.wire_address(p)
            used.setdefault(p.register_type, set()).update(range(a, a + p.register_count))
        for st in self.profile.static:
            used.setdefault(st.register_type, set()).update(range(st.address, st.address + len(st.values)))
        self.used = used  # table -> wire addresses the profile defines (the rest of a block is a gap)

    def longest_gap(self, table: str, address: int, count: int) -> int:
        """Longest run of registers the profile does not define inside a read of `count` from `address`."""
        used = self.used.get(table, set())
        longest = run = 0
        for a in range(address, address + count):
            run = 0 if a in used else run + 1
            longest = max(longest, run)
        return longest

    def simdata(self) -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
        def table(name: str) -> list[SimData]:
            b = self.blocks.get(name)
            if b is None:
                return [SimData(0, count=1, values=0, datatype=DataType.REGISTERS)]
            return [SimData(b.start, values=list(b.template), datatype=DataType.REGISTERS)]

        bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
        return bits, list(bits), table("holding"), table("input")

    def encode(self, points: dict[str, float]) -> dict[str, list[int]]:
        """table -> full block of registers for these values (missing/NaN values -> the data type's
        'not available' marker: NaN for floats, 0x8000/0xFFFF for integers)."""
        images = {t: list(b.template) for t, b in self.blocks.items()}
        for p, block, offset in self._slots:
            value = points.get(p.metric, math.nan)
            regs = encode_point(self.profile, p, value)
            images[block.table][offset:offset + len(regs)] = regs
        return images


class ModbusEndpoint:
    """One listening Modbus server (TCP or RTU-over-TCP) with its devices by unit id."""

    def __init__(self, host: str, port: int, devices: list[DeviceRegisters], framing: str = "modbus-tcp") -> None:
        self.host, self.port, self.framing = host, port, framing
        self.devices = {d.device.unit_id: d for d in devices}
        self.exception_units: dict[int, int] = {}
        self.silent_units: set[int] = set()
        self.requests = 0
        self.largest_read: dict[int, int] = {}  # unit -> longest read (registers) it was asked for
        self.display: str | None = None  # serial: the port path the collector opens (the pty link)
        self.server: ModbusTcpServer | None = None
        self._writing = False  # our own async_setValues also passes the action hook: never fault it

    @property
    def address(self) -> str:
        if self.framing == "modbus-rtu":
            return self.display or self.host  # a serial port path
        return f"{self.host}:{self.port}"

    async def _action(self, unit: int, function_code, start_address, address, count, current_registers, set_values):
        """SimDevice action hook: called on every access; answers with an exception when faulted."""
        if self._writing:
            return None
        self.requests += 1
        code = self.exception_units.get(unit)
        if code is not None:
            try:
                return ExcCodes(code)
            except ValueError:
                return ExcCodes.GATEWAY_NO_RESPONSE
        regs = self.devices.get(unit)
        if regs is None or set_values is not None:
            return None
        self.largest_read[unit] = max(self.largest_read.get(unit, 0), count)
        dev = regs.device
        if dev.max_registers_per_read is not None and count > dev.max_registers_per_read:
            return ExcCodes.ILLEGAL_VALUE  # what a gateway that forwards at most N registers answers
        if dev.max_gap is not None:
            table = "holding" if function_code == 3 else "input"
            if regs.longest_gap(table, address, count) > dev.max_gap:
                return ExcCodes.ILLEGAL_ADDRESS  # a device that refuses to read registers it does not define
        return None

    def _trace_pdu(self, sending: bool, pdu):
        """Drop requests to silent units on arrival: no response, the client times out. On RTU
        framings (a serial bus) a unit id nobody has is silent too, as on a real RS-485 line."""
        if not sending and pdu is not None:
            unit = getattr(pdu, "dev_id", None)
            if unit in self.silent_units or (self.framing != "modbus-tcp" and unit not in self.devices):
                return None
        return pdu

    async def _unknown_unit(self, *args):
        return ExcCodes.GATEWAY_NO_RESPONSE

    def sim_devices(self) -> list[SimDevice]:
        devices = [SimDevice(id=unit, simdata=regs.simdata(), action=partial(self._action, unit))
                   for unit, regs in sorted(self.devices.items())]
        if self.framing == "modbus-tcp" and 0 not in self.devices:
            # a TCP gateway answers a unit id it does not have with 0x0B (target device failed to
            # respond), for any address: pymodbus routes unknown ids to device 0
            everything = [SimData(0, count=65536, values=0, datatype=DataType.REGISTERS)]
            bits = [SimData(0, count=16, values=False, datatype=DataType.BITS)]
            devices.append(SimDevice(id=0, simdata=(bits, list(bits), everything, list(everything)),
                                     action=self._unknown_unit))
        return devices

    async def start(self) -> None:
        framer = FramerType.RTU if self.framing == "modbus-rtu-over-tcp" else FramerType.SOCKET
        self.server = ModbusTcpServer(self.sim_devices(), address=(self.host, self.port), framer=framer,
                                      trace_pdu=self._trace_pdu)
        try:
            await self.server.serve_forever(background=True)
        except (OSError, RuntimeError) as exc:
            self.server = None
            from podwatch.errors import PodwatchError

            raise PodwatchError(f"cannot serve Modbus on {self.address}: {exc} (port in use? try --port-offset)") from None

    async def update(self, points_by_device: dict[str, dict[str, float]]) -> None:
        """Write every device's current values into the served registers."""
        if self.server is None:
            return
        for unit, regs in self.devices.items():
            points = points_by_device.get(regs.device.id)
            if points is None:
                continue
            for table, image in regs.encode(points).items():
                self._writing = True
                try:
                    await self.server.async_setValues(unit, 16 if table == "holding" else 4, regs.blocks[table].start,
                                                      image)
                finally:
                    self._writing = False

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await server.shutdown()


async def serve_serial(port: str, devices: list[DeviceRegisters], baudrate: int = 19200, parity: str = "N",
                       stopbits: int = 1, bytesize: int = 8) -> tuple[ModbusSerialServer, ModbusEndpoint]:
    """Serve `devices` as Modbus RTU on a serial port or pty path; returns (server, endpoint).
    Update values with `endpoint.update(...)`; stop with `await server.shutdown()`."""
    endpoint = ModbusEndpoint(port, 0, devices, framing="modbus-rtu")
    server = ModbusSerialServer(endpoint.sim_devices(), framer=FramerType.RTU, port=port, baudrate=baudrate,
                                parity=parity, stopbits=stopbits, bytesize=bytesize, trace_pdu=endpoint._trace_pdu)
    await server.serve_forever(background=True)
    endpoint.server = server  # update() writes through the same async_setValues
    return server, endpoint
