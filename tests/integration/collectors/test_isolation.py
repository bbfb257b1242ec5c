"""One dead device must not delay the others: with 10 % of a site's devices dead — one on its
own endpoint that accepts TCP and never answers (timeout), one behind a shared gateway that
answers exception 0x0B (what a TCP->RTU gateway says for a silent unit) — every healthy device
still keeps its interval. Poll times are measured where they matter: when each request arrives
at the server."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics

import pytest
from pymodbus.constants import ExcCodes

from podwatch.collectors.modbus import ModbusCollector, ModbusSettings
from podwatch.procs import free_port
from podwatch.samples import Quality
from tests.integration.collectors.modbus_server import BlackHoleServer, ProfileServer
from tests.integration.collectors.sites import MemorySink, pdu_values, rack_site, raritan

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

INTERVAL_S = 0.25
TIMEOUT_S = 0.1
RACKS = 10  # 20 PDUs: 10 on gateway A, 10 on gateway B; 2 dead = 10 %
POLLS = 12
JITTER_BOUND_S = 0.08  # max deviation of any healthy device's poll-to-poll time from its interval


async def test_healthy_devices_keep_their_interval_when_ten_percent_are_dead():
    port_a, port_b, port_dead = free_port(), free_port(), free_port()
    gateways = [{"id": "gw-a", "host": "127.0.0.1", "port": port_a, "timeout_s": TIMEOUT_S},
                {"id": "gw-b", "host": "127.0.0.1", "port": port_b, "timeout_s": TIMEOUT_S}]
    site = rack_site(RACKS, gateways, pdu_a={"gateway": "gw-a", "unit_id": "{i}"}, pdu_b={"gateway": "gw-b", "unit_id": "{i}"},
                     defaults={"poll_interval_s": INTERVAL_S, "timeout_s": TIMEOUT_S})
    # pdu-r10-b moves to its own endpoint that never answers (a dead device: timeouts)
    site.devices = [dataclasses.replace(d, gateway=None, port=port_dead) if d.id == "pdu-r10-b" else d for d in site.devices]
    srv_a = await ProfileServer({u: (raritan(), pdu_values(u)) for u in range(1, RACKS + 1)}, port_a).start()
    srv_b = await ProfileServer({u: (raritan(), pdu_values(u)) for u in range(1, RACKS)}, port_b).start()
    dead = await BlackHoleServer(port_dead).start()
    srv_a.behaviour[RACKS] = ExcCodes.GATEWAY_NO_RESPONSE  # pdu-r10-a: gateway says its unit does not answer
    sink = MemorySink()
    collector = ModbusCollector(site, sink, ModbusSettings(backoff_max_s=2.0, stale_after_polls=0))  # static values
    stop = asyncio.Event()
    try:
        task = asyncio.create_task(collector.run(stop))
        # wait for every healthy unit to be polled POLLS times (server side), bounded
        healthy = [(srv_a, u) for u in range(1, RACKS)] + [(srv_b, u) for u in range(1, RACKS)]
        deadline = asyncio.get_running_loop().time() + POLLS * INTERVAL_S + 3
        while any(len(s.arrivals.get(u, [])) < POLLS for s, u in healthy):
            assert asyncio.get_running_loop().time() < deadline, "healthy devices were not polled on time"
            await asyncio.sleep(INTERVAL_S / 2)  # pacing of the check itself, not synchronisation
        stop.set()
        await task
    finally:
        stop.set()
        await srv_a.stop()
        await srv_b.stop()
        await dead.stop()

    worst = 0.0
    for srv, unit in healthy:
        times = srv.arrivals[unit][:POLLS]
        gaps = [b - a for a, b in zip(times, times[1:])]
        worst = max(worst, max(abs(g - INTERVAL_S) for g in gaps))
        assert statistics.mean(gaps) == pytest.approx(INTERVAL_S, abs=0.02)
    print(f"worst poll-to-poll deviation {worst * 1000:.1f} ms")
    assert worst <= JITTER_BOUND_S, f"worst poll-to-poll deviation {worst * 1000:.0f} ms"

    for device in ("pdu-r10-a", "pdu-r10-b"):
        readings = sink.of(device)
        assert readings and all(r.quality is Quality.BAD and set(r.points.values()) == {None} for r in readings)
        assert collector.devices[device].state == "bad"
    assert srv_a.requests_to(RACKS) < len(sink.of("pdu-r10-a"))  # backed off: fewer requests than ticks
    assert dead.bytes_received > 0  # it was tried, and timed out
    for device_id, st in collector.devices.items():
        if device_id not in ("pdu-r10-a", "pdu-r10-b"):
            assert st.state == "healthy" and all(r.quality is Quality.GOOD for r in sink.of(device_id))
    assert collector.health.counters["overruns"] == 0
