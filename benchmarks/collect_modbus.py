"""Benchmark: Modbus collector polls/s and points/s on one core, next to a raw pymodbus request
loop against the same servers (the ratio is the figure). Not a test.

Set-up: N SunSpec model 213 meters (18 float32 points, one 66-register read per poll) spread over
G gateways (one TCP server port each, unit ids 1..N/G), served by pymodbus servers in a
SEPARATE process (pinned to the other core when there are two). The measuring process is pinned
to one core.

- raw loop: per gateway one pymodbus client, per device a task sending the same fc3 request
  back to back (no decode, nothing published);
- collector: the real `ModbusCollector` with every device's interval at 1 ms: every poll overruns
  its interval (the gateway serialises 16 devices), so each device polls its latest missed tick
  at once and the ticks before it are counted as overruns — the collector saturated, as on a core
  or gateway that cannot keep up. Full decode through the read plan, quality/stale check,
  sequence numbers, and publish into an in-memory sink that encodes each reading's envelope as the
  Kafka producer does (`stream.envelope.encode_reading`: `to_envelope` + orjson) and discards it
  (no Kafka in the figure). Not in the figure: the timer wait before each on-time poll of a device
  that keeps up with its interval (docs/collectors.md gives its cost).

Both sides send the same request (fc3, 66 registers) to the same servers from one pymodbus client
per gateway, one request per poll; the collector's requests per poll (`Endpoint.requests_sent`) is
printed to show it. Rounds alternate raw/collector (the shared machine's load varies); the figure
is the ratio of each side's median over the rounds, with the spread of the per-round ratios and
the load average beside it.

usage: .venv/bin/python benchmarks/collect_modbus.py [--devices 256] [--gateways 16] [--seconds 2] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from podwatch.procs import free_port, port_open  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import record  # noqa: E402

PROFILE = "sunspec-213"


def meter_values(unit: int) -> dict[str, float]:
    from podwatch.collectors.profiles import load_profile

    return {p.metric: 100.0 + unit + i for i, p in enumerate(load_profile(PROFILE).points)}


async def serve(ports: list[int], units: int) -> None:
    from tests.integration.collectors.modbus_server import ProfileServer

    from podwatch.collectors.profiles import load_profile

    profile = load_profile(PROFILE)
    servers = [await ProfileServer({u: (profile, meter_values(u)) for u in range(1, units + 1)}, port).start()
               for port in ports]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for s in servers:
        await s.stop()


def bench_site(ports: list[int], units: int):
    """A valid site whose feeders carry the meters (N feeders x 1 meter)."""
    from podwatch.site import parse_site

    feeders = []
    for g, port in enumerate(ports):
        for u in range(1, units + 1):
            feeders.append({"id": f"f{g}-{u}", "transformer": "x1", "rating_kw": 100,
                            "meter": {"id": f"meter-{g}-{u}", "profile": PROFILE, "gateway": f"gw{g}", "unit_id": u}})
    data = {
        "site": {"id": "bench"},
        "gateways": [{"id": f"gw{g}", "host": "127.0.0.1", "port": port, "timeout_s": 2.0} for g, port in enumerate(ports)],
        "defaults": {"poll_interval_s": 5.0, "timeout_s": 2.0},
        "power": {"transformers": [{"id": "x1", "rating_kva": 100000}],
                  "feeders": feeders + [{"id": "fa", "transformer": "x1", "side": "a", "rating_kw": 800},
                                        {"id": "fb", "transformer": "x1", "side": "b", "rating_kw": 800}]},
        "modules": [{"id": "m1", "busways": [{"id": "ba", "feeder": "fa", "side": "a", "rating_kw": 600},
                                             {"id": "bb", "feeder": "fb", "side": "b", "rating_kw": 600}],
                     "cdus": [{"id": "c1", "capacity_kw": 600, "pumps": 2, "pump_flow_lpm": 800, "racks": ["r1"]}],
                     "racks": [{"id": "r1", "rated_kw": 100, "feeds": {"a": "ba", "b": "bb"}}]}],
    }
    return parse_site(data)


async def raw_loop(ports: list[int], units: int, seconds: float) -> tuple[int, int]:
    from pymodbus.client import AsyncModbusTcpClient

    from podwatch.collectors.planner import plan_reads
    from podwatch.collectors.profiles import load_profile

    req = plan_reads(load_profile(PROFILE)).requests[0]
    clients = [AsyncModbusTcpClient("127.0.0.1", port=p, timeout=2, retries=0, reconnect_delay=0) for p in ports]
    await asyncio.gather(*[c.connect() for c in clients])
    done = errors = 0
    cpu0 = time.process_time()
    end = time.perf_counter() + seconds

    async def device(client, unit):
        nonlocal done, errors
        while time.perf_counter() < end:
            rr = await client.read_holding_registers(req.start, count=req.count, device_id=unit)
            if rr.isError():
                errors += 1
            else:
                done += 1

    await asyncio.gather(*[device(c, u) for c in clients for u in range(1, units + 1)])
    cpu_s = time.process_time() - cpu0
    for c in clients:
        c.close()
    return done, errors, cpu_s


class SerialisingSink:
    """Publishes into memory: encodes the envelope as the producer does (its work minus Kafka), then drops it."""

    def __init__(self):
        from podwatch.stream.envelope import encode_reading

        self.encode = encode_reading
        self.readings = self.points = self.bytes = self.good = 0

    async def send(self, reading) -> None:
        self.bytes += len(self.encode(reading))
        self.readings += 1
        if reading.quality != "bad":
            self.good += 1
            self.points += len(reading.points)

    async def send_dead_letter(self, payload, reason, source, **meta) -> None:
        pass


async def collector_run(ports: list[int], units: int, seconds: float):
    from podwatch.collectors.modbus import ModbusCollector, ModbusSettings

    site = bench_site(ports, units)
    # every device back to back: interval 1 ms (validation wants timeout < interval, so set after loading)
    site.devices = [dataclasses.replace(d, poll_interval_s=0.001) for d in site.devices]
    sink = SerialisingSink()
    collector = ModbusCollector(site, sink, ModbusSettings(stagger=False))
    # connect first so the measured window holds polls only
    await asyncio.gather(*[collector.poll_once(d.id) for d in list(site.devices)[:1]])
    stop = asyncio.Event()
    task = asyncio.create_task(collector.run(stop))
    await asyncio.sleep(0.5)  # warm-up: connections open

    def requests_sent() -> int:
        return sum(ep.requests_sent for ep in collector.endpoints.values())

    r0, p0, q0, t0, c0 = sink.good, sink.points, requests_sent(), time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)
    r1, p1, q1, t1, c1 = sink.good, sink.points, requests_sent(), time.perf_counter(), time.process_time()
    stop.set()
    await task
    per_poll = (q1 - q0) / max(1, r1 - r0)
    return ((r1 - r0) / (t1 - t0), (p1 - p0) / (t1 - t0), sink, collector.health.snapshot(), (r1 - r0) / (c1 - c0),
            per_poll)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=256)
    ap.add_argument("--gateways", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=2.0, help="per phase and round")
    ap.add_argument("--rounds", type=int, default=7, help="alternating raw/collector rounds (the machine's load varies)")
    ap.add_argument("--serve", nargs="+", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--units", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.serve:
        if len(cores) > 1:
            os.sched_setaffinity(0, {cores[-1]})
        asyncio.run(serve(args.serve, args.units))
        return
    units = max(1, args.devices // args.gateways)
    ports = [free_port() for _ in range(args.gateways)]
    server = subprocess.Popen([sys.executable, __file__, "--serve", *map(str, ports), "--units", str(units)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("the Modbus server process did not start (a port was taken?); run again")
        assert all(port_open("127.0.0.1", p) for p in ports)
        os.sched_setaffinity(0, {cores[0]})  # the measured side: one core
        import logging

        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
        n = units * len(ports)
        print(f"{n} devices ({PROFILE}: 1 request x 66 registers, 18 points per poll) on {len(ports)} gateways; "
              f"servers in a separate process; this process pinned to core {cores[0]} of {len(cores)}")
        # wall-clock rates swing with the machine's load; per CPU-second of this (one-core) process is
        # what one core can do, and is the figure compared (both printed)
        rows = []
        load_before = os.getloadavg()[0]
        for rnd in range(1, args.rounds + 1):
            raw, raw_err, raw_cpu = asyncio.run(raw_loop(ports, units, args.seconds))
            raw_rate, raw_per_cpu = raw / args.seconds, raw / raw_cpu
            polls, points, sink, health, polls_per_cpu, requests_per_poll = asyncio.run(
                collector_run(ports, units, args.seconds))
            rows.append((polls_per_cpu / raw_per_cpu, raw_per_cpu, polls_per_cpu, polls, points, raw_rate))
            print(f"round {rnd}: raw pymodbus loop {raw_rate:6.0f} req/s wall, {raw_per_cpu:6.0f} req per CPU-s "
                  f"({1e6 / raw_per_cpu:5.1f} us/req, errors={raw_err}) | collector {polls:6.0f} polls/s wall "
                  f"({points:6.0f} points/s), {polls_per_cpu:6.0f} polls per CPU-s ({1e6 / polls_per_cpu:5.1f} us/poll, "
                  f"{requests_per_poll:.2f} requests/poll, {sink.bytes / max(1, sink.readings):.0f} B/reading, "
                  f"errors={health['errors']}) | ratio per core {polls_per_cpu / raw_per_cpu:.0%}")
        load = f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {len(cores)} cores"
        # Each side's median over the rounds, then their ratio: a round's per-CPU cost swings with the
        # servers' speed (their core is shared), which the two phases of one round need not share, so
        # per-round ratios scatter more than either side's median does (their spread is printed).
        ratios = sorted(r[0] for r in rows)
        raw_per_cpu = statistics.median(r[1] for r in rows)
        polls_per_cpu = statistics.median(r[2] for r in rows)
        polls, points, raw_rate = (statistics.median(r[i] for r in rows) for i in (3, 4, 5))
        ratio = polls_per_cpu / raw_per_cpu
        wall_ratios = sorted(r[3] / r[5] for r in rows)
        spread = (f"per-round ratios {ratios[0]:.0%}-{ratios[-1]:.0%}, median {statistics.median(ratios):.0%}, "
                  f"over {len(rows)} rounds; {load}")
        print(f"medians over the rounds: one core does {polls_per_cpu:.0f} collector polls/s ({polls_per_cpu * 18:.0f} "
              f"points/s) vs {raw_per_cpu:.0f} raw pymodbus requests/s: {ratio:.0%} ({spread}); per poll "
              f"{1e6 / polls_per_cpu:.1f} us vs {1e6 / raw_per_cpu:.1f} us per raw request = "
              f"{1e6 / polls_per_cpu - 1e6 / raw_per_cpu:.1f} us of collector work; wall clock {polls:.0f} vs "
              f"{raw_rate:.0f}. Collector = decode + quality + seq + envelope into an in-memory sink; "
              f"goal >= 2,000 polls/s per core and >= 80 % of raw")
        record("collector device polls per CPU-second (one core, full decode + envelope)", polls_per_cpu, "polls/s",
               reference=raw_per_cpu, reference_label="raw pymodbus request loop, same servers",
               goal=">= 2,000 polls/s and >= 80 % of raw", note=f"medians of each side; {spread}")
        record("collector points per CPU-second (one core)", polls_per_cpu * 18, "points/s")
        record("collector device polls per wall second", polls, "polls/s", reference=raw_rate,
               reference_label="raw pymodbus request loop, wall", goal=">= 80 % of raw",
               note=f"wall ratios {wall_ratios[0]:.0%}-{wall_ratios[-1]:.0%} (the servers' core is shared)")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
