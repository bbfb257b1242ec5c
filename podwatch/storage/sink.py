"""The exactly-once Kafka -> DuckDB sink (`podwatch ingest`): the writer of the DuckDB file.

Lifecycle: `await sink.start()` (loads dedup state, starts the Kafka side), `await sink.run()`
(until `stop()`), `await sink.stop()` (idempotent: finishes the batch being written, stops the
Kafka side). Or `async with DuckDBSink(...) as sink: await sink.run()`.

Two halves. The Kafka side (`fetch.py`: consumer, positions, decoding, site check, dead
letters) runs in a second OS process by default (`SinkSettings.decode_process`, see
`fetch_process.py`) or in this event loop; this process keeps dedup and the writer, because
it owns the file (the API and the analytics listeners read the same connection).

Exactly once, in effect:
- each batch's rows and the consumer's next offset per partition are written in ONE DuckDB
  transaction (`ingest_offsets`); on assignment the Kafka side asks `_on_assigned`, which
  answers with the stored offsets after every batch handed over before is committed, so a
  crash at any instant (of either process) re-reads exactly what was not committed. Kafka's
  own committed offsets are never used.
- readings already stored are dropped by (device, seq) (`dedup.py`, state written in the same
  transaction): producers retry without idempotence and a recreated topic is re-read.
- a stored offset beyond the partition's end means the topic was recreated (a Tansu restart
  loses everything): logged loudly, the partition is re-read from the earliest offset.
- undecodable messages go to `podwatch.deadletter.v1` with the reason; ingest continues. Dead
  letters are acked before the batch whose offsets pass them is handed to the writer.

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
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from podwatch.health import REGISTRY, ComponentHealth
from podwatch.logs import fields
from podwatch.storage.db import Database
from podwatch.storage.decode import DecodedBatch, latest_rows_of_layout, select_readings
from podwatch.storage.dedup import DEFAULT_WINDOW, SeqDeduper
from podwatch.storage.fetch import FetchedBatch, Fetcher, FetchReport
from podwatch.storage import fetch_process
from podwatch.storage.fetch_process import FetchProcess
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
from podwatch.stream.topics import DEADLETTER_TOPIC, TELEMETRY_TOPIC

log = logging.getLogger(__name__)

BatchListener = Callable[[pl.DataFrame], Any | Awaitable[Any]]
MAINTAIN_EVERY_S = 1.0  # latest-value flush, rollup and retention check period
_EPOCH = datetime(1970, 1, 1)  # DuckDB TIMESTAMPs are naive UTC
_ONE_MS = timedelta(milliseconds=1)
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
    batch_fill_ms: int = Field(100, ge=0, description="Keep filling a batch with what arrives this long "
                                                      "(up to max_batch_messages) before handing it to the writer")
    session_timeout_ms: int = Field(10_000, gt=0)
    connect_timeout_s: float = Field(30.0, gt=0, description="Keep retrying an unreachable broker at start this long")
    dedup_window: int = Field(DEFAULT_WINDOW, gt=0, description="Readings per device remembered for dedup")
    stuck_after_s: float = Field(30.0, gt=0, description="/healthz fails when lag > 0 and nothing committed this long")
    lag_limit_messages: int = Field(1_000_000, gt=0, description="/healthz fails when lag exceeds this and keeps growing")
    storage: StorageSettings = Field(default_factory=StorageSettings)
    decode_process: bool = Field(
        True, description="Consume and decode in a second OS process (the fetch process) while this process "
                          "writes DuckDB: the sink's Python work runs on two cores instead of one. False: "
                          "everything in this process's event loop (and its write thread).")
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
    fetch_restarts: int = 0  # the fetch process died and was restarted
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
    kafka_answered_ms: int | None = None  # wall ms of the broker's last fetch answer (from the fetch reports)
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


class DuckDBSink:
    """Consume telemetry into DuckDB exactly once. See the module docstring for the contract."""

    def __init__(self, db: Database, settings: SinkSettings, health: ComponentHealth | None = None) -> None:
        self.db = db
        self.settings = settings
        self.health = health or REGISTRY.component("duckdb_sink")
        self.stats = SinkStats()
        self._dedup = SeqDeduper(settings.dedup_window)
        self._listeners: list[BatchListener] = []
        # The Kafka side: a Fetcher in this event loop, or the fetch process (decode_process)
        self._fetcher: Fetcher | None = None
        self._fetch_process: FetchProcess | None = None
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
        # readings. Readings of any other site are dead letters (see `Fetcher._drop_foreign_sites`).
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
        forkserver = asyncio.create_task(asyncio.to_thread(fetch_process.prepare)) if s.decode_process else None
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
        if forkserver is not None:
            await forkserver
            self._fetch_process = FetchProcess(s, lambda: self._own_site, self._on_assigned, self._on_revoked)
            await self._fetch_process.start()
        else:
            self._fetcher = Fetcher(s, self._own_site, self._on_assigned, self._on_revoked, self._write_busy)
            await self._fetcher.start()
        log.info("DuckDB sink started", extra=fields(db=self.db.path, kafka=s.kafka, topic=s.topic, group=s.group_id,
                                                     fetch_pid=self._fetch_process.pid if self._fetch_process else None))

    async def stop(self) -> None:
        """Finish the batch being written, then stop the Kafka side (idempotent)."""
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
        for side in (self._fetch_process, self._fetcher):
            if side is not None:
                with contextlib.suppress(Exception):
                    await side.stop()
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

    async def _on_assigned(self, partitions: list[int]) -> dict[int, int]:
        """The Kafka side got `partitions`: their next offsets as stored in DuckDB, answered
        after every batch handed over before is committed (so they are exact)."""
        await self._drain_write()
        self._keep_partition_state(set(partitions))
        stored = self._stored_offsets()
        return {p: stored[p] for p in partitions if p in stored}

    async def _on_revoked(self) -> None:
        await self._drain_write()

    def _write_busy(self) -> bool:
        return self._pending_write is not None and not self._pending_write.done()

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        """Consume until `stop()`. A failed DuckDB write stops the sink (raises): on restart the
        dedup state and positions are rebuilt from the database, so nothing is lost."""
        self._running = True
        self._run_finished.clear()
        try:
            while not self._stop.is_set():
                if self._fetch_process is not None:
                    report = await self._fetch_process.next(self.settings.fetch_timeout_ms / 1000)
                    if self._fetch_process.restarts != self.stats.fetch_restarts:  # it died: an error
                        self.health.inc("errors", self._fetch_process.restarts - self.stats.fetch_restarts)
                        self.stats.fetch_restarts = self._fetch_process.restarts
                else:
                    report = await self._fetcher.poll()
                if report is not None:
                    self._note_report(report)
                    if report.batch is not None:
                        await self._handle(report.batch)
                if self._pending_write is not None and self._pending_write.done():
                    await self._drain_write()  # surfaces a failed write now, not at the next batch
                self.stats.note_progress()
                await self._maybe_maintain()
            await self._drain_write()
        finally:
            self._running = False
            self._run_finished.set()

    def _note_report(self, report: FetchReport) -> None:
        self.stats.lag = report.lag
        if report.answered_ms is not None:
            self.stats.kafka_answered_ms = max(self.stats.kafka_answered_ms or 0, report.answered_ms)
        self.health.set("lag", float(self.stats.total_lag))
        if report.new_topic_resets or report.new_fetch_errors:
            self.stats.topic_resets += report.new_topic_resets
            self.health.inc("errors", report.new_topic_resets + report.new_fetch_errors)

    async def _handle(self, fetched: FetchedBatch) -> None:
        """Dedup a fetched batch, then start its write (after the previous one finished)."""
        self.stats.messages += fetched.messages
        self.health.inc("received", fetched.messages)
        if self._own_site is None and fetched.own_site is not None:
            self._own_site = fetched.own_site
        if fetched.dead_letters:
            self.stats.dead_letters += fetched.dead_letters
            self.health.inc("errors", fetched.dead_letters)
            self.health.set("dead_letters", float(self.stats.dead_letters))
        batch = fetched.batch
        outcome = self._dedup.check(batch.devices, batch.seqs, batch.ts_ms)
        if outcome.duplicates or outcome.too_old:
            self.stats.duplicates += outcome.duplicates
            self.stats.too_old += outcome.too_old
            self.health.inc("dropped", outcome.duplicates + outcome.too_old)
        dedup_rows = self._dedup.state_rows(outcome.changed_devices)
        # One write at a time, in order: wait for the previous batch before starting this one.
        await self._drain_write()
        self._pending_write = asyncio.create_task(
            self._write(batch, outcome.keep, dedup_rows, fetched.next_offsets, int(outcome.keep.sum()),
                        fetched.fetched_at, fetched.newest_ms))

    async def _drain_write(self) -> None:
        task, self._pending_write = self._pending_write, None
        if task is not None:
            await task

    async def _write(self, batch: DecodedBatch, keep: np.ndarray, dedup_rows, next_offsets: dict[int, int],
                     readings: int, fetched_at: float, newest_ms: dict[int, int]) -> None:
        for partition, ts_ms in newest_ms.items():  # what this batch brings, noted before maintenance
            self._partition_newest_ms[partition] = max(ts_ms, self._partition_newest_ms.get(partition, ts_ms))
        now = time.monotonic()
        maintain = now - self._last_maintain >= MAINTAIN_EVERY_S
        if maintain:
            self._last_maintain = now
        points, rows = await asyncio.to_thread(self._write_batch, batch, keep, dedup_rows, next_offsets,
                                               now if maintain else None)
        latency = max(0.0, time.time() - fetched_at)
        self.stats.observe_latency(latency)
        self.stats.points += points
        self.stats.readings += readings
        self.stats.batches += 1
        self.stats.last_commit_monotonic = time.monotonic()
        self.health.inc("sent", points)
        if rows is not None and rows.height:
            await self._notify(rows)

    def _write_transaction(self, batch: DecodedBatch, keep: np.ndarray, dedup_rows, next_offsets: dict[int, int]) -> int:
        """One transaction: the kept readings' rows and `reading_rows`, new names, dedup state,
        the consumer's next offsets (and rollup buckets the late rows touched). Runs in the
        worker thread; the common case is one `execute` of all its statements, so the thread
        takes the GIL back a few times per batch, not once per statement (each take can wait a
        switch interval behind the loop). Columns go from the batch's numpy layout straight to
        Arrow (no data frame on this path). Returns the points written."""
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
        points = 0
        if batch.n_readings and keep.any():
            layout = batch.layout
            kept = slice(None) if keep.all() else np.flatnonzero(keep[layout.reading])
            reading = layout.reading[kept]
            points = len(reading)
            device_ids, new_devices = self._device_ids.ids_of(batch.devices)
            metric_ids, new_metrics = self._metric_ids.ids_of(layout.metric_names.to_list())
            ts_ms = np.asarray(batch.ts_ms, dtype=np.int64)
            row_ts = ts_ms[reading]
            tables["_batch_rows"] = pa.table({
                "ts": pa.array(row_ts, pa.timestamp("ms")), "device_id": pa.array(device_ids[reading], pa.uint32()),
                "metric_id": pa.array(metric_ids[layout.metric_code[kept]], pa.uint32()),
                "value": pa.array(layout.value[kept], pa.float64(), from_pandas=True),  # NaN -> null
                "quality": pa.array(layout.quality[kept], pa.uint8())})
            statements.append("INSERT INTO sample_rows SELECT * FROM _batch_rows")
            # seq is stored once per reading (reading_rows), not on each of its points
            readings = np.flatnonzero(keep)
            tables["_batch_readings"] = reading_rows_table(
                ts_ms[readings], device_ids[readings], np.asarray(batch.seqs, dtype=np.uint64)[readings],
                batch.point_counts[readings])
            statements.append("INSERT INTO reading_rows SELECT * FROM _batch_readings")
            mark_1m = self._rollup_marks.get("rollup_1m")
            if mark_1m is not None:
                late_ms = row_ts[row_ts < (mark_1m - _EPOCH) // _ONE_MS]
                if late_ms.size:
                    late = (_EPOCH + timedelta(milliseconds=int(late_ms.min())),
                            _EPOCH + timedelta(milliseconds=int(late_ms.max())))
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
                recompute_buckets(cur, late[0], late[1], self._rollup_marks,
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
        if points:
            self._remember_latest(batch, keep)
        return points

    def _raw_kept_since(self, newest_hint: datetime) -> datetime | None:
        days = self.settings.storage.raw_retention_days
        if days is None:
            return None
        newest = max(newest_hint, datetime.fromtimestamp(self._dedup.newest_ts_ms() / 1000, timezone.utc).replace(tzinfo=None)
                     if self._dedup.newest_ts_ms() else newest_hint)
        return newest - timedelta(days=days)

    def _remember_latest(self, batch: DecodedBatch, keep: np.ndarray) -> None:
        newest_rows = latest_rows_of_layout(batch, keep)
        if newest_rows is None:  # some device's readings carry different metrics: group them all
            # rows are ordered by (device, ts): the last row of each series is its newest
            newest = (select_readings(batch, keep).group_by(["device", "metric"]).last()
                      .select(pl.col("device").cast(pl.String), pl.col("metric").cast(pl.String), "ts", "value",
                              "quality"))
        else:
            layout = batch.layout
            reading = layout.reading[newest_rows]
            newest = pl.DataFrame({
                "device": layout.reading_devices.gather(reading).cast(pl.String),
                "metric": layout.metric_names.gather(layout.metric_code[newest_rows]).cast(pl.String),
                "ts": pl.Series(batch.ts_ms, dtype=pl.Int64).gather(reading).cast(pl.Datetime("ms")),
                "value": pl.Series("value", layout.value[newest_rows], nan_to_null=True),
                "quality": pl.Series(layout.quality[newest_rows], dtype=pl.UInt8)})
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

    async def _maybe_maintain(self) -> None:
        """Maintenance when no batch is being written (while batches flow, `_write` does it)."""
        now = time.monotonic()
        if now - self._last_maintain < MAINTAIN_EVERY_S or self._pending_write is not None:
            return
        self._last_maintain = now
        await asyncio.to_thread(self._maintain, now)

    def _write_batch(self, batch: DecodedBatch, keep: np.ndarray, dedup_rows, next_offsets: dict[int, int],
                     maintain_at: float | None) -> tuple[int, pl.DataFrame | None]:
        """The worker thread's part of a batch: lay out its long rows (numpy, mostly without the
        GIL), write them in one transaction with the offsets, then - when due - maintenance.
        The event loop meanwhile receives the next batch. Returns (points written, named rows for
        the batch listeners or None when there are none)."""
        points = self._write_transaction(batch, keep, dedup_rows, next_offsets)
        if maintain_at is not None:
            self._maintain(maintain_at)
        # the listeners (streaming checks) get named rows; building them costs ~1 us per message
        rows = select_readings(batch, keep) if self._listeners and points else None
        return points, rows

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
        elif self._fetch_process is not None and not self._fetch_process.alive():
            problems.append("the sink's fetch process is not running (being restarted)")
        lag = self.stats.total_lag
        last = self.stats.last_commit_monotonic or self.stats.started_monotonic
        idle_s = time.monotonic() - last
        if lag > 0 and idle_s > self.settings.stuck_after_s:
            problems.append(f"ingest stuck: lag {lag} messages and no batch committed for {idle_s:.0f} s")
        answered = self.stats.kafka_answered_ms
        silent_s = time.time() - answered / 1000 if answered else 0.0
        if self._running and silent_s > self.settings.stuck_after_s:
            # the lag keeps its last value while the broker is silent: a caught-up sink looked healthy
            problems.append(f"no answer from Kafka for {silent_s:.0f} s (broker down or unreachable); "
                            "collectors spool meanwhile")
        if lag > self.settings.lag_limit_messages and self.stats.lag_growing():
            problems.append(f"lag {lag} messages exceeds {self.settings.lag_limit_messages} and keeps growing")
        return problems


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
    parser.add_argument("--in-process", action="store_true", help="no fetch process (decode_process=False)")
    args = parser.parse_args()
    configure_logging()
    settings = SinkSettings(kafka=args.kafka, topic=args.topic, dead_letter_topic=args.dead_letter_topic,
                            group_id=None if args.group == "none" else args.group, max_batch_messages=args.max_batch,
                            decode_process=not args.in_process)
    asyncio.run(run_ingest(args.db, settings, args.site))


if __name__ == "__main__":
    _main()
