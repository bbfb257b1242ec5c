"""Modbus collector against real pymodbus servers on 127.0.0.1: decoding per unit on a shared
gateway, RTU-over-TCP framing, error classes (busy, illegal address, gateway 0x0B, lost
connection), quality flags and sequence numbers."""

from __future__ import annotations

import asyncio
import time
import logging

import pytest
from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType

from podwatch.collectors.modbus import ModbusCollector, ModbusSettings, SequenceSource
from podwatch.health import REGISTRY
from podwatch.samples import Quality
from tests.conftest import wait_until
from tests.integration.collectors.modbus_server import ProfileServer
from tests.integration.collectors.sites import MemorySink, pdu_values, rack_site, raritan

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

L3 = frozenset({"pdu.l3.voltage_v", "pdu.l3.current_a", "pdu.l3.power_kw"})


def gateway_site(port: int, racks: int = 3, protocol: str = "modbus-tcp", interval: float = 0.2):
    timeout = min(0.1, interval / 2)
    return rack_site(racks, [{"id": "gw", "host": "127.0.0.1", "port": port, "protocol": protocol, "timeout_s": timeout}],
                     pdu_a={"gateway": "gw", "unit_id": "{i}"}, defaults={"poll_interval_s": interval, "timeout_s": timeout},
                     site_id=f"t{port}")


@pytest.fixture
async def gateway(free_port):
    servers = []

    async def start(units=(1, 2, 3), **kw) -> ProfileServer:
        srv = await ProfileServer({u: (raritan(), pdu_values(u)) for u in units}, free_port, **kw).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        await srv.stop()


async def test_each_unit_on_a_shared_gateway_is_decoded_with_its_own_values(gateway, free_port):
    await gateway()
    collector = ModbusCollector(gateway_site(free_port), MemorySink(), sequences=SequenceSource(start=1000))
    for unit in (1, 2, 3):
        reading = await collector.poll_once(f"pdu-r{unit}-a")
        assert reading.quality is Quality.GOOD and reading.point_quality == {}
        assert reading.points == pytest.approx(pdu_values(unit), rel=1e-6)
        assert reading.seq == 1000
    assert (await collector.poll_once("pdu-r1-a")).seq == 1001
    assert len(collector.endpoints) == 1  # one connection for the three unit ids
    collector.close()


async def test_rtu_over_tcp_gateway(gateway, free_port):
    await gateway(framer=FramerType.RTU)
    collector = ModbusCollector(gateway_site(free_port, protocol="modbus-rtu-over-tcp"), MemorySink())
    reading = await collector.poll_once("pdu-r2-a")
    assert reading.quality is Quality.GOOD
    assert reading.points["pdu.power_kw"] == pytest.approx(10.2)
    collector.close()


async def test_scheduled_run_emits_one_reading_per_interval_with_consecutive_sequences(gateway, free_port):
    await gateway()
    sink = MemorySink()
    collector = ModbusCollector(gateway_site(free_port, interval=0.1), sink)
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    await wait_until(lambda: all(len(sink.of(f"pdu-r{u}-a")) >= 5 for u in (1, 2, 3)), 5, what="5 readings per device")
    stop.set()
    await task
    for unit in (1, 2, 3):
        seqs = [r.seq for r in sink.of(f"pdu-r{unit}-a")]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    health = REGISTRY.component("modbus_collector", collector.site.id)
    assert health.counters["sent"] == len(sink.readings) and health.counters["errors"] == 0


async def test_busy_answers_are_retried_within_the_poll(gateway, free_port):
    srv = await gateway()
    collector = ModbusCollector(gateway_site(free_port), MemorySink(), ModbusSettings(busy_retries=2, busy_retry_delay_s=0.01))
    retries_before = collector.health.counters["retries"]
    srv.busy_remaining[1] = 2
    reading = await collector.poll_once("pdu-r1-a")
    assert reading.quality is Quality.GOOD
    assert collector.health.counters["retries"] - retries_before == 2
    srv.busy_remaining[1] = 10  # more than the retries: the poll fails, bad reading, no values invented
    reading = await collector.poll_once("pdu-r1-a")
    assert reading.quality is Quality.BAD and set(reading.points.values()) == {None}
    collector.close()


async def test_illegal_address_is_a_config_error_logged_once_and_never_retried(gateway, free_port, caplog):
    srv = await gateway(omit={1: L3})  # unit 1 does not serve the L3 block: exception 02 for that read
    collector = ModbusCollector(gateway_site(free_port, interval=0.05), MemorySink())
    l3_address = collector.plan_of("pdu-r1-a").requests[-1].start
    assert {p.metric for p in collector.plan_of("pdu-r1-a").requests[-1].points} == L3
    sink = collector.sink
    stop = asyncio.Event()
    with caplog.at_level(logging.WARNING, logger="podwatch.collectors.modbus"):
        task = asyncio.create_task(collector.run(stop))
        await wait_until(lambda: len(sink.of("pdu-r1-a")) >= 10, 5, what="10 polls of unit 1")
        stop.set()
        await task
    assert srv.requests[(1, 3, l3_address)] == 1  # sent once, never again
    assert srv.requests[(1, 3, 12296)] >= 10  # the rest of the device is still polled
    config_errors = [r for r in caplog.records if r.levelno == logging.ERROR and "configuration error" in r.getMessage()]
    assert len(config_errors) == 1 and config_errors[0].fields["device"] == "pdu-r1-a"
    for reading in sink.of("pdu-r1-a"):
        assert all(reading.points[m] is None and reading.point_quality[m] is Quality.BAD for m in L3)
        assert reading.points["pdu.power_kw"] == pytest.approx(10.1)
    assert collector.devices["pdu-r1-a"].state == "bad"
    assert REGISTRY.component("modbus_device", "pdu-r1-a").gauges["state"] == 2
    assert all(r.quality is Quality.GOOD for r in sink.of("pdu-r2-a"))


async def test_gateway_exception_0b_backs_off_then_recovers(gateway, free_port, caplog):
    srv = await gateway()
    sink = MemorySink()
    collector = ModbusCollector(gateway_site(free_port, interval=0.05), sink, ModbusSettings(backoff_max_s=0.4))
    srv.behaviour[2] = ExcCodes.GATEWAY_NO_RESPONSE
    stop = asyncio.Event()
    with caplog.at_level(logging.DEBUG, logger="podwatch.collectors.modbus"):
        task = asyncio.create_task(collector.run(stop))
        await wait_until(lambda: len(sink.of("pdu-r2-a")) >= 30, 6, what="30 ticks of unit 2")
        bad_ticks = len(sink.of("pdu-r2-a"))
        polls_while_bad = srv.requests_to(2)
        srv.behaviour[2] = None
        await wait_until(lambda: sink.of("pdu-r2-a")[-1].quality is Quality.GOOD, 5, what="unit 2 recovered")
        stop.set()
        await task
    assert all(r.quality is Quality.BAD and set(r.points.values()) == {None} for r in sink.of("pdu-r2-a")[:bad_ticks])
    assert polls_while_bad < bad_ticks / 2  # backed off: most ticks sent no request
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.fields.get("device") == "pdu-r2-a"]
    assert len(warnings) == 1 and warnings[0].fields["kind"] == "gateway"  # first failure loud, repeats quiet
    assert any("recovered" in r.getMessage() and r.fields.get("device") == "pdu-r2-a" for r in caplog.records)


async def test_lost_connection_fails_fast_then_reconnects(free_port):
    srv = await ProfileServer({1: (raritan(), pdu_values(1))}, free_port).start()
    collector = ModbusCollector(gateway_site(free_port, racks=1), MemorySink(), ModbusSettings(reconnect_min_s=0.05, reconnect_max_s=0.2))
    assert (await collector.poll_once("pdu-r1-a")).quality is Quality.GOOD
    await srv.stop()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    reading = await collector.poll_once("pdu-r1-a")
    assert reading.quality is Quality.BAD
    assert (await collector.poll_once("pdu-r1-a")).quality is Quality.BAD
    assert loop.time() - t0 < 1.0
    srv = await ProfileServer({1: (raritan(), pdu_values(1))}, free_port).start()
    try:
        async def good():
            return (await collector.poll_once("pdu-r1-a")).quality is Quality.GOOD
        await wait_until(good, 5, interval=0.05, what="reconnected")
    finally:
        collector.close()
        await srv.stop()


async def test_unchanging_answers_become_stale_and_a_change_makes_them_good(gateway, free_port):
    srv = await gateway(units=(1,))
    collector = ModbusCollector(gateway_site(free_port, racks=1), MemorySink(), ModbusSettings(stale_after_polls=3))
    qualities = [(await collector.poll_once("pdu-r1-a")).quality for _ in range(5)]
    assert qualities == [Quality.GOOD] * 3 + [Quality.STALE] * 2  # first answer, 2 repeats good; the 3rd repeat is stale
    assert collector.devices["pdu-r1-a"].state == "stale"
    await srv.set_values(1, {"pdu.power_kw": 12.5})
    reading = await collector.poll_once("pdu-r1-a")
    assert reading.quality is Quality.GOOD and reading.points["pdu.power_kw"] == pytest.approx(12.5)
    collector.close()


async def test_a_short_answer_is_a_failed_poll_not_a_crash(gateway, free_port):
    """A device answering fewer registers than asked (firmware bug) gives a bad reading."""
    await gateway(units=(1,))
    collector = ModbusCollector(gateway_site(free_port, racks=1), MemorySink())
    endpoint = collector.devices["pdu-r1-a"].endpoint
    real_request = endpoint.request

    async def short_request(*args):
        response = await real_request(*args)  # the real server's answer, one register cut off
        response.registers = response.registers[:-1]
        return response

    endpoint.request = short_request
    reading = await collector.poll_once("pdu-r1-a")
    assert reading.quality is Quality.BAD and set(reading.points.values()) == {None}
    assert "expected" in collector.devices["pdu-r1-a"].last_error
    endpoint.request = real_request
    assert (await collector.poll_once("pdu-r1-a")).quality is Quality.GOOD
    collector.close()


class SlowOnceSink(MemorySink):
    """A sink whose first send takes `delay_s` (a Kafka stall): the poll that made it overruns."""

    def __init__(self, delay_s: float):
        super().__init__()
        self.delay_s = delay_s

    async def send(self, reading):
        if not self.readings:
            await asyncio.sleep(self.delay_s)  # the stall under test, not a synchronisation
        return await super().send(reading)


async def test_an_overrun_polls_the_latest_missed_tick_at_once_and_keeps_the_grid(gateway, free_port):
    """Interval 0.2 s, the first reading's send stalls 0.45 s: the tick at +0.2 is skipped (overrun),
    the one at +0.4 is polled at once when the send returns (late, not at +0.6), then +0.6 is on time."""
    srv = await gateway(units=(1,))
    sink = SlowOnceSink(0.45)
    collector = ModbusCollector(gateway_site(free_port, racks=1, interval=0.2), sink)
    overruns, late = collector.health.counters["overruns"], collector.health.counters["late_ticks"]
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    await wait_until(lambda: len(srv.arrivals.get(1, [])) >= 3, 5, what="three polls of unit 1")
    stop.set()
    await task
    first, second, third = srv.arrivals[1][:3]
    assert 0.44 <= second - first < 0.55  # waiting for the next tick would have made it 0.6
    assert third - first == pytest.approx(0.6, abs=0.08)  # back on the grid
    assert collector.health.counters["overruns"] - overruns == 1
    assert collector.health.counters["late_ticks"] - late == 1
    assert [r.quality for r in sink.of("pdu-r1-a")[:3]] == [Quality.GOOD] * 3


class HeldSubmitSink(MemorySink):
    """A sink with submit() whose readings become durable only when the test says so (a stalled
    Kafka); `instant=True` resolves them at once (a sink that is never slow)."""

    def __init__(self, instant: bool = False):
        super().__init__()
        self.instant = instant
        self.held: list[asyncio.Future] = []

    def submit(self, reading):
        self.readings.append(reading)
        future = asyncio.get_running_loop().create_future()
        if self.instant:
            future.set_result(1)
        else:
            self.held.append(future)
        return future

    def release(self, result=1):
        for future in self.held:
            if not future.done():
                future.set_result(result)


async def test_a_sink_with_submit_is_pipelined_up_to_the_unacked_bound(gateway, free_port):
    """Interval 0.1 s, nothing becomes durable: the device keeps polling until it has
    max_unacked_readings (3) readings waiting, then waits (ticks skipped as overruns); released,
    every reading counts as sent; a sink that resolves at once never makes the loop wait."""
    await gateway(units=(1,))
    sink = HeldSubmitSink()
    collector = ModbusCollector(gateway_site(free_port, racks=1, interval=0.1), sink, ModbusSettings(max_unacked_readings=3))
    counters = collector.health.counters
    sent0, overruns0 = counters["sent"], counters["overruns"]
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    await wait_until(lambda: len(sink.readings) == 4, 5, what="4 readings handed over without any durable")
    held_since = time.monotonic()
    # the stall lasts 4 intervals (the scenario's length, not a synchronisation)
    await wait_until(lambda: time.monotonic() - held_since >= 0.4, 5, what="a 0.4 s stall")
    assert len(sink.readings) == 4  # the bound holds: 3 waiting + the one whose loop waits (unbounded: 8)
    sink.release()
    await wait_until(lambda: counters["overruns"] - overruns0 >= 2, 5, what="the stalled ticks counted as overruns")
    await wait_until(lambda: len(sink.readings) >= 7, 5, what="polling again once durable")
    stop.set()
    sink.release()
    await task
    sink.release()
    assert counters["sent"] - sent0 == len(sink.readings)
    assert [r.seq for r in sink.readings] == list(range(sink.readings[0].seq, sink.readings[0].seq + len(sink.readings)))

    instant = HeldSubmitSink(instant=True)
    collector = ModbusCollector(gateway_site(free_port, racks=1, interval=0.05), instant, ModbusSettings(max_unacked_readings=1))
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    await wait_until(lambda: len(instant.readings) >= 5, 5, what="five readings through a sink that is never slow")
    stop.set()
    await task
    assert collector.health.counters["dropped"] == counters["dropped"]


async def test_a_device_loop_ended_by_a_bug_is_logged_at_once(gateway, free_port, caplog):
    """A device's loop ends only at stop; a bug that ends it (here a sink whose submit() returns no
    future) is an ERROR naming the device and an error count, not silence until shutdown."""

    class BrokenSubmitSink(MemorySink):
        def submit(self, reading):
            self.readings.append(reading)  # and returns None: not a future

    await gateway(units=(1,))
    sink = BrokenSubmitSink()
    collector = ModbusCollector(gateway_site(free_port, racks=1, interval=0.1), sink)
    errors0 = collector.health.counters["errors"]
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    await wait_until(lambda: any("stopped on an unexpected error" in r.getMessage() for r in caplog.records), 5,
                     what="the loop's end to be logged")
    stop.set()
    await task
    record = next(r for r in caplog.records if "stopped on an unexpected error" in r.getMessage())
    assert record.levelname == "ERROR" and record.fields["device"] == "pdu-r1-a"
    assert collector.health.counters["errors"] - errors0 == 1 and len(sink.readings) == 1
