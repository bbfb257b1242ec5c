"""The exactly-once Kafka -> DuckDB sink (`podwatch ingest`).

Lifecycle: `await sink.start()` (opens Kafka clients, loads dedup state), `await sink.run()`
(until `stop()`), `await sink.stop()` (idempotent: finishes the batch being written, closes
clients). Or `async with DuckDBSink(...) as sink: await sink.run()`.

Exactly once, in effect:
- each batch's rows and the consumer's next offset per partition are written in ONE DuckDB
  transaction (`ingest_offsets`); on assignment the consumer seeks to the stored offsets, so a
  crash at any instant re-reads exactly what was not committed. Kafka's own committed offsets
  are never used.
- readings already stored are dropped by (device, seq) (`dedup.py`): producers retry without
  idempotence and a recreated topic is re-read from the start.
- a stored offset beyond the partition's end means the topic was recreated (a Tansu restart
  loses everything): logged loudly, the partition is re-read from the earliest offset.
- undecodable messages go to `podwatch.deadletter.v1` with the reason; ingest continues. Dead
  letters are sent before the offsets that pass them are committed (at least once).

Batches are pipelined: while one batch is written in a worker thread (DuckDB releases the
GIL), the next one is fetched and decoded. `add_batch_listener(fn)` registers
`fn(rows: polars.DataFrame[ts, device, metric, value, quality])`, sync or async, called after
each committed batch, in commit order; this is where the streaming checks of analytics run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from operator import attrgetter
from typing import Any, Awaitable, Callable

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaConnectionError, KafkaError, OffsetOutOfRangeError
from pydantic import BaseModel, ConfigDict, Field

from podwatch.errors import PodwatchError
from podwatch.health import REGISTRY, ComponentHealth
from podwatch.logs import fields
from podwatch.storage.db import Database
from podwatch.storage.decode import DecodedBatch, Rejected, decode_messages, select_readings
from podwatch.storage.dedup import DEFAULT_WINDOW, SeqDeduper
from podwatch.storage.ids import IdMap, reading_rows_table
from podwatch.storage.rollups import (
    StorageSettings,
    advance_rollups,
    apply_retention,
    done_until,
    recompute_buckets,
    write_retention_settings,
)

from podwatch.stream.config import BootstrapServers
from podwatch.stream.envelope import dead_letter, encode_dead_letter
from podwatch.stream.topics import DEADLETTER_TOPIC, TELEMETRY_TOPIC

log = logging.getLogger(__name__)

BatchListener = Callable[[pl.DataFrame], Any | Awaitable[Any]]
_RECORD_VALUE = attrgetter("value")
MAINTAIN_EVERY_S = 1.0  # latest-value flush, rollup and retention check period
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# latest_values is a cache of the newest value per series: the sink keeps it in memory per
# batch and flushes it every MAINTAIN_EVERY_S (an upsert per batch cost ~40 % of the write);
# on start it is refreshed from the last minute of `samples`, so a crash loses nothing. The
# newest value is taken together with its quality as one struct: arg_max(value, ts) alone skips
# a NULL value (a bad point) and would pair an older value with the newest time.
LATEST_UPSERT = """
INSERT INTO latest_values
SELECT device, metric, ts, newest.v, newest.q FROM (
    SELECT device, metric, max(ts) AS ts, arg_max({{'v': value, 'q': quality}}, ts) AS newest
    FROM {source} GROUP BY device, metric)
ON CONFLICT (device, metric) DO UPDATE SET ts = excluded.ts, value = excluded.value, quality = excluded.quality
WHERE excluded.ts >= latest_values.ts
"""


class SinkSettings(BaseModel):
    """Settings of the DuckDB sink."""

    model_config = ConfigDict(extra="forbid")

    kafka: BootstrapServers = Field(description="Bootstrap servers, host:port[,host:port]")
    topic: str = TELEMETRY_TOPIC
    dead_letter_topic: str = DEADLETTER_TOPIC
    group_id: str | None = Field("podwatch-sink", description="Consumer group; None: assign every partition directly")
    max_batch_messages: int = Field(20_000, gt=0, description="Messages per DuckDB transaction at most")
    fetch_timeout_ms: int = Field(200, gt=0)
    session_timeout_ms: int = Field(10_000, gt=0)
    connect_timeout_s: float = Field(30.0, gt=0, description="Keep retrying an unreachable broker at start this long")
    dedup_window: int = Field(DEFAULT_WINDOW, gt=0, description="Readings per device remembered for dedup")
    stuck_after_s: float = Field(30.0, gt=0, description="/healthz fails when lag > 0 and nothing committed this long")
    lag_limit_messages: int = Field(1_000_000, gt=0, description="/healthz fails when lag exceeds this and keeps growing")
    storage: StorageSettings = Field(default_factory=StorageSettings)
    gc_gen0_threshold: int | None = Field(
        50_000, gt=0,
        description="On start, raise the interpreter's generation-0 GC threshold to this (process-wide; "
                    "never lowered). A batch holds ~100k young objects (Kafka records, parsed dicts): at "
                    "Python's default of 700 the collector walks them ~140 times per batch, ~20 % of the "
                    "event loop's CPU. None: leave the interpreter's setting alone.")


@dataclass
class SinkStats:
    """What /metrics and /api/pipeline report about the sink."""

    messages: int = 0
    points: int = 0
    readings: int = 0
    duplicates: int = 0
    too_old: int = 0
    dead_letters: int = 0
    batches: int = 0
    listener_errors: int = 0
    topic_resets: int = 0
    lag: dict[int, int] = field(default_factory=dict)
    last_commit_monotonic: float | None = None
    last_batch_latency_s: float = 0.0
    latency_bucket_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0
    started_monotonic: float = field(default_factory=time.monotonic)
    _rate_window: deque = field(default_factory=lambda: deque(maxlen=64))
    _lag_window: deque = field(default_factory=lambda: deque(maxlen=256))

    def observe_latency(self, seconds: float) -> None:
        self.last_batch_latency_s = seconds
        self.latency_sum_s += seconds
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.latency_bucket_counts[i] += 1
                return
        self.latency_bucket_counts[-1] += 1

    def note_progress(self) -> None:
        now = time.monotonic()
        self._rate_window.append((now, self.points, self.messages))
        self._lag_window.append((now, self.total_lag))

    @property
    def total_lag(self) -> int:
        return sum(self.lag.values())

    def rates(self, window_s: float = 10.0) -> tuple[float, float]:
        """(points/s, messages/s) over about the last `window_s` seconds."""
        now = time.monotonic()
        samples = [s for s in self._rate_window if now - s[0] <= window_s]
        samples.append((now, self.points, self.messages))
        first, last = samples[0], samples[-1]
        dt = last[0] - first[0]
        if dt <= 0:
            return 0.0, 0.0
        return (last[1] - first[1]) / dt, (last[2] - first[2]) / dt

    def lag_growing(self, window_s: float = 60.0) -> bool:
        now = time.monotonic()
        points = [lag for t, lag in self._lag_window if now - t <= window_s]
        if len(points) < 5:
            return False
        return all(b >= a for a, b in zip(points, points[1:])) and points[-1] > points[0]


class _SeekToStoredOffsets(ConsumerRebalanceListener):
    def __init__(self, sink: "DuckDBSink") -> None:
        self._sink = sink

    async def on_partitions_revoked(self, revoked) -> None:
        await self._sink._drain_write()

    async def on_partitions_assigned(self, assigned) -> None:
        await self._sink._seek_assigned(list(assigned))


class DuckDBSink:
    """Consume telemetry into DuckDB exactly once. See the module docstring for the contract."""

    def __init__(self, db: Database, settings: SinkSettings, health: ComponentHealth | None = None) -> None:
        self.db = db
        self.settings = settings
        self.health = health or REGISTRY.component("duckdb_sink")
        self.stats = SinkStats()
        self._dedup = SeqDeduper(settings.dedup_window)
        self._listeners: list[BatchListener] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._write_cursor = None
        self._pending_write: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self._run_finished = asyncio.Event()
        self._stop_done = asyncio.Event()
        self._stopped = False
        self._running = False
        self._rollup_marks: dict[str, datetime | None] = {}
        self._last_retention = 0.0
        self._last_maintain = 0.0
        # The one site this file holds: from the site file (topology) or the file's first
        # readings. Readings of any other site are dead letters (see `_drop_foreign_sites`).
        self._own_site: str | None = None
        self._latest_pending: pl.DataFrame | None = None
        self._latest_lock = threading.Lock()
        self._site_recorded: str | None = None  # the site stored in podwatch_meta by this sink
        self._partition_newest_ms: dict[int, int] = {}  # newest committed reading per partition
        self._device_ids = IdMap("device")
        self._metric_ids = IdMap("metric")

    # ------------------------------------------------------------------ lifecycle
    def add_batch_listener(self, fn: BatchListener) -> None:
        """`fn(rows)` after each committed batch; rows: ts (UTC), device, metric, value, quality."""
        self._listeners.append(fn)

    async def __aenter__(self) -> "DuckDBSink":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        s = self.settings
        if s.gc_gen0_threshold is not None:
            gen0, gen1, gen2 = gc.get_threshold()
            if gen0 < s.gc_gen0_threshold:
                gc.set_threshold(s.gc_gen0_threshold, gen1, gen2)
        self._write_cursor = self.db.cursor()
        write_retention_settings(self._write_cursor, s.storage)
        await asyncio.to_thread(self._dedup.load, self._write_cursor)
        self._rollup_marks = done_until(self._write_cursor)
        self._device_ids.load(self._write_cursor)
        self._metric_ids.load(self._write_cursor)
        await asyncio.to_thread(self._refresh_latest_from_samples, self._write_cursor)
        site = self._write_cursor.execute("SELECT value FROM podwatch_meta WHERE key = 'site'").fetchone()
        if site:
            self._own_site = self._site_recorded = site[0]
        self._producer, self._consumer = self._make_clients()
        await self._start_kafka_clients()
        if s.group_id is not None:
            self._consumer.subscribe([s.topic], listener=_SeekToStoredOffsets(self))
        else:
            partitions = await self._wait_for_partitions()
            tps = [TopicPartition(s.topic, p) for p in sorted(partitions)]
            self._consumer.assign(tps)
            await self._seek_assigned(tps)
        log.info("DuckDB sink started", extra=fields(db=self.db.path, kafka=s.kafka, topic=s.topic, group=s.group_id))

    def _make_clients(self) -> tuple[AIOKafkaProducer, AIOKafkaConsumer]:
        s = self.settings
        # acks=all without idempotence (Tansu cannot do it); dedup by (device, seq) covers retries
        producer = AIOKafkaProducer(bootstrap_servers=s.kafka, acks="all", enable_idempotence=False,
                                    linger_ms=5, request_timeout_ms=10_000)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.kafka,
            group_id=s.group_id,
            enable_auto_commit=False,
            # Offsets come from DuckDB; "none" makes an out-of-range stored offset an error we
            # see (and log loudly) instead of a silent reset.
            auto_offset_reset="none",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=min(1000, s.session_timeout_ms // 3),
            max_poll_interval_ms=max(60_000, s.session_timeout_ms),
            rebalance_timeout_ms=s.session_timeout_ms,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            metadata_max_age_ms=30_000,
        )
        return producer, consumer

    async def _start_kafka_clients(self) -> None:
        """Start producer and consumer; retry the retriable (broker not up yet) with jittered
        backoff for `connect_timeout_s`, then fail with a message naming the broker."""
        deadline = time.monotonic() + self.settings.connect_timeout_s
        delay_s = 0.2
        while True:
            try:
                await self._producer.start()
                await self._consumer.start()
                return
            except KafkaError as exc:
                for client in (self._consumer, self._producer):
                    with contextlib.suppress(Exception):
                        await client.stop()
                retriable = getattr(exc, "retriable", False) or isinstance(exc, KafkaConnectionError)
                if not retriable or time.monotonic() + delay_s > deadline:
                    raise PodwatchError(f"cannot reach Kafka at {self.settings.kafka}: {exc}") from None
                log.warning("Kafka not reachable yet; retrying", extra=fields(kafka=self.settings.kafka, error=str(exc)))
                await asyncio.sleep(delay_s * random.uniform(0.5, 1.5))
                delay_s = min(delay_s * 2, 5.0)
                self._producer, self._consumer = self._make_clients()

    async def _wait_for_partitions(self) -> set[int]:
        deadline = time.monotonic() + 30
        while True:
            await self._consumer.topics()
            partitions = self._consumer.partitions_for_topic(self.settings.topic)
            if partitions:
                return partitions
            if time.monotonic() > deadline:
                raise KafkaError(f"topic {self.settings.topic} has no partitions after 30 s")
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        """Finish the batch being written, then close Kafka clients (idempotent)."""
        if self._stopped:  # a second caller waits for the first to finish
            await self._stop_done.wait()
            return
        self._stopped = True
        self._stop.set()
        if self._running:  # let run() finish its current batch (it checks the stop flag each loop)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._run_finished.wait(), 30)
        with contextlib.suppress(Exception):
            await self._drain_write()
        if self._write_cursor is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._flush_latest, self._write_cursor)
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        if self._write_cursor is not None:
            with contextlib.suppress(Exception):
                self._write_cursor.close()
        self._stop_done.set()
        log.info("DuckDB sink stopped", extra=fields(points=self.stats.points, dead_letters=self.stats.dead_letters))

    @property
    def _site_to_record(self) -> str | None:
        return self._own_site

    @property
    def running(self) -> bool:
        return self._running

    # ------------------------------------------------------------------ offsets
    def _stored_offsets(self) -> dict[int, int]:
        cur = self.db.cursor()
        try:
            rows = cur.execute('SELECT "partition", next_offset FROM ingest_offsets WHERE topic = ?',
                               [self.settings.topic]).fetchall()
        finally:
            cur.close()
        return {int(p): int(o) for p, o in rows}

    async def _seek_assigned(self, tps: list[TopicPartition]) -> None:
        await self._drain_write()
        self._keep_partition_state({tp.partition for tp in tps})
        stored = self._stored_offsets()
        for tp in tps:
            if tp.partition in stored:
                self._consumer.seek(tp, stored[tp.partition])
            else:
                await self._consumer.seek_to_beginning(tp)
        log.info("partitions assigned; positions from DuckDB",
                 extra=fields(partitions=[tp.partition for tp in tps], stored={p: stored.get(p) for p in (tp.partition for tp in tps)}))

    async def _reset_to_earliest(self, tp: TopicPartition, stored: int, end: int | None) -> None:
        self.stats.topic_resets += 1
        self.health.inc("errors")
        log.error(
            "STORED OFFSET IS BEYOND THE END OF THE PARTITION: the topic was recreated (a broker restart with "
            "memory storage does this). Re-reading it from the earliest offset; readings already stored are "
            "skipped by (device, seq).",
            extra=fields(topic=tp.topic, partition=tp.partition, stored_offset=stored, partition_end=end),
        )
        await self._consumer.seek_to_beginning(tp)

    async def _update_lag(self) -> None:
        consumer = self._consumer
        for tp in list(consumer.assignment()):
            highwater = consumer.highwater(tp)  # Tansu's end_offsets() is wrong; the fetch's HW is right
            if highwater is None:
                continue
            try:
                position = await consumer.position(tp)
            except KafkaError:
                continue
            if position > highwater:
                await self._reset_to_earliest(tp, position, highwater)
                continue
            self.stats.lag[tp.partition] = highwater - position
        self.health.set("lag", float(self.stats.total_lag))

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        """Consume until `stop()`. A failed DuckDB write stops the sink (raises): on restart the
        dedup state and positions are rebuilt from the database, so nothing is lost."""
        consumer = self._consumer
        s = self.settings
        self._running = True
        self._run_finished.clear()
        try:
            while not self._stop.is_set():
                try:
                    data = await self._fetch_batch()
                except OffsetOutOfRangeError as exc:
                    for tp, offset in (exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}).items():
                        await self._reset_to_earliest(tp, offset, consumer.highwater(tp))
                    continue
                except KafkaError as exc:
                    self.health.inc("errors")
                    log.warning("Kafka fetch failed; retrying", extra=fields(error=repr(exc)))
                    await asyncio.sleep(0.5)
                    continue
                if data:
                    await self._handle(data)
                await self._update_lag()
                if self._pending_write is not None and self._pending_write.done():
                    await self._drain_write()  # surfaces a failed write now, not at the next batch
                self.stats.note_progress()
                await self._maybe_maintain()
            await self._drain_write()
        finally:
            self._running = False
            self._run_finished.set()

    async def _fetch_batch(self) -> dict[TopicPartition, list]:
        """One fetch, topped up with whatever is already buffered (up to max_batch_messages):
        bigger transactions amortise the per-commit costs while the previous write runs."""
        s = self.settings
        consumer = self._consumer
        data = await consumer.getmany(timeout_ms=s.fetch_timeout_ms, max_records=s.max_batch_messages)
        count = sum(len(v) for v in data.values())
        while data and count < s.max_batch_messages and self._pending_write is not None and not self._pending_write.done():
            more = await consumer.getmany(timeout_ms=0, max_records=s.max_batch_messages - count)
            if not more:
                await asyncio.sleep(0.005)
                continue
            for tp, records in more.items():
                data.setdefault(tp, []).extend(records)
                count += len(records)
        return data

    async def _handle(self, data: dict[TopicPartition, list]) -> None:
        started = time.perf_counter()
        values: list[bytes | None] = []
        next_offsets: dict[int, int] = {}
        parts = [(tp, records) for tp, records in data.items() if records]
        for tp, records in parts:
            values.extend(map(_RECORD_VALUE, records))
            next_offsets[tp.partition] = records[-1].offset + 1
        if not values:
            return
        self.stats.messages += len(values)
        self.health.inc("received", len(values))
        batch = decode_messages(values)
        if self._own_site is None and len(batch.sites) == 1:
            (self._own_site,) = batch.sites
            log.info("this DuckDB file holds site %s (its first readings)", self._own_site)
        if batch.sites and (self._own_site is None or not batch.sites <= {self._own_site}):
            batch = self._drop_foreign_sites(values, batch)
        if batch.rejected:
            # (partition, offset) per message is needed only for dead letters
            origins = [(tp, r.offset) for tp, records in parts for r in records]
            await self._send_dead_letters(batch, values, origins)
        outcome = self._dedup.check(batch.devices, batch.seqs, batch.ts_ms)
        if outcome.duplicates or outcome.too_old:
            self.stats.duplicates += outcome.duplicates
            self.stats.too_old += outcome.too_old
            self.health.inc("dropped", outcome.duplicates + outcome.too_old)
        dedup_rows = self._dedup.state_rows(outcome.changed_devices)
        newest_ms = _newest_per_partition(parts, batch.msg_index, batch.ts_ms)
        # One write at a time, in order: wait for the previous batch before starting this one.
        await self._drain_write()
        self._pending_write = asyncio.create_task(
            self._write(batch, outcome.keep, dedup_rows, next_offsets, int(outcome.keep.sum()), started, newest_ms))

    def _drop_foreign_sites(self, values: list, batch: DecodedBatch) -> DecodedBatch:
        """One DuckDB file holds one site: device ids repeat across sites (`cdu-m1` exists in
        many), so another site's readings would merge into this site's series. They become dead
        letters naming both sites. Without a site file the first reading's site claims the file.
        Slow path (parses the accepted messages once more): only when a batch carries a site
        other than this file's, which is a deployment mistake to fix, not a steady state."""
        accepted = batch.msg_index.tolist()
        msg_sites = [orjson.loads(values[i]).get("site") for i in accepted]
        if self._own_site is None:
            self._own_site = msg_sites[0]
            log.info("this DuckDB file holds site %s (its first readings)", self._own_site)
        own = self._own_site
        keep = [i for i, site in zip(accepted, msg_sites) if site == own]
        foreign = [(i, site) for i, site in zip(accepted, msg_sites) if site != own]
        if not foreign:
            return batch
        log.warning("readings of another site in this site's topic: sent to dead letters; give each site its own "
                    "topic (or consumer) and DuckDB file", extra=fields(site=own, other_sites=sorted(
                        {str(site) for _, site in foreign}), messages=len(foreign)))
        positions = np.asarray(keep, dtype=np.int64)
        kept = decode_messages([values[i] for i in keep])
        kept.msg_index = positions[kept.msg_index] if len(kept.msg_index) else kept.msg_index
        rejected = list(batch.rejected) + [Rejected(int(positions[r.index]), r.reason) for r in kept.rejected]
        rejected += [Rejected(i, f"site {site!r} is not the site of this DuckDB file ({own!r}); one file holds one "
                                 f"site") for i, site in foreign]
        kept.rejected = sorted(rejected, key=attrgetter("index"))
        kept.sites = kept.sites & {own}
        return kept

    async def _drain_write(self) -> None:
        task, self._pending_write = self._pending_write, None
        if task is not None:
            await task

    async def _write(self, batch: DecodedBatch, keep: np.ndarray, dedup_rows, next_offsets: dict[int, int],
                     readings: int, started: float, newest_ms: dict[int, int]) -> None:
        for partition, ts_ms in newest_ms.items():  # what this batch brings, noted before maintenance
            self._partition_newest_ms[partition] = max(ts_ms, self._partition_newest_ms.get(partition, ts_ms))
        now = time.monotonic()
        maintain = now - self._last_maintain >= MAINTAIN_EVERY_S
        if maintain:
            self._last_maintain = now
        rows = await asyncio.to_thread(self._write_batch, batch, keep, dedup_rows, next_offsets,
                                       now if maintain else None)
        latency = time.perf_counter() - started
        self.stats.observe_latency(latency)
        self.stats.points += rows.height
        self.stats.readings += readings
        self.stats.batches += 1
        self.stats.last_commit_monotonic = time.monotonic()
        self.health.inc("sent", rows.height)
        if self._listeners and rows.height:
            await self._notify(rows)

    def _write_transaction(self, rows: pl.DataFrame, dedup_rows, next_offsets: dict[int, int]) -> None:
        """One transaction: the batch's rows, new names, dedup state, the consumer's next offsets
        (and rollup buckets the late rows touched). Runs in the worker thread; the common case is
        one `execute` of all its statements, so the thread takes the GIL back a few times per
        batch, not once per statement (each take can wait a switch interval behind the loop)."""
        cur = self._write_cursor
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        tables = {"_batch_offsets": pa.table({
            "topic": [self.settings.topic] * len(next_offsets),
            "partition": pa.array(list(next_offsets), pa.int32()),
            "next_offset": pa.array(list(next_offsets.values()), pa.int64()),
            "updated_at": pa.array([now] * len(next_offsets), pa.timestamp("us")),
        })}
        statements = []
        new_devices: list[tuple[int, str]] = []
        new_metrics: list[tuple[int, str]] = []
        late = None
        if rows.height:
            device_ids, new_devices = self._device_ids.map_categorical(rows["device"])
            metric_ids, new_metrics = self._metric_ids.map_categorical(rows["metric"])
            tables["_batch_rows"] = pa.table({
                "ts": rows["ts"].to_arrow(), "device_id": pa.array(device_ids, pa.uint32()),
                "metric_id": pa.array(metric_ids, pa.uint32()), "value": rows["value"].to_arrow(),
                "quality": rows["quality"].to_arrow()})
            statements.append("INSERT INTO sample_rows SELECT * FROM _batch_rows")
            # seq is stored once per reading (reading_rows), not on each of its points
            tables["_batch_readings"] = reading_rows_table(rows["ts"], device_ids, rows["seq"])
            statements.append("INSERT INTO reading_rows SELECT * FROM _batch_readings")
            mark_1m = self._rollup_marks.get("rollup_1m")
            if mark_1m is not None and rows["ts"].min() < mark_1m:
                late = rows.filter(pl.col("ts") < mark_1m)["ts"]
        for table, new in (("device_ids", new_devices), ("metric_ids", new_metrics)):
            if new:
                tables[f"_new_{table}"] = pa.table({"id": pa.array([i for i, _ in new], pa.uint32()),
                                                    "name": [name for _, name in new]})
                statements.insert(0, f"INSERT INTO {table} SELECT id, name FROM _new_{table}")
        if dedup_rows:
            tables["_batch_state"] = pa.table({
                "device": [r[0] for r in dedup_rows],
                "max_seq": pa.array([r[1] for r in dedup_rows], pa.uint64()),
                "max_ts": pa.array([r[2] for r in dedup_rows], pa.timestamp("ms")),
            })
            statements.append("INSERT OR REPLACE INTO dedup_state SELECT device, max_seq, max_ts FROM _batch_state")
        site = self._site_to_record
        if site is not None and site != self._site_recorded:
            tables["_batch_site"] = pa.table({"site": [site]})
            statements.append("INSERT OR IGNORE INTO podwatch_meta SELECT 'site', site FROM _batch_site")
        statements.append("INSERT OR REPLACE INTO ingest_offsets SELECT * FROM _batch_offsets")
        try:
            # execute() first: it also finishes a result an earlier caller left unread, which
            # register() would refuse
            cur.execute("BEGIN TRANSACTION")
            for name, table in tables.items():
                cur.register(name, table)
            if late is None:
                cur.execute("; ".join(statements) + "; COMMIT")
            else:
                for statement in statements:
                    cur.execute(statement)
                recompute_buckets(cur, late.min(), late.max(), self._rollup_marks,
                                  raw_kept_since=self._raw_kept_since(self._rollup_marks["rollup_1m"]))
                cur.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                cur.execute("ROLLBACK")
            self._device_ids.forget(new_devices)
            self._metric_ids.forget(new_metrics)
            raise
        finally:
            for name in tables:
                with contextlib.suppress(Exception):
                    cur.unregister(name)
        if site is not None:
            self._site_recorded = site
        if rows.height:
            self._remember_latest(rows)

    def _raw_kept_since(self, newest_hint: datetime) -> datetime | None:
        days = self.settings.storage.raw_retention_days
        if days is None:
            return None
        newest = max(newest_hint, datetime.fromtimestamp(self._dedup.newest_ts_ms() / 1000, timezone.utc).replace(tzinfo=None)
                     if self._dedup.newest_ts_ms() else newest_hint)
        return newest - timedelta(days=days)

    def _remember_latest(self, rows: pl.DataFrame) -> None:
        # rows are ordered by (device, ts): the last row of each series is its newest
        newest = (rows.group_by(["device", "metric"]).last()
                  .select(pl.col("device").cast(pl.String), pl.col("metric").cast(pl.String), "ts", "value", "quality"))
        with self._latest_lock:
            if self._latest_pending is not None:
                newest = pl.concat([self._latest_pending, newest]).sort("ts").group_by(["device", "metric"]).last()
            self._latest_pending = newest

    def _flush_latest(self, cur) -> None:
        with self._latest_lock:
            pending, self._latest_pending = self._latest_pending, None
        if pending is None or pending.height == 0:
            return
        cur.register("_latest_rows", pending.to_arrow())
        try:
            cur.execute(LATEST_UPSERT.format(source="_latest_rows"))
        finally:
            cur.unregister("_latest_rows")

    def _refresh_latest_from_samples(self, cur) -> None:
        newest = cur.execute("SELECT max(max_ts) FROM dedup_state").fetchone()[0]
        if newest is None:
            return
        cur.execute(LATEST_UPSERT.format(
            source="(SELECT * FROM samples WHERE ts >= ?::TIMESTAMP - INTERVAL 60 SECOND)"), [newest])

    async def _notify(self, rows: pl.DataFrame) -> None:
        view = rows.select(pl.col("ts").dt.replace_time_zone("UTC"), pl.col("device").cast(pl.String),
                           pl.col("metric").cast(pl.String), "value", "quality")
        for fn in self._listeners:
            try:
                result = fn(view)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # a broken check must not stop ingest; it is counted and logged
                self.stats.listener_errors += 1
                self.health.inc("errors")
                log.exception("batch listener failed", extra=fields(listener=getattr(fn, "__name__", repr(fn))))

    async def _send_dead_letters(self, batch: DecodedBatch, values: list, origins: list) -> None:
        futures = []
        for rej in batch.rejected:
            tp, offset = origins[rej.index]
            letter = dead_letter(values[rej.index] or b"", rej.reason, "duckdb_sink", topic=tp.topic,
                                 partition=tp.partition, offset=offset)
            futures.append(await self._producer.send(self.settings.dead_letter_topic, encode_dead_letter(letter),
                                                     key=b"duckdb_sink"))
            log.warning("message sent to dead letters", extra=fields(partition=tp.partition, offset=offset, reason=rej.reason))
        # The offsets that pass these messages are committed only after the dead letters are acked.
        await asyncio.gather(*futures)
        self.stats.dead_letters += len(batch.rejected)
        self.health.inc("errors", len(batch.rejected))
        self.health.set("dead_letters", float(self.stats.dead_letters))

    async def _maybe_maintain(self) -> None:
        """Maintenance when no batch is being written (while batches flow, `_write` does it)."""
        now = time.monotonic()
        if now - self._last_maintain < MAINTAIN_EVERY_S or self._pending_write is not None:
            return
        self._last_maintain = now
        await asyncio.to_thread(self._maintain, now)

    def _write_batch(self, batch: DecodedBatch, keep: np.ndarray, dedup_rows, next_offsets: dict[int, int],
                     maintain_at: float | None) -> pl.DataFrame:
        """The worker thread's part of a batch: build its long rows (numpy/polars, mostly without
        the GIL), write them in one transaction with the offsets, then - when due - maintenance.
        The event loop meanwhile fetches and decodes the next batch."""
        rows = select_readings(batch, keep) if batch.n_readings else batch.rows
        self._write_transaction(rows, dedup_rows, next_offsets)
        if maintain_at is not None:
            self._maintain(maintain_at)
        return rows

    def _maintain(self, now: float) -> None:
        """Flush latest values, advance rollups when a bucket closed, apply retention every
        `retention_every_s`. Runs in the worker thread, never beside a write."""
        storage = self.settings.storage
        cur = self._write_cursor
        self._flush_latest(cur)
        if advance_rollups(cur, storage.rollup_lateness_s + self._partition_skew_s()):
            self._rollup_marks = done_until(cur)
        if now - self._last_retention >= storage.retention_every_s:
            self._last_retention = now
            apply_retention(cur, storage)

    def _keep_partition_state(self, assigned: set[int]) -> None:
        """Partitions another group member now reads must not hold rollups back."""
        self._partition_newest_ms = {p: ts for p, ts in self._partition_newest_ms.items() if p in assigned}

    def _partition_skew_s(self) -> float:
        """How far the partitions still being caught up are behind the newest reading (s).

        Partitions are consumed at different speeds (a fetch can bring 16 MB of one partition),
        so while catching up one partition's readings can be minutes ahead of another's. A bucket
        is closed only when every partition with lag has passed it (plus the usual lateness):
        closing it earlier makes the lagging partition's rows "late" and its buckets are
        recomputed over and over. Caught-up partitions (lag 0) do not hold rollups back."""
        newest = self._partition_newest_ms
        if not newest:
            return 0.0
        lagging = [ts for partition, ts in newest.items() if self.stats.lag.get(partition, 0) > 0]
        if not lagging:
            return 0.0
        return max(0.0, (max(newest.values()) - min(lagging)) / 1000.0)

    # ------------------------------------------------------------------ health
    def health_problems(self) -> list[str]:
        """Reasons the sink is unhealthy (empty list: healthy). Used by /healthz."""
        problems = []
        if not self._running:
            problems.append("sink is not running")
        lag = self.stats.total_lag
        last = self.stats.last_commit_monotonic or self.stats.started_monotonic
        idle_s = time.monotonic() - last
        if lag > 0 and idle_s > self.settings.stuck_after_s:
            problems.append(f"ingest stuck: lag {lag} messages and no batch committed for {idle_s:.0f} s")
        if lag > self.settings.lag_limit_messages and self.stats.lag_growing():
            problems.append(f"lag {lag} messages exceeds {self.settings.lag_limit_messages} and keeps growing")
        return problems


def _newest_per_partition(parts: list[tuple[TopicPartition, list]], msg_index: np.ndarray,
                          ts_ms: list[int]) -> dict[int, int]:
    """Newest reading time (epoch ms) per partition among a batch's accepted messages."""
    if not len(msg_index):
        return {}
    ends = np.cumsum([len(records) for _, records in parts])
    partition_of_message = np.searchsorted(ends, msg_index, side="right")
    ts = np.asarray(ts_ms, dtype=np.int64)
    newest = {}
    for k, (tp, _) in enumerate(parts):
        mine = ts[partition_of_message == k]
        if mine.size:
            newest[tp.partition] = int(mine.max())
    return newest


async def run_ingest(db_path: str, settings: SinkSettings, site_path: str | None = None) -> None:
    """`podwatch ingest`: open the file, load topology, run the sink until SIGINT/SIGTERM."""
    import signal

    db = Database(db_path)
    try:
        if site_path:
            from podwatch.storage.topology import load_topology_file

            load_topology_file(db.connection, site_path)
        sink = DuckDBSink(db, settings)
        loop = asyncio.get_running_loop()
        try:
            await sink.start()
        except BaseException:
            await sink.stop()
            raise
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(sink.stop()))
        try:
            await sink.run()
        finally:
            await sink.stop()
    finally:
        db.close()


def _main() -> None:  # `python -m podwatch.storage.sink --kafka H:P --db FILE [--no-group]`
    import argparse

    from podwatch.logs import configure_logging

    parser = argparse.ArgumentParser(description="Kafka -> DuckDB sink")
    parser.add_argument("--kafka", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--topic", default=TELEMETRY_TOPIC)
    parser.add_argument("--dead-letter-topic", default=DEADLETTER_TOPIC)
    parser.add_argument("--group", default="podwatch-sink", help="consumer group; 'none' to assign partitions directly")
    parser.add_argument("--max-batch", type=int, default=20_000)
    parser.add_argument("--site")
    args = parser.parse_args()
    configure_logging()
    settings = SinkSettings(kafka=args.kafka, topic=args.topic, dead_letter_topic=args.dead_letter_topic,
                            group_id=None if args.group == "none" else args.group, max_batch_messages=args.max_batch)
    asyncio.run(run_ingest(args.db, settings, args.site))


if __name__ == "__main__":
    _main()
