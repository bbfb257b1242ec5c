"""Ingest benchmark: Kafka -> DuckDB points/s next to a raw consumer, bytes per point, and the
p95 latency of the dashboard queries on a large table.

1. A real Tansu broker on a free loopback port; `--messages` readings (25 points each, PDU-like
   values with the 2-3 decimals Modbus scaling gives) pre-filled into 6 partitions.
2. Reference: a raw aiokafka consumer reads every message without decoding (messages/s).
3. The DuckDB sink (decode, dedup, one transaction per batch with the offsets, rollups) reads
   the same messages from the start into a fresh file (points/s, messages/s). Figure: the ratio.
4. Bytes per stored point: file size after CHECKPOINT / points (everything in the file counted:
   samples, readings, rollups, latest values, offsets), and where they go: bytes per point of
   each column of the big tables (`column_bytes`, from `pragma_storage_info`).
5. Dashboard queries (the API's own query functions) on `--big-samples` rows generated directly
   with SQL (1000 devices x 25 metrics at 1 s, sorted like the sink writes), rollups computed,
   each query run `--repeat` times: p50 / p95.

    .venv/bin/python benchmarks/ingest.py                      # full run (100 M samples, several minutes)
    .venv/bin/python benchmarks/ingest.py --big-samples 20000000 --messages 100000
"""

from __future__ import annotations

import sys as _sys
_sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent))
from _report import record  # noqa: E402

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402

from podwatch import procs  # noqa: E402
from podwatch.samples import Reading  # noqa: E402
from podwatch.storage import queries  # noqa: E402
from podwatch.storage.db import BLOCK_SIZE, Database  # noqa: E402
from podwatch.storage.ids import insert_named_samples  # noqa: E402
from podwatch.storage.rollups import advance_rollups  # noqa: E402
from podwatch.storage.sink import DuckDBSink, SinkSettings  # noqa: E402

PARTITIONS = 6
POINTS_PER_MESSAGE = 25
METRICS = [f"pdu.l{p}.{m}" for p in (1, 2, 3) for m in ("voltage_v", "current_a", "power_kw")] + [
    "pdu.power_kw", "pdu.apparent_power_kva", "pdu.power_factor", "pdu.frequency_hz", "pdu.energy_kwh"] + [
    f"pdu.outlet{i}.power_kw" for i in range(1, 12)]
assert len(METRICS) == POINTS_PER_MESSAGE


def make_messages(n: int, devices: int = 400) -> list[tuple[bytes, bytes]]:
    rng = random.Random(1)
    t0 = 1_764_000_000_000
    out = []
    for i in range(n):
        device = i % devices
        seq = i // devices
        base = 40 + device % 50
        points = {m: round(base * (1 + j / 10) + rng.random(), 2) for j, m in enumerate(METRICS)}
        r = Reading("bench", f"pdu-{device:04d}", seq, t0 + seq * 1000 + device, points)
        out.append((r.device.encode(), orjson.dumps(r.to_envelope())))
    return out


async def prefill(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, PARTITIONS, 1), NewTopic(topic + ".dl", 1, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1024 * 1024,
                                max_request_size=8 * 1024 * 1024)
    await producer.start()
    futures = []
    for key, value in messages:
        futures.append(await producer.send(topic, value, key=key))
        if len(futures) >= 20_000:
            await asyncio.gather(*futures)
            futures.clear()
    await asyncio.gather(*futures)
    await producer.stop()


async def raw_consumer_rate(bootstrap: str, topic: str, total: int) -> float:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                                fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024)
    await consumer.start()
    consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    got, nbytes = 0, 0
    started = time.perf_counter()
    while got < total:
        data = await consumer.getmany(timeout_ms=500, max_records=20_000)
        for records in data.values():
            got += len(records)
            nbytes += sum(len(r.value) for r in records)
    elapsed = time.perf_counter() - started
    await consumer.stop()
    return got / elapsed


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by a process (this one by default)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


async def sink_rate(bootstrap: str, topic: str, total: int, db_path: Path,
                    decode_process: bool = True) -> tuple[float, float, int, str]:
    """(points/s, messages/s, points, CPU note) of the sink reading `total` messages from the start."""
    db = Database(db_path)
    sink = DuckDBSink(db, SinkSettings(kafka=bootstrap, topic=topic, dead_letter_topic=topic + ".dl", group_id=None,
                                       decode_process=decode_process))
    await sink.start()
    child = sink._fetch_process.pid if sink._fetch_process else None
    task = asyncio.create_task(sink.run())
    started = time.perf_counter()
    cpu_parent, cpu_child = _cpu_s(), _cpu_s(child) if child else 0.0
    while not (sink.stats.messages >= total and sink._pending_write is None and sink.stats.readings >= total):
        await asyncio.sleep(0.01)
        if task.done():
            task.result()
    elapsed = time.perf_counter() - started
    cpu_parent, cpu_child = _cpu_s() - cpu_parent, (_cpu_s(child) - cpu_child) if child else 0.0
    points = sink.stats.points
    batches = sink.stats.batches
    await sink.stop()
    await task
    db.connection.execute("CHECKPOINT")
    db.close()
    cpu = f"CPU {cpu_parent / total * 1e6:.1f} us/msg in the writer process"
    if child:
        cpu += f" + {cpu_child / total * 1e6:.1f} in the fetch process"
    cpu += f"; {total / max(batches, 1):,.0f} messages per transaction"
    return points / elapsed, total / elapsed, points, cpu


def big_table(path: Path, samples: int) -> None:
    db = Database(path)
    con = db.connection
    devices, metrics = 1000, 25
    seconds = samples // (devices * metrics)
    start = datetime(2026, 1, 1)
    step = 600  # seconds of data per INSERT, in time order like the sink (sorted by device, ts inside a batch)
    t = time.perf_counter()
    for lo in range(0, seconds, step):
        insert_named_samples(con, f"""
            SELECT ?::TIMESTAMP + to_seconds(s) AS ts, 'dev-' || lpad(d::VARCHAR, 4, '0') AS device,
                   CASE WHEN d < 500 THEN 'pdu.' ELSE 'cdu.' END || 'metric_' || m || '_kw' AS metric,
                   round(40 + d % 50 + m + 3 * sin(s / 600.0 + d), 2) AS value, 0 AS quality, s AS seq
            FROM range({lo}, {min(lo + step, seconds)}) a(s), range({devices}) b(d), range({metrics}) c(m)""", [start])
    con.execute("INSERT INTO dedup_state SELECT device, max(seq), max(ts) FROM readings GROUP BY device")
    con.execute("INSERT INTO latest_values SELECT device, metric, max(ts), arg_max(value, ts), 0 FROM samples GROUP BY ALL")
    con.execute("INSERT INTO topo_devices (device, kind, rack) SELECT 'dev-' || lpad(d::VARCHAR, 4, '0'), "
                "CASE WHEN d < 500 THEN 'pdu' ELSE 'cdu' END, 'rack-' || (d // 2) FROM range(1000) r(d)")
    print(f"  generated {con.execute('SELECT count(*) FROM samples').fetchone()[0]:,} samples "
          f"({seconds} s x {devices} devices x {metrics} metrics) in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    while advance_rollups(con, 120):
        pass
    con.execute("CHECKPOINT")
    print(f"  rollups in {time.perf_counter() - t:.0f} s; file {os.path.getsize(path) / 1e9:.2f} GB")
    db.close()


def dashboard_p95(path: Path, repeat: int) -> list[tuple[str, float, float]]:
    db = Database(path)
    cur = db.cursor()
    newest = cur.execute("SELECT max(max_ts) FROM dedup_state").fetchone()[0]
    rng = random.Random(2)

    def dev() -> str:  # devices 0-499 carry pdu.* metrics, 500-999 cdu.*
        return f"dev-{rng.randrange(500):04d}"

    cases = {
        "series 1 device/metric, last 1 h, auto step (raw)": lambda: queries.series(
            cur, device=dev(), metric="pdu.metric_3_kw", start=newest - timedelta(hours=1), end=newest),
        "series 1 device, all metrics, last 6 h, 1m": lambda: queries.series(
            cur, device=dev(), start=newest - timedelta(hours=6), end=newest, step_s=60),
        "series rack (2 devices), 24 h, 5m": lambda: queries.series(
            cur, rack=f"rack-{rng.randrange(500)}", start=newest - timedelta(hours=24), end=newest, step_s=300),
        "series 1 metric x 20 devices, full range, 1h": lambda: queries.series(
            cur, device=",".join(dev() for _ in range(20)), metric="pdu.metric_1_kw",
            start=newest - timedelta(days=30), end=newest, step_s=3600),
        "latest kind=cdu": lambda: queries.latest(cur, kind="cdu"),
    }
    results = []
    for name, fn in cases.items():
        fn()  # warm
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            rows = fn()
            times.append((time.perf_counter() - t) * 1000)
        assert rows, name
        times.sort()
        results.append((name, statistics.median(times), times[int(0.95 * (len(times) - 1))]))
    cur.close()
    db.close()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--big-samples", type=int, default=100_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--reuse-big", help="an existing big.duckdb from an earlier run (skips generating it)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure raw consumer and sink this many times, alternating (figures: medians)")
    parser.add_argument("--compare-in-process", action="store_true",
                        help="each round also measures the sink with decode_process=False (A/B in the same minute)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="podwatch-bench-"))
    print(f"cpus={os.cpu_count()} workdir={work}")
    if not args.skip_ingest:
        await ingest_figures(args)
    if not args.skip_big:
        big = Path(args.reuse_big) if args.reuse_big else work / "big.duckdb"
        print(f"dashboard queries on {args.big_samples:,} samples:" if not args.reuse_big else f"dashboard queries on {big}:")
        if not args.reuse_big:
            big_table(big, args.big_samples)
        size = os.path.getsize(big)
        n = Database(big, read_only=True)
        count = n.query("SELECT count(*) FROM samples")[0][0]
        n.close()
        print(f"  {count:,} samples; bytes per point in the big file (with rollups): {size / count:.2f}; by column:")
        print_column_bytes(big, count)
        worst = None
        for name, p50, p95 in dashboard_p95(big, args.repeat):
            print(f"  {name:<52} p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  (goal p95 < 200 ms)")
            worst = max(worst or (0, ""), (p95, name))
        record(f"bytes per stored point, {count:,} samples incl. rollups", size / count, "B/point", goal="<= 3",
               higher_is_better=False)
        if worst:
            record(f"slowest dashboard query p95 on {count:,} samples ({worst[1]})", worst[0], "ms", goal="< 200 ms",
                   higher_is_better=False)


async def ingest_figures(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="podwatch-bench-ingest-"))
    messages = make_messages(args.messages)
    avg_bytes = sum(len(v) for _, v in messages) / len(messages)
    with procs.tansu() as broker:
        topic = "bench.telemetry"
        t = time.perf_counter()
        await prefill(broker.address, topic, messages)
        print(f"pre-filled {len(messages):,} messages x {POINTS_PER_MESSAGE} points ({avg_bytes:.0f} B each) "
              f"in {time.perf_counter() - t:.1f} s")
        del messages
        modes = [True, False] if args.compare_in_process else [True]
        raws, results = [], {mode: [] for mode in modes}
        for round_no in range(args.rounds):
            raw = await raw_consumer_rate(broker.address, topic, args.messages)
            raws.append(raw)
            print(f"round {round_no + 1}: raw aiokafka consumer (no decoding): {raw:>10,.0f} messages/s  "
                  f"({raw * POINTS_PER_MESSAGE:,.0f} points/s equivalent)")
            for mode in modes:
                path = work / f"ingest-{round_no}-{'process' if mode else 'inproc'}.duckdb"
                points_s, msgs_s, points, cpu = await sink_rate(broker.address, topic, args.messages, path, mode)
                results[mode].append((msgs_s / raw, msgs_s, points_s, path, points))
                label = "fetch process" if mode else "in-process   "
                print(f"round {round_no + 1}: DuckDB sink, {label}:  {msgs_s:>10,.0f} messages/s = {points_s:,.0f} "
                      f"points/s, ratio {msgs_s / raw:.0%}; {cpu}; file {os.path.getsize(path) / points:.2f} B/point; "
                      f"load {os.getloadavg()[0]:.1f}")
        for mode in modes:
            ratios = sorted(r[0] for r in results[mode])
            print(f"sink ({'fetch process' if mode else 'in-process'}): ratio sink / raw consumer median "
                  f"{statistics.median(ratios):.0%} (min {ratios[0]:.0%}, max {ratios[-1]:.0%}, {len(ratios)} rounds; "
                  f"goal >= 50%)")
        median_round = sorted(results[True], key=lambda r: r[0])[len(results[True]) // 2]
        _, msgs_s, points_s, path, points = median_round
        raw = msgs_s / median_round[0]
        for stale in work.glob("ingest-*.duckdb"):
            if stale != path:
                stale.unlink()
        path.rename(work / "ingest.duckdb")
        record("DuckDB sink ingest, points/s (decode + dedup + one transaction with offsets + rollups)", points_s,
               "points/s", goal=">= 1,000,000")
        record("DuckDB sink ingest, messages/s", msgs_s, "messages/s", reference=raw,
               reference_label="raw aiokafka consumer, no decoding, same topic", goal=">= 50 % of raw")
        size = os.path.getsize(work / "ingest.duckdb")
        check = Database(work / "ingest.duckdb", read_only=True)
        used = check.query("SELECT used_blocks * block_size FROM pragma_database_size()")[0][0]
        check.close()
        record("bytes per stored point after ingest", size / points, "B/point", goal="<= 3", higher_is_better=False)
        print(f"bytes per stored point: {size / points:.2f} ({size / 1e6:.1f} MB file / {points:,} points; goal <= 3); "
              f"{used / points:.2f} counting used blocks only (free blocks left by incremental checkpoints excluded)")
        print(f"  sample_rows + reading_rows alone (copied in stored order to a fresh file): "
              f"{samples_only_bytes(work / 'ingest.duckdb') / points:.2f} B/point; by column:")
        print_column_bytes(work / "ingest.duckdb", points)


def column_bytes(path: Path, tables: tuple[str, ...] = ("sample_rows", "reading_rows", "rollup_1m", "rollup_15m",
                                                         "rollup_1h", "latest_values")) -> dict[tuple[str, str], tuple[int, str]]:
    """Bytes per (table, column) of a checkpointed file, with the compressions used (biggest
    first). A segment's size is the distance to the next segment in its block (the last one
    to the block's end), so block slack is charged to the column that left it."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    block_size = con.execute("SELECT block_size FROM pragma_database_size()").fetchone()[0]
    segments = []
    for table in tables:
        if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [table]).fetchone()[0]:
            continue
        segments += [(table, *r) for r in con.execute(
            f"SELECT column_name, compression, block_id, block_offset, len(additional_block_ids) "
            f"FROM pragma_storage_info('{table}') WHERE persistent AND block_id >= 0").fetchall()]
    con.close()
    by_block: dict[int, list[tuple[int, int]]] = {}
    for i, seg in enumerate(segments):
        by_block.setdefault(seg[3], []).append((seg[4], i))
    sizes: dict[tuple[str, str], dict[str, int]] = {}
    for block in by_block.values():
        block.sort()
        for j, (offset, i) in enumerate(block):
            end = block[j + 1][0] if j + 1 < len(block) else block_size
            table, column, compression, _, _, extra_blocks = segments[i]
            per = sizes.setdefault((table, column), {})
            per[compression] = per.get(compression, 0) + end - offset + extra_blocks * block_size
    return {key: (sum(per.values()), ", ".join(f"{c} {n / sum(per.values()):.0%}" for c, n in
                                              sorted(per.items(), key=lambda kv: -kv[1])))
            for key, per in sizes.items()}


def print_column_bytes(path: Path, points: int) -> None:
    tables: dict[str, int] = {}
    for (table, column), (size, compressions) in sorted(column_bytes(path).items()):
        tables[table] = tables.get(table, 0) + size
        if size / points >= 0.005:
            print(f"    {table:<13} {column:<12} {size / points:6.3f} B/point  ({compressions})")
    print("    per table: " + ", ".join(f"{t} {n / points:.3f}" for t, n in tables.items()) + " B/point")


def samples_only_bytes(path: Path) -> int:
    import duckdb

    copy = path.with_name("samples-only.duckdb")
    con = duckdb.connect(str(copy), config={"default_block_size": str(BLOCK_SIZE)})  # as Database creates files
    con.execute(f"ATTACH '{path}' AS src (READ_ONLY)")
    con.execute("CREATE TABLE samples AS SELECT * FROM src.sample_rows")
    con.execute("CREATE TABLE readings AS SELECT * FROM src.reading_rows")
    con.execute("DETACH src")
    con.execute("CHECKPOINT")
    used = con.execute("SELECT used_blocks * block_size FROM pragma_database_size()").fetchone()[0]
    con.close()
    return used


if __name__ == "__main__":
    asyncio.run(main())
