"""The Modbus collector: polls every Modbus device of a site on its interval and hands one
`Reading` per device per interval to a sink.

Owns: connections (one pymodbus async client per endpoint — gateway host:port, device
host:port or serial port — shared by the endpoint's unit ids under one lock), the per-device
poll schedule, error classification and back-off, decoding through the read plan
(`planner.py`), quality flags and per-device sequence numbers.

Lifecycle: `ModbusCollector(site, sink, settings)`; `await run(stop_event)` polls until the
event is set, then closes its connections; `poll_once(device_id)` runs one poll (tests,
benchmark). `close()` is idempotent.

Contract with the sink (`podwatch.stream.producer.TelemetryProducer` or any object with
`async send(reading)`): `send` returns once the reading is durable (Kafka or spool). A sink with
`submit(reading) -> Future` (the producer) gets readings pipelined, at most `max_unacked_readings`
per device not yet durable, so a Kafka stall does not stop polling; a sink with only `send` is
awaited before the next poll. Either way a slow sink shows up as overruns, never as an unbounded
queue.

Error classes (docs/collectors.md has the full table):
- exception 06 (busy): retried after a short delay, at most `busy_retries` times in the poll;
- exceptions 01/02/03 (illegal function/address/value): configuration error — logged once at
  ERROR, the request is disabled (its points are reported bad), never sent again;
- exceptions 04/0A/0B, no response (timeout): the device is bad for this poll and its next
  attempts back off exponentially (interval x 2^k, capped), so a dead unit on a shared gateway
  costs at most one timeout per back-off period;
- connection lost/refused: the endpoint reconnects with jittered exponential back-off; polls of
  its devices meanwhile fail fast (bad readings, no waiting).
Every scheduled tick emits exactly one reading: good/stale when polled, bad (all points null)
when the poll failed or was skipped by back-off. Values are never invented.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field
from pymodbus.exceptions import ConnectionException, ModbusIOException

from podwatch.collectors.planner import ReadPlan, ReadRequest, plan_reads, response_bytes
from podwatch.collectors.profiles import ModbusProfile, available_profiles
from podwatch.errors import ConfigError
from podwatch.clock import Clock, WallClock
from podwatch.health import REGISTRY, ComponentHealth
from podwatch.logs import fields
from podwatch.samples import Quality, Reading
from podwatch.site import Device, Site

log = logging.getLogger(__name__)

STATE_CODES = {"healthy": 0, "stale": 1, "bad": 2}


class ReadingSink(Protocol):
    """Where collectors put readings (implemented by `podwatch.stream.producer.TelemetryProducer`,
    which also offers `submit(reading) -> Future`: see the module docstring)."""

    async def send(self, reading: Reading) -> bool | None:
        """Returns once durable; False means the sink dropped it (counted there)."""

    async def send_dead_letter(self, payload: bytes, reason: str, source: str, **meta) -> bool | None: ...


class ModbusSettings(BaseModel):
    """Collector-wide Modbus settings (defaults suit a site of TCP gateways polled every second)."""

    model_config = ConfigDict(extra="forbid")

    max_registers_per_read: int | None = Field(None, ge=1, le=125, description="Override every profile's maximum")
    max_gap: int | None = Field(None, ge=0, description="Override every profile's maximum gap read through")
    busy_retries: int = Field(2, ge=0, description="Retries of a request answered with exception 06 (busy)")
    busy_retry_delay_s: float = Field(0.02, ge=0, description="Delay before a busy retry (x attempt number)")
    backoff_max_s: float = Field(30.0, gt=0, description="Longest back-off of a failing device")
    reconnect_min_s: float = Field(0.2, gt=0, description="First reconnect delay of an endpoint")
    reconnect_max_s: float = Field(30.0, gt=0, description="Longest reconnect delay of an endpoint")
    stale_after_polls: int = Field(10, ge=0, description="A raw answer repeated bit-identically this many times in a row makes the reading stale (0: off)")
    stagger: bool = Field(True, description="Spread device start times over their interval")
    max_unacked_readings: int = Field(64, ge=1, description="Readings of one device handed to the producer and "
                                      "not yet durable before its polls wait (a Kafka stall is only an outage "
                                      "after the producer's delivery timeout; polling goes on meanwhile)")


# --------------------------------------------------------------------------- errors


class ModbusReadError(Exception):
    """A classified read failure. `kind`: busy | illegal | device_failure | gateway | timeout | connection."""

    def __init__(self, kind: str, message: str, code: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.code = code


EXCEPTION_KIND = {1: "illegal", 2: "illegal", 3: "illegal", 4: "device_failure", 5: "busy", 6: "busy",
                  8: "device_failure", 10: "gateway", 11: "gateway"}
EXCEPTION_NAME = {1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "device failure",
                  5: "acknowledge (busy)", 6: "device busy", 8: "memory parity error", 10: "gateway path unavailable",
                  11: "gateway target failed to respond"}


def classify_exception_code(code: int) -> str:
    return EXCEPTION_KIND.get(code, "device_failure")


def response_error(rr) -> ModbusReadError:
    """The ModbusReadError of an exception response (`rr.isError()`)."""
    code = int(getattr(rr, "exception_code", 4))
    return ModbusReadError(classify_exception_code(code), f"exception {code:02X} ({EXCEPTION_NAME.get(code, 'unknown')})",
                           code)


# what a pymodbus request raises besides an exception response (Endpoint.classify sorts them out)
REQUEST_ERRORS = (ConnectionException, ModbusIOException, OSError, asyncio.TimeoutError)


# --------------------------------------------------------------------------- connections


def _set_done(future: asyncio.Future) -> None:
    """Timer callback of a poll loop's wait for its tick (the loop may have been cancelled)."""
    if not future.done():
        future.set_result(None)


def _jitter(delay_s: float) -> float:
    """+-20 % so that many collectors/endpoints never retry in lock step."""
    return delay_s * random.uniform(0.8, 1.2)


class Endpoint:
    """One connection (TCP, RTU-over-TCP or serial) shared by every unit id behind it.

    pymodbus 3.16 serialises requests per client (one transaction in flight). Our lock guards
    (re)connecting, and — only when the devices behind the endpoint have different timeouts —
    each request, because the per-request timeout is set on the shared client."""

    def __init__(self, key: str, device: Device, settings: ModbusSettings, health: ComponentHealth):
        self.key = key
        self.protocol = device.protocol
        self.host, self.port, self.serial = device.host, device.port, device.serial
        self.settings = settings
        self.health = health
        self.lock = asyncio.Lock()
        self.client = None
        self.failures = 0  # consecutive failed connects
        self.next_connect_at = 0.0
        self.down_logged = False
        self.requests_sent = 0
        self.timeouts: set[float] = set()  # per-request timeouts of the devices behind this endpoint

    def _new_client(self, timeout_s: float):
        from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
        from pymodbus.framer import FramerType

        if self.protocol == "modbus-rtu":
            s = self.serial
            client = AsyncModbusSerialClient(s.port, framer=FramerType.RTU, baudrate=s.baudrate, bytesize=s.bytesize,
                                             parity=s.parity, stopbits=s.stopbits, timeout=timeout_s, retries=0,
                                             reconnect_delay=0)
        else:
            framer = FramerType.RTU if self.protocol == "modbus-rtu-over-tcp" else FramerType.SOCKET
            client = AsyncModbusTcpClient(self.host, port=self.port, framer=framer, timeout=timeout_s, retries=0,
                                          reconnect_delay=0)  # 0: we reconnect ourselves, with jittered back-off
        # pymodbus closes a TCP connection after retries+3 unanswered requests; on a shared gateway
        # a dead unit must not cost its healthy neighbours their connection.
        client.set_max_no_responses(1_000_000)
        return client

    async def _ensure_connected(self, timeout_s: float) -> None:
        if self.client is not None and self.client.connected:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self.next_connect_at:
            raise ModbusReadError("connection", f"{self.key} is down; next reconnect in "
                                                f"{self.next_connect_at - loop.time():.1f} s")
        if self.client is not None:
            self.client.close()
        self.client = self._new_client(timeout_s)
        self.client.comm_params.timeout_connect = max(timeout_s, 0.05)
        try:
            ok = await asyncio.wait_for(self.client.connect(), timeout=max(timeout_s, 0.05) + 0.5)
        except (asyncio.TimeoutError, OSError) as exc:
            ok, err = False, exc
        except Exception as exc:  # noqa: BLE001 - a serial port raises termios.error / ValueError on bad settings
            ok, err = False, exc   # (e.g. a pty refusing even parity): a failed connect, never a dead poll task
        else:
            err = None
        if not ok:
            self.failures += 1
            delay = _jitter(min(self.settings.reconnect_min_s * 2 ** (self.failures - 1), self.settings.reconnect_max_s))
            self.next_connect_at = loop.time() + delay
            self.health.inc("retries")
            if not self.down_logged:
                log.warning("Cannot connect to Modbus endpoint; retrying with back-off",
                            extra=fields(endpoint=self.key, error=err or "connect failed", retry_in_s=round(delay, 2)))
                self.down_logged = True
            raise ModbusReadError("connection", f"cannot connect to {self.key}" + (f": {err!r}" if err else ""))
        if len(self.timeouts) == 1:
            self.client.comm_params.timeout_connect = next(iter(self.timeouts))
        if self.down_logged:
            log.info("Modbus endpoint reconnected", extra=fields(endpoint=self.key, failed_attempts=self.failures))
        self.failures = 0
        self.down_logged = False

    def request(self, function_code: int, start: int, count: int, unit_id: int, timeout_s: float) -> Awaitable:
        """The awaitable response of one read (a pymodbus PDU, maybe an exception response).

        Hot path: on a connected endpoint whose devices share one timeout this is pymodbus' own
        coroutine, so no frame of ours sits between the poll and pymodbus (every frame in the
        chain is resumed at each wake-up of the request). Otherwise a coroutine that reconnects
        under the lock and, when the devices' timeouts differ, sets this device's timeout under
        the lock. Raises ModbusReadError (endpoint down) or one of REQUEST_ERRORS (`classify`)."""
        client = self.client
        if client is not None and len(self.timeouts) == 1 and client.connected:
            # every device here has the same timeout (the usual gateway case): pymodbus already
            # serialises the client's requests, so no second lock on the hot path
            self.requests_sent += 1
            if function_code == 3:
                return client.read_holding_registers(start, count=count, device_id=unit_id)
            return client.read_input_registers(start, count=count, device_id=unit_id)
        return self._request_locked(function_code, start, count, unit_id, timeout_s)

    async def _request_locked(self, function_code: int, start: int, count: int, unit_id: int, timeout_s: float):
        client = self.client
        if client is None or not client.connected:
            async with self.lock:
                await self._ensure_connected(timeout_s)
            client = self.client
        self.requests_sent += 1
        read = client.read_holding_registers if function_code == 3 else client.read_input_registers
        if len(self.timeouts) == 1:
            return await read(start, count=count, device_id=unit_id)
        async with self.lock:  # one client, devices with their own timeouts: set it per request
            client.comm_params.timeout_connect = timeout_s
            return await read(start, count=count, device_id=unit_id)

    def classify(self, exc: BaseException, unit_id: int, timeout_s: float) -> ModbusReadError:
        """A request's exception (one of REQUEST_ERRORS) as a ModbusReadError; a lost connection
        is closed here so that the next request reconnects with back-off."""
        client = self.client
        if isinstance(exc, ModbusIOException):
            if client is not None and client.connected:
                return ModbusReadError("timeout", f"unit {unit_id} did not answer within {timeout_s:g} s")
            message = f"{self.key}: connection lost"
        else:
            message = f"{self.key}: {exc}"
        if client is not None:  # (None: another request on this endpoint already saw it go)
            self._lost(exc)
        return ModbusReadError("connection", message)

    async def read(self, function_code: int, start: int, count: int, unit_id: int, timeout_s: float) -> list[int]:
        """One read; returns the registers or raises a classified ModbusReadError."""
        try:
            rr = await self.request(function_code, start, count, unit_id, timeout_s)
        except REQUEST_ERRORS as exc:
            raise self.classify(exc, unit_id, timeout_s) from None
        if rr.isError():
            raise response_error(rr)
        return rr.registers

    def _lost(self, exc: BaseException) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None
        self.failures += 1
        self.next_connect_at = asyncio.get_running_loop().time() + _jitter(self.settings.reconnect_min_s)
        if not self.down_logged:
            log.warning("Modbus connection lost; reconnecting", extra=fields(endpoint=self.key, error=exc))
            self.down_logged = True

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


# --------------------------------------------------------------------------- sequences


class SequenceSource:
    """Per-device sequence numbers that never repeat across restarts.

    Every device starts at the collector's start time in microseconds since the epoch and counts
    up by one per reading. A restarted collector starts above anything the previous run sent as
    long as it emitted fewer than one reading per microsecond per device (true by 3+ orders of
    magnitude) and the wall clock did not step back; no state file is needed. The sink drops
    duplicates by (device, seq), so a reused number would lose data — hence the time base."""

    def __init__(self, start: int | None = None):
        self.start = time.time_ns() // 1000 if start is None else start
        self._next: dict[str, int] = {}

    def next(self, device_id: str) -> int:
        seq = self._next.get(device_id, self.start)
        self._next[device_id] = seq + 1
        return seq


# --------------------------------------------------------------------------- device state


@dataclass(slots=True)
class DeviceState:
    device: Device
    plan: ReadPlan
    endpoint: Endpoint
    health: ComponentHealth  # per-device gauge `state`
    disabled: set[int] = field(default_factory=set)  # indexes of requests disabled by a config error
    failures: int = 0
    next_attempt_at: float = 0.0
    last_error: str | None = None
    last_raw: bytes | tuple | None = None  # wire bytes of the last good poll (one request) or a tuple of them
    unchanged_polls: int = 0
    state: str = "healthy"
    sleeping: bool = False  # waiting for its next tick (safe to cancel at stop)
    unacked: deque = field(default_factory=deque)  # submitted readings not yet known durable, oldest first


class ModbusCollector:
    """Polls the Modbus devices of a site into a sink. See the module docstring."""

    component = "modbus_collector"

    def __init__(self, site: Site, sink: ReadingSink, settings: ModbusSettings | None = None,
                 devices: Iterable[Device] | None = None, sequences: SequenceSource | None = None,
                 clock: Clock | None = None):
        self.site = site
        self.sink = sink
        self.settings = settings or ModbusSettings()
        # Timestamps and intervals come from the clock: wall time in production, the simulator's
        # scaled time in accelerated runs (a 1 s interval at speed 10 is 0.1 s of wall time).
        self.clock = clock or WallClock()
        self.sequences = sequences or SequenceSource()
        self.health = REGISTRY.component(self.component, site.id)
        self._counters = self.health.counters  # the hot path increments these directly
        for name in ("received", "sent", "errors", "dropped", "retries", "overruns", "late_ticks"):
            self._counters.setdefault(name, 0)
        self._closed = False
        profiles = available_profiles(site.profiles_dir)
        gateways = {g.id: g for g in site.spec.gateways}
        chosen = [d for d in (site.devices if devices is None else devices)
                  if d.protocol != "mqtt" and d.enabled]
        self.endpoints: dict[str, Endpoint] = {}
        self.devices: dict[str, DeviceState] = {}
        plans: dict[str, ReadPlan] = {}
        errors: list[str] = []
        for d in chosen:
            profile = profiles.get(d.profile)
            if not isinstance(profile, ModbusProfile):
                errors.append(f"{d.path}.profile: '{d.profile}' is not a Modbus profile")
                continue
            profile = installed_points(profile, site, d)
            key = (d.profile, *read_limits(profile, self.settings, d), len(profile.points))
            if key not in plans:
                try:
                    plans[key] = plan_reads(profile, key[1], key[2])
                except ConfigError as exc:
                    errors.extend(f"{d.path}: {e}" for e in exc.errors)
                    continue
            ep = self.endpoints.get(d.endpoint)
            if ep is None:
                ep = self.endpoints[d.endpoint] = Endpoint(d.endpoint, d, self.settings, self.health)
            ep.timeouts.add(d.timeout_s)
            if d.gateway and d.gateway in gateways and gateways[d.gateway].max_concurrent > 1:
                log.debug("pymodbus serialises requests per connection; max_concurrent > 1 has no effect",
                          extra=fields(gateway=d.gateway))
            self.devices[d.id] = DeviceState(d, plans[key], ep, REGISTRY.component("modbus_device", d.id))
        if errors:
            raise ConfigError(f"site {site.id}", errors)
        self._state_counts = dict.fromkeys(STATE_CODES, 0)
        self._state_counts["healthy"] = len(self.devices)
        for state, n in self._state_counts.items():
            self.health.set(f"devices_{state}", n)
        for st in self.devices.values():
            st.health.set("state", STATE_CODES[st.state])

    # ------------------------------------------------------------------ polling

    def plan_of(self, device_id: str) -> ReadPlan:
        return self.devices[device_id].plan

    async def poll_once(self, device_id: str) -> Reading:
        """Poll one device now and return its reading (does not send it)."""
        return await self._poll(self.devices[device_id])

    async def _poll(self, st: DeviceState) -> Reading:
        # Hot path (benchmarks/collect_modbus.py): per request one awaited read, one precompiled
        # decode (planner.RequestDecoder) that also counts the points that decoded to None, so a
        # clean poll never walks its points in Python; the stale check compares wire bytes.
        ts_ms = self.clock.now_ms()
        dev = st.device
        values: dict[str, float | None] = {}
        nones = 0
        raw_parts: list[bytes] = []
        endpoint = st.endpoint
        disabled = st.disabled
        for index, req in enumerate(st.plan.requests):
            if disabled and index in disabled:
                values.update(dict.fromkeys(req.metrics))
                continue
            try:
                rr = await endpoint.request(req.function_code, req.start, req.count, dev.unit_id, dev.timeout_s)
            except ModbusReadError as exc:  # the endpoint is down (reconnect back-off)
                failure = exc
            except REQUEST_ERRORS as exc:
                failure = endpoint.classify(exc, dev.unit_id, dev.timeout_s)
            else:
                failure = response_error(rr) if rr.isError() else None
            if failure is None:
                registers = rr.registers
            else:
                if failure.kind == "busy":
                    try:
                        registers = await self._retry_busy(st, req, failure)
                        failure = None
                    except ModbusReadError as again:
                        failure = again
                if failure is not None:
                    if failure.kind == "illegal":
                        self._disable_request(st, index, req, failure)
                        values.update(dict.fromkeys(req.metrics))
                        continue
                    return self._failed(st, failure, ts_ms)
            decoder = req.decoder
            if len(registers) == req.count:
                data = decoder.to_bytes(*registers)
            else:
                try:
                    data = response_bytes(req, registers)
                except ValueError as exc:  # the device answered with too few registers
                    return self._failed(st, ModbusReadError("device_failure", str(exc)), ts_ms)
            nones += decoder.decode_into(data, values)
            raw_parts.append(data)
        if not raw_parts:
            self._failed(st, ModbusReadError("illegal", "every request of the plan is disabled (configuration error)"),
                         ts_ms, count_error=False)
            return self._bad_reading(st, ts_ms)
        # a point without a value (disabled request, NaN, 'not available' marker) is bad on its own
        point_quality = {m: Quality.BAD for m, v in values.items() if v is None} if nones or disabled else {}
        raw = raw_parts[0] if len(raw_parts) == 1 else tuple(raw_parts)
        if raw == st.last_raw:
            st.unchanged_polls += 1
        else:
            st.unchanged_polls = 0
            st.last_raw = raw
        stale_after = self.settings.stale_after_polls
        if stale_after and st.unchanged_polls >= stale_after:
            quality = Quality.STALE
            state = "stale"
        else:
            quality = Quality.GOOD
            state = "bad" if disabled else "healthy"
        if st.failures:
            log.info("Modbus device recovered", extra=fields(device=dev.id, failed_polls=st.failures, last_error=st.last_error))
            st.failures = 0
            st.last_error = None
            st.next_attempt_at = 0.0
        if st.state != state:
            self._set_state(st, state)
        self._counters["received"] += 1
        return Reading(self.site.id, dev.id, self.sequences.next(dev.id), ts_ms, values, quality, point_quality)

    async def _retry_busy(self, st: DeviceState, req: ReadRequest, exc: ModbusReadError) -> list[int]:
        """A request answered 'busy' (exception 05/06): wait and retry, at most `busy_retries` times;
        raises the last error."""
        dev = st.device
        attempt = 0
        while attempt < self.settings.busy_retries:
            attempt += 1
            self._counters["retries"] += 1
            await asyncio.sleep(self.settings.busy_retry_delay_s * attempt)
            try:
                return await st.endpoint.read(req.function_code, req.start, req.count, dev.unit_id, dev.timeout_s)
            except ModbusReadError as again:
                if again.kind != "busy":
                    raise
                exc = again
        raise exc

    def _disable_request(self, st: DeviceState, index: int, req: ReadRequest, exc: ModbusReadError) -> None:
        st.disabled.add(index)
        self.health.inc("errors")
        log.error("Modbus configuration error: the device rejects this read; it will not be sent again "
                  "(fix the profile or the unit id and restart)",
                  extra=fields(device=st.device.id, profile=st.device.profile, unit_id=st.device.unit_id,
                               request=req.describe(), error=exc))
        self._set_state(st, "bad")

    def _failed(self, st: DeviceState, exc: ModbusReadError, ts_ms: int, count_error: bool = True) -> Reading:
        st.failures += 1
        st.last_error = f"{exc.kind}: {exc}"
        if count_error:
            self.health.inc("errors")
        dev = st.device
        if exc.kind != "connection":  # the endpoint backs off connects itself
            interval = self.clock.to_wall_seconds(dev.poll_interval_s)
            delay = min(interval * 2 ** (st.failures - 1), max(self.settings.backoff_max_s, interval))
            st.next_attempt_at = asyncio.get_running_loop().time() + _jitter(delay) if st.failures > 1 else 0.0
        if st.failures == 1 and exc.kind != "connection":  # a lost connection is logged once by its endpoint
            log.warning("Modbus poll failed; repeats are logged at debug level until the device recovers",
                        extra=fields(device=dev.id, endpoint=st.endpoint.key, unit_id=dev.unit_id, kind=exc.kind, error=exc))
        else:
            log.debug("Modbus poll failed again", extra=fields(device=dev.id, kind=exc.kind, failures=st.failures))
        self._set_state(st, "bad")
        return self._bad_reading(st, ts_ms)

    def _bad_reading(self, st: DeviceState, ts_ms: int) -> Reading:
        points = dict.fromkeys(st.plan.metrics)
        return Reading(self.site.id, st.device.id, self.sequences.next(st.device.id), ts_ms, points, Quality.BAD)

    def _set_state(self, st: DeviceState, state: str) -> None:
        """Only on a change: the per-device gauge and the collector's devices_<state> counts
        (kept incrementally: a gateway going down changes every device behind it)."""
        old = st.state
        if old == state:
            return
        st.state = state
        counts = self._state_counts
        counts[old] -= 1
        counts[state] += 1
        self.health.set(f"devices_{old}", counts[old])
        self.health.set(f"devices_{state}", counts[state])
        st.health.set("state", STATE_CODES[state])

    # ------------------------------------------------------------------ schedule

    async def _device_loop(self, st: DeviceState, first_at: float, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        interval = self.clock.to_wall_seconds(st.device.poll_interval_s)
        counters = self._counters
        send = self.sink.send
        submit = getattr(self.sink, "submit", None)  # the producer's no-wait hand-over, if the sink has one
        max_unacked = self.settings.max_unacked_readings
        next_at = first_at
        now = loop.time()
        while not stop.is_set():
            if next_at > now:
                # Wait for the tick: a future woken by a timer at the tick itself (what
                # asyncio.sleep does, minus its extra coroutine frame and clock read). run()
                # cancels sleeping loops at stop, never a poll in flight.
                tick_reached = loop.create_future()
                timer = loop.call_at(next_at, _set_done, tick_reached)
                st.sleeping = True
                try:
                    await tick_reached
                except asyncio.CancelledError:
                    timer.cancel()
                    raise
                finally:
                    st.sleeping = False
                if stop.is_set():
                    return
            tick = next_at
            try:
                if st.next_attempt_at and loop.time() < st.next_attempt_at:
                    reading = self._bad_reading(st, self.clock.now_ms())  # backing off: no request
                else:
                    reading = await self._poll(st)
            except Exception as exc:  # a bug must not silently end this device's polling
                counters["errors"] += 1
                log.exception("Unexpected error polling a Modbus device", extra=fields(device=st.device.id))
                reading = self._failed(st, ModbusReadError("device_failure", repr(exc)), self.clock.now_ms())
            # hand the reading to the sink (inline: one coroutine frame less on every resume)
            if submit is not None:
                # Pipelined: the next tick does not wait for this reading to become durable. Kafka
                # that stalls is only known to be down after the producer's delivery timeout (5 s);
                # awaiting each send would leave the ticks of those seconds unpolled. The producer
                # keeps submission order (Kafka or spool), and at most `max_unacked_readings` of
                # this device's readings wait at once; beyond that the sink's slowness is overruns.
                try:
                    outcome = submit(reading)
                except Exception as exc:  # not running: the reading is lost, count it loudly
                    self._count_outcome(reading, exc)
                else:
                    outcome.add_done_callback(partial(self._count_submitted, reading))
                    unacked = st.unacked
                    unacked.append(outcome)
                    while unacked and unacked[0].done():
                        unacked.popleft()
                    if len(unacked) > max_unacked:
                        await asyncio.wait((unacked[0],))
            else:
                try:
                    durable = await send(reading)
                except Exception as exc:  # the sink spools; an exception here means the reading is lost
                    durable = exc
                self._count_outcome(reading, durable)
            next_at = tick + interval
            now = loop.time()  # also the next iteration's "is the tick due" check: nothing runs in between
            if now > next_at:
                # Overran (the poll or the sink took longer than the interval): the ticks that went by
                # are skipped and counted, except the latest, which is polled at once, late (counted
                # too). Ticks are never queued, the grid (and the stagger) is kept, and a gateway whose
                # polls run a little long stays busy instead of idling until the next tick: waiting for
                # it would skip every other reading of every device behind the gateway.
                missed = max(1, int((now - tick) // interval))  # ticks tick + k * interval, k = 1..missed, are past
                counters["overruns"] += missed - 1
                counters["late_ticks"] += 1
                next_at = tick + missed * interval

    def _report_loop_end(self, device_id: str, task: asyncio.Task) -> None:
        """A device's loop ends only at stop; one that a bug ended must not go unnoticed until then."""
        if not task.cancelled() and task.exception() is not None:
            self._counters["errors"] += 1
            log.error("Polling of a Modbus device stopped on an unexpected error", exc_info=task.exception(),
                      extra=fields(device=device_id))

    def _count_outcome(self, reading: Reading, durable: object) -> None:
        """Count what the sink did with a reading: `durable` is send()'s result, submit()'s count
        of durable records, or the exception that lost it."""
        counters = self._counters
        if isinstance(durable, BaseException):  # the sink spools; an exception means the reading is lost
            counters["dropped"] += 1
            log.error("Sink rejected a reading", extra=fields(device=reading.device, seq=reading.seq, error=durable))
        elif durable is False or durable == 0:  # dropped (spool full / refused for good); the sink logged why
            counters["dropped"] += 1
        else:
            counters["sent"] += 1

    def _count_submitted(self, reading: Reading, outcome: asyncio.Future) -> None:
        if outcome.cancelled():
            self._count_outcome(reading, asyncio.CancelledError())
        else:
            self._count_outcome(reading, outcome.exception() or outcome.result())

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every device on its interval until `stop` is set; then close the connections."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        states = list(self.devices.values())
        n = max(1, len(states))
        tasks = []
        for i, st in enumerate(states):
            offset = self.clock.to_wall_seconds(st.device.poll_interval_s) * (i / n) if self.settings.stagger else 0.0
            task = asyncio.create_task(self._device_loop(st, t0 + offset, stop), name=f"poll {st.device.id}")
            task.add_done_callback(partial(self._report_loop_end, st.device.id))
            tasks.append(task)
        log.info("Modbus collector started", extra=fields(site=self.site.id, devices=len(states),
                                                          endpoints=len(self.endpoints)))
        try:
            await stop.wait()
            # Sleeping loops end now; a poll in flight finishes (bounded by its timeouts) so its
            # reading is not lost.
            for st, t in zip(states, tasks):
                if st.sleeping:
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # the last readings handed over are durable (or counted lost) before the sink stops
            unacked = [f for st in states for f in st.unacked if not f.done()]
            if unacked:
                await asyncio.wait(unacked)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ep in self.endpoints.values():
            ep.close()


_PUMP_POINT = re.compile(r"^cdu\.pump(\d+)\.")


def installed_points(profile: ModbusProfile, site: Site, device: Device) -> ModbusProfile:
    """The profile as far as the equipment has it. A CDU profile maps registers for up to N pumps;
    a CDU with fewer (the site's `pumps`) answers the others with 0 or 0xFFFF, which is not a
    measurement: those points are not read (they were a bad point in every reading)."""
    if profile.kind != "cdu":
        return profile
    cdu = next((c for c in site.cdus if c.id == device.entity), None)
    if cdu is None:
        return profile
    points = [p for p in profile.points if not ((m := _PUMP_POINT.match(p.metric)) and int(m.group(1)) > cdu.pumps)]
    return profile if len(points) == len(profile.points) else profile.model_copy(update={"points": points})


def read_limits(profile: ModbusProfile, settings: ModbusSettings, device: Device) -> tuple[int, int]:
    """(max registers per read, max gap) for one device: the collector's override (flags) or else the
    profile's value, lowered by the site file's device/gateway limits. The site's limits describe the
    hardware (a serial gateway that forwards at most 64 registers), so they only ever make reads smaller."""
    regs = profile.max_registers_per_read if settings.max_registers_per_read is None else settings.max_registers_per_read
    gap = profile.max_gap if settings.max_gap is None else settings.max_gap
    if device.max_registers_per_read is not None:
        regs = min(regs, device.max_registers_per_read)
    if device.max_gap is not None:
        gap = min(gap, device.max_gap)
    return regs, gap


def format_plan(site: Site, settings: ModbusSettings | None = None) -> str:
    """Text of `podwatch collect --plan`: per device, its requests (fc, start, count, points)."""
    settings = settings or ModbusSettings()
    profiles = available_profiles(site.profiles_dir)
    plans: dict[tuple, ReadPlan] = {}
    lines: list[str] = []
    for d in site.devices:
        if d.protocol == "mqtt":
            continue
        profile = installed_points(profiles[d.profile], site, d)
        key = (d.profile, *read_limits(profile, settings, d), len(profile.points))
        if key not in plans:
            plans[key] = plan_reads(profile, key[1], key[2])
        plan = plans[key]
        limited = d.max_registers_per_read is not None or d.max_gap is not None
        lines.append(f"{d.id}  profile={d.profile} {d.endpoint} unit={d.unit_id} interval={d.poll_interval_s:g}s "
                     f"requests={len(plan.requests)} registers={plan.registers_read} points={len(plan.metrics)}"
                     + (f" max_registers={key[1]} max_gap={key[2]} (site file)" if limited else "")
                     + ("" if d.enabled else " (disabled)"))
        for r in plan.requests:
            lines.append(f"  fc{r.function_code} start={r.start} count={r.count} gap={r.gap_registers}  "
                         + ", ".join(f"{p.metric}@+{p.register_offset}" for p in r.points))
    mqtt_devices = [d for d in site.devices if d.protocol == "mqtt"]
    if not lines:
        lines.append("no Modbus devices: nothing is polled")
    if mqtt_devices:  # not polled, so no read plan; say where their data comes from instead
        by_profile: dict[str, int] = {}
        for d in mqtt_devices:
            by_profile[d.profile] = by_profile.get(d.profile, 0) + 1
        lines.append(f"MQTT ({site.spec.mqtt.url}): {len(mqtt_devices)} device(s) subscribed, not polled: "
                     + ", ".join(f"{p} {n}" for p, n in sorted(by_profile.items())))
    return "\n".join(lines)
