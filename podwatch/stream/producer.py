"""The telemetry producer: readings, alert events and dead letters to Kafka, acks=all, keyed,
compressed, with a durable disk spool for outages.

Contract
- `await send(reading)` returns once the reading is durable: acked by Kafka (acks=all), or
  written (and fsynced) to the spool. It returns False only when the reading was dropped, which
  is counted (`dropped`) and logged: the spool was full (its stated overflow policy), the disk
  failed, or Kafka refused the record for good (e.g. larger than max_request_size).
  `submit(reading)` is the same without waiting: a future of 1 (durable) or 0 (dropped), in order
  with every other send. Errors are classified: retriable ones (connection, timeout, leader changes, unknown) mean "Kafka is down"
  and send the record to the spool; only permanent ones drop it.
- Every wait on Kafka is bounded by `delivery_timeout_s` (aiokafka's `send_and_wait` can block
  through a whole outage): a send not acked in time is treated as an outage.
- Two modes. DIRECT: the spool is empty and Kafka answers; records go straight to aiokafka
  (concurrent sends share batches: linger_ms / max_batch_size). SPOOL: entered on the first
  failed or timed-out send (every record still in flight moves to the spool, in send order) or at
  start when Kafka is down or the spool holds data; every new record is appended to the spool
  behind the older ones. A background drainer retries with jittered exponential backoff,
  sends the oldest spooled records in batches and deletes them only after Kafka acked all of
  them; once the spool is empty after a successful drain, the producer goes back to DIRECT.
  So per-device order holds: a device's newer readings never overtake its spooled ones.
  Concurrent sends of one event-loop turn are coalesced into one group (one task, one timeout);
  groups reach aiokafka one at a time in submission order, so concurrent callers sending for
  the same device keep their order too.
- Delivery is at-least-once: a record whose ack was lost (or that aiokafka delivered after we
  gave up on it) may arrive twice; the sink drops duplicates by (device, seq). Before resending
  spooled records the drainer waits (bounded) for aiokafka to settle the records it abandoned,
  so a late original does not land behind its own resend.
- `start()` never fails because Kafka is down (collectors must start and spool); it fails only
  when the spool directory cannot be opened (e.g. another process holds it).
- `stop()` is idempotent: waits for in-flight sends (bounded), drains the spool for up to
  `stop_drain_timeout_s` if Kafka answers, flushes and closes the client; whatever is not acked
  stays in the spool for the next start.

Health (`REGISTRY.component("kafka_producer", instance)`): received (records handed in), sent
(acked by Kafka), errors, spooled, dropped, retries (failed drain rounds); gauges spool_bytes,
spool_records, spooling (1 while in SPOOL mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    CorruptRecordException,
    InvalidTopicError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    TopicAuthorizationFailedError,
)

from podwatch.errors import PodwatchError
from podwatch.health import REGISTRY, ComponentHealth
from podwatch.logs import fields
from podwatch.samples import Reading
from podwatch.stream.config import KafkaSettings
from podwatch.stream.envelope import dead_letter, encode_alert_event, encode_dead_letter, encode_reading
from podwatch.stream.spool import Spool, SpoolRecord
from podwatch.stream.topics import ALERTS_TOPIC, DEADLETTER_TOPIC, TELEMETRY_TOPIC

log = logging.getLogger(__name__)

# Errors that resending can never fix: the record is dropped (counted), never retried.
PERMANENT_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidTopicError,
                    TopicAuthorizationFailedError, ClusterAuthorizationFailedError, CorruptRecordException,
                    TypeError, ValueError)


RECREATE_CLIENT_AFTER = 5  # failed drain rounds in a row before the aiokafka client is rebuilt


def is_permanent(exc: BaseException) -> bool:
    """True for errors that a retry cannot fix. Everything else (including aiokafka's
    non-retriable `UnknownError` / `KafkaTimeoutError`, which Tansu returns around restarts and
    outages) is treated as an outage: the record is spooled and retried."""
    return isinstance(exc, PERMANENT_ERRORS)


def _jitter(delay_s: float) -> float:
    """Full +-25 % jitter so that many producers never retry in lock step."""
    return delay_s * random.uniform(0.75, 1.25)


def _retrieve(fut: asyncio.Future) -> None:
    """Done-callback: mark an abandoned future's exception as retrieved (no asyncio warning)."""
    if not fut.cancelled():
        fut.exception()


class _InFlight:
    """Records of the direct sends started in one event-loop turn (coalesced: one task and one
    timeout per group of concurrent callers), from hand-over to aiokafka until the acks or the
    spool. `waiters` = (first record index, record count, caller's future -> records durable)."""

    __slots__ = ("records", "waiters", "futures", "task", "runner", "state", "permanent", "error")

    def __init__(self) -> None:
        self.records: list[SpoolRecord] = []
        self.waiters: list[tuple[int, int, asyncio.Future]] = []
        self.futures: list[asyncio.Future] = []
        self.task: asyncio.Task | None = None  # hands records to aiokafka and waits for the acks
        self.runner: asyncio.Task | None = None  # bounds `task` by delivery_timeout_s, then resolves
        self.state = "inflight"  # -> acked | spooled
        self.permanent: dict[int, BaseException] = {}  # record index -> error no retry can fix
        self.error: BaseException | None = None


class TelemetryProducer:
    """Readings, alert events and dead letters to Kafka with a disk spool; `async with` works.

    Lifecycle: `await start()` once, then `send*` from any number of tasks, then `await stop()`
    (idempotent). `send*` after `stop()` raises PodwatchError."""

    def __init__(self, settings: KafkaSettings, spool_dir: str | Path, site: str = "", *,
                 health_instance: str | None = None, telemetry_topic: str = TELEMETRY_TOPIC,
                 alerts_topic: str = ALERTS_TOPIC, deadletter_topic: str = DEADLETTER_TOPIC) -> None:
        self.settings = settings
        self.spool_dir = Path(spool_dir)
        self.site = site
        self.telemetry_topic = telemetry_topic
        self.alerts_topic = alerts_topic
        self.deadletter_topic = deadletter_topic
        self.health: ComponentHealth = REGISTRY.component("kafka_producer", health_instance or site or "default")
        self._spool: Spool | None = None
        self._kafka: AIOKafkaProducer | None = None
        self._direct = False
        self._kafka_ok = False  # last contact with Kafka succeeded
        self._inflight: dict[_InFlight, None] = {}  # insertion-ordered set: send order
        self._pending: list[tuple[list[SpoolRecord], asyncio.Future]] = []  # direct sends of this loop turn
        self._start_scheduled = False
        self._flush_waiters: list[tuple[asyncio.Future, int]] = []  # spooled sends waiting for an fsync
        self._flush_task: asyncio.Task | None = None
        self._enqueue_lock = asyncio.Lock()  # FIFO: groups reach aiokafka in submission order
        self._abandoned: set[asyncio.Future] = set()
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()  # cuts a drain backoff short (stop)
        self._drained = asyncio.Event()
        self._drainer: asyncio.Task | None = None
        self._started = False
        self._closing = False
        self._stop_task: asyncio.Task | None = None
        self._outage_started: float | None = None
        self._drain_failures = 0
        self._health_logger: asyncio.Task | None = None
        self._unconfirmed: tuple | None = None  # (SpoolBatch, futures, refused) of the last timed-out drain

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> "TelemetryProducer":
        if self._started:
            return self
        s = self.settings
        self._spool = Spool(self.spool_dir, max_bytes=s.spool_max_bytes, segment_bytes=s.spool_segment_bytes,
                            fsync=s.spool_fsync)
        self._started = True
        if self._spool.truncated_bytes:
            self.health.inc("errors")
        if await self._ensure_kafka():
            self._kafka_ok = True
            self._direct = self._spool.pending_records == 0
        else:
            self._outage_started = time.monotonic()
            log.warning("Kafka is unreachable at start; readings go to the spool until it answers",
                        extra=fields(bootstrap=s.bootstrap_servers, spool=str(self.spool_dir)))
        self._update_gauges()
        self._drainer = asyncio.get_running_loop().create_task(self._drain_loop(), name="kafka-spool-drainer")
        if s.health_log_interval_s > 0:
            self._health_logger = asyncio.get_running_loop().create_task(self._log_health_every(s.health_log_interval_s))
        log.info("Kafka producer started", extra=fields(bootstrap=s.bootstrap_servers, mode=self.mode,
                 spooled_records=self._spool.pending_records))
        return self

    async def __aenter__(self) -> "TelemetryProducer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def mode(self) -> str:
        """'direct' or 'spool'."""
        return "direct" if self._direct else "spool"

    @property
    def spool_records(self) -> int:
        return self._spool.pending_records if self._spool else 0

    async def wait_drained(self, timeout_s: float) -> bool:
        """True once the spool is empty and nothing is in flight (within `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._spool is not None and self._spool.pending_records == 0 and not self._inflight and not self._pending:
                return True
            await asyncio.sleep(0.02)
        return False

    async def stop(self) -> None:
        """Idempotent; see the module docstring. Safe to call concurrently."""
        if not self._started:
            return
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        s = self.settings
        self._closing = True
        if self._pending:
            self._start_pending()
        runners = [entry.runner for entry in self._inflight if entry.runner is not None]
        if runners:
            await asyncio.wait(runners, timeout=s.delivery_timeout_s)
        if self._inflight:
            await self._failover("producer stopping with unacked sends")
        if self._flush_task is not None:
            await asyncio.shield(self._flush_task)
        if self._spool.pending_records and self._kafka is not None and self._kafka_ok and s.stop_drain_timeout_s > 0:
            self._hurry.set()
            self._wake.set()
            waiter = asyncio.get_running_loop().create_task(self._drained.wait())
            await asyncio.wait({waiter}, timeout=s.stop_drain_timeout_s)
            waiter.cancel()
        for task in (self._drainer, self._health_logger):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._close_kafka()
        left = self._spool.pending_records
        try:
            await self._spool.flush()
        finally:
            self._spool.close()
        self._update_gauges()
        self.log_health()
        log.info("Kafka producer stopped", extra=fields(sent=self.health.counters.get("sent", 0),
                 left_in_spool=left, dropped=self.health.counters.get("dropped", 0)))

    def log_health(self) -> None:
        """One log line with every counter and gauge (also written periodically and at stop)."""
        log.info("Kafka producer health", extra=fields(instance=self.health.instance, mode=self.mode,
                                                       **self.health.snapshot()))

    async def _log_health_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.log_health()

    async def _ensure_kafka(self) -> bool:
        """Start the aiokafka client if it is not running; False (no exception) when Kafka is down."""
        if self._kafka is not None:
            return True
        producer = AIOKafkaProducer(**self.settings.producer_kwargs())
        start = asyncio.get_running_loop().create_task(producer.start())
        done, _ = await asyncio.wait({start}, timeout=self.settings.delivery_timeout_s)
        if start in done and start.exception() is None:
            self._kafka = producer
            return True
        start.cancel()
        error = start.exception() if start in done else "timeout"
        log.debug("Kafka client start failed", extra=fields(error=repr(error)))
        await self._close_client(producer)
        return False

    async def _close_kafka(self) -> None:
        producer, self._kafka = self._kafka, None
        if producer is not None:
            await self._close_client(producer)
        # records the closed client still held can no longer be delivered: nothing to settle
        for fut in self._abandoned:
            if not fut.done():
                fut.cancel()
        self._abandoned.clear()
        self._unconfirmed = None

    async def _close_client(self, producer: AIOKafkaProducer) -> None:
        """Stop an aiokafka producer within delivery_timeout_s; if its flush hangs (Kafka down),
        tear its sender and connections down without waiting for queued batches."""
        stop = asyncio.get_running_loop().create_task(producer.stop())
        # while Kafka is down, queued batches are already in the spool: do not wait for them to expire
        timeout_s = self.settings.delivery_timeout_s if self._kafka_ok else min(1.0, self.settings.delivery_timeout_s)
        done, _ = await asyncio.wait({stop}, timeout=timeout_s)
        if stop in done:
            if stop.exception() is not None:
                log.debug("Kafka client stop failed", extra=fields(error=repr(stop.exception())))
            return
        stop.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            sender = getattr(producer, "_sender", None)
            if sender is not None:
                await sender.close()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await producer.client.close()

    # ------------------------------------------------------------------ public sends

    async def send(self, reading: Reading) -> bool:
        """One reading to `podwatch.telemetry.v1` (key = device). True once durable; False if
        dropped (counted)."""
        record = SpoolRecord(self.telemetry_topic, reading.device.encode(), encode_reading(reading))
        return await self._submit([record]) == 1

    async def send_many(self, readings: list[Reading]) -> int:
        """Many readings in one batch (the high-throughput path); returns how many are durable."""
        if not readings:
            return 0
        topic = self.telemetry_topic
        return await self._submit([SpoolRecord(topic, r.device.encode(), encode_reading(r)) for r in readings])

    async def send_alert_event(self, event: dict) -> bool:
        """One alert event to `podwatch.alerts.v1` (key = alert_id); adds "v": 1."""
        key, value = encode_alert_event(event)
        return await self._submit([SpoolRecord(self.alerts_topic, key, value)]) == 1

    async def send_dead_letter(self, payload: bytes, reason: str, source: str, **meta) -> bool:
        """A payload that could not be decoded, with the reason, to `podwatch.deadletter.v1`.
        `meta` may carry topic, partition, offset and any context (site, device, ...)."""
        if self.site and "site" not in meta:
            meta["site"] = self.site
        letter = dead_letter(payload, reason, source, **meta)
        key = str(meta.get("device") or source).encode()
        return await self._submit([SpoolRecord(self.deadletter_topic, key, encode_dead_letter(letter))]) == 1

    # ------------------------------------------------------------------ core

    def submit(self, reading: Reading) -> asyncio.Future:
        """Hand one reading over without waiting for it: the returned future resolves to 1 once the
        reading is durable (as `send` returns), 0 if it was dropped (counted). Readings submitted one
        after another keep their order, whether they go to Kafka or to the spool. The Modbus collector
        uses this to keep polling on its grid while Kafka stalls (an outage is only known after
        `delivery_timeout_s`); it bounds how many of its readings are not yet durable."""
        record = SpoolRecord(self.telemetry_topic, reading.device.encode(), encode_reading(reading))
        return self._submit_nowait([record])

    async def _submit(self, records: list[SpoolRecord]) -> int:
        """Make `records` durable; return how many are (the rest were dropped and counted)."""
        return await self._submit_nowait(records)

    def _submit_nowait(self, records: list[SpoolRecord]) -> asyncio.Future:
        """Queue `records` in submission order; the future resolves to how many became durable."""
        if not self._started or self._closing:
            raise PodwatchError("the Kafka producer is not running (start() it; it was maybe stopped)")
        self.health.inc("received", len(records))
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        if not self._direct:
            # in the spool (page cache) now, in order; durable after the next fsync, which every
            # record appended before it shares (group commit)
            accepted = self._append_to_spool(records)
            self._wake.set()
            self._flush_waiters.append((waiter, accepted))
            if self._flush_task is None:
                self._flush_task = loop.create_task(self._resolve_after_flush())
            return waiter
        self._pending.append((records, waiter))
        if not self._start_scheduled:
            self._start_scheduled = True
            loop.call_soon(self._start_pending)
        return waiter

    async def _resolve_after_flush(self) -> None:
        """Fsync the spool, then tell every sender whose records it covers."""
        try:
            while self._flush_waiters:
                waiters, self._flush_waiters = self._flush_waiters, []
                await self._flush_spool()
                for waiter, accepted in waiters:
                    if not waiter.done():
                        waiter.set_result(accepted)
        finally:
            self._flush_task = None

    def _start_pending(self) -> None:
        """Hand every send queued in this loop turn to aiokafka as one group."""
        self._start_scheduled = False
        groups, self._pending = self._pending, []
        if not groups:
            return  # a failover took them
        entry = _InFlight()
        for records, waiter in groups:
            entry.waiters.append((len(entry.records), len(records), waiter))
            entry.records.extend(records)
        self._inflight[entry] = None
        loop = asyncio.get_running_loop()
        entry.task = loop.create_task(self._deliver_direct(entry))
        entry.runner = loop.create_task(self._run_direct(entry))

    async def _run_direct(self, entry: _InFlight) -> None:
        try:
            await self._run_direct_bounded(entry)
        except BaseException as exc:  # never leave a caller waiting forever
            for _, _, waiter in entry.waiters:
                if not waiter.done():
                    waiter.set_exception(exc if isinstance(exc, Exception) else PodwatchError("producer stopped"))
            if isinstance(exc, Exception):
                self.health.inc("errors")
                log.exception("direct send failed unexpectedly")
            else:
                raise

    async def _run_direct_bounded(self, entry: _InFlight) -> None:
        await asyncio.wait({entry.task}, timeout=self._timeout_for(len(entry.records)))
        if entry.state == "inflight":
            reason = repr(entry.error) if entry.error else f"no ack within {self.settings.delivery_timeout_s}s"
            await self._failover(reason)  # moves this entry (and every other one in flight) to the spool
        elif entry.state == "acked":
            for first, count, waiter in entry.waiters:
                failed = sum(1 for i in range(first, first + count) if i in entry.permanent) if entry.permanent else 0
                if not waiter.done():
                    waiter.set_result(count - failed)

    async def _deliver_direct(self, entry: _InFlight) -> None:
        """Hand the records to aiokafka and wait for every ack (never cancelling aiokafka's futures)."""
        indexed: list[tuple[int, asyncio.Future]] = []
        try:
            # One group hands its records over at a time: aiokafka's send() waits when a partition's
            # batch is full, and another group's records must not slip in between (per-device order).
            async with self._enqueue_lock:
                for index, record in enumerate(entry.records):
                    try:
                        fut = await self._kafka.send(record.topic, record.value, key=record.key)
                    except PERMANENT_ERRORS as exc:
                        entry.permanent[index] = exc
                        continue
                    entry.futures.append(fut)
                    indexed.append((index, fut))
            if entry.futures:
                await asyncio.wait(entry.futures)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an outage: the runner fails over to the spool
            entry.error = exc
            return
        # Read every future's outcome (not only up to the first failure): an exception nobody
        # retrieved is logged by asyncio as "Future exception was never retrieved" with a traceback.
        outcomes = [(index, asyncio.CancelledError() if fut.cancelled() else fut.exception()) for index, fut in indexed]
        if entry.state != "inflight":
            return  # moved to the spool meanwhile; these acks make duplicates the sink drops
        for index, exc in outcomes:
            if exc is None:
                continue
            if is_permanent(exc):
                entry.permanent[index] = exc
            elif entry.error is None:
                entry.error = exc
        if entry.error is not None:
            return
        del self._inflight[entry]
        entry.state = "acked"
        self._kafka_ok = True
        self.health.inc("sent", len(entry.records) - len(entry.permanent))
        if entry.permanent:
            self._count_permanent(list(entry.permanent.values()))

    def _append_to_spool(self, records: list[SpoolRecord]) -> int:
        """Synchronous: the records are in the spool (page cache) when this returns, in order."""
        try:
            accepted = self._spool.append(records)
        except (OSError, ValueError) as exc:  # disk failure, or a record the spool cannot frame
            accepted = 0
            self.health.inc("errors")
            log.error("spool write failed; records dropped", extra=fields(records=len(records), error=repr(exc)))
        self.health.inc("spooled", accepted)
        if accepted:
            self._drained.clear()
        if accepted < len(records):
            self.health.inc("dropped", len(records) - accepted)
        self._update_gauges()
        return accepted

    async def _flush_spool(self) -> None:
        try:
            await self._spool.flush()
        except OSError as exc:  # the records are in the page cache; durability against power loss is not
            self.health.inc("errors")
            log.error("spool fsync failed", extra=fields(error=exc))

    def _count_permanent(self, errors: list[BaseException]) -> None:
        self.health.inc("dropped", len(errors))
        self.health.inc("errors", len(errors))
        log.error("Kafka refused records for good; dropped", extra=fields(records=len(errors), error=repr(errors[0])))

    async def _failover(self, reason: str) -> None:
        """Kafka is down: every record in flight, then every send not yet started, moves to the
        spool in send order; the producer stays in SPOOL mode until the drainer empties it."""
        entries = list(self._inflight)
        self._inflight.clear()
        groups, self._pending = self._pending, []
        self._kafka_ok = False
        if self._direct:
            self._direct = False
            self._outage_started = time.monotonic()
            self.health.inc("errors")
            log.warning("Kafka send failed; spooling to disk until it answers",
                        extra=fields(reason=reason, spool=str(self.spool_dir)))
        records: list[SpoolRecord] = []
        waiters: list[tuple[int, int, asyncio.Future]] = []
        for entry in entries:
            entry.state = "spooled"
            if entry.task is not None and not entry.task.done():
                entry.task.cancel()
            for fut in entry.futures:
                fut.add_done_callback(_retrieve)  # failed ones too, done before the task was cancelled
                if not fut.done():
                    self._abandoned.add(fut)
            waiters.extend((len(records) + first, count, w) for first, count, w in entry.waiters)
            records.extend(entry.records)
        for group, waiter in groups:
            waiters.append((len(records), len(group), waiter))
            records.extend(group)
        if not records:
            return
        accepted = self._append_to_spool(records)
        self._wake.set()
        await self._flush_spool()
        for first, count, waiter in waiters:  # the spool refuses a suffix: earlier records are whole
            if not waiter.done():
                waiter.set_result(max(0, min(count, accepted - first)))

    # ------------------------------------------------------------------ drainer

    async def _drain_loop(self) -> None:
        s = self.settings
        backoff = s.retry_backoff_min_s
        while True:
            if self._spool.pending_records == 0:
                self._drained.set()
                if not self._direct and self._kafka_ok and not self._closing and not self._inflight \
                        and not self._pending:
                    self._go_direct()
                self._wake.clear()
                await self._wake.wait()
                continue
            self._drained.clear()
            try:
                delivered = await self._ensure_kafka() and await self._drain_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug or a disk error must not kill the drainer for good
                self.health.inc("errors")
                log.exception("spool drain round failed unexpectedly")
                delivered = False
            if not delivered:
                self.health.inc("retries")
                if self._kafka is not None and self._drain_failures and self._drain_failures % RECREATE_CLIENT_AFTER == 0:
                    # a long outage: start from a fresh client (a broker restart, a wedged connection
                    # or a dead aiokafka sender task cannot outlive this)
                    await self._close_kafka()
                delay = _jitter(backoff)
                backoff = min(backoff * 2, s.retry_backoff_max_s)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), delay)
                self._hurry.clear()  # one immediate retry per stop(), never a hot loop
                continue
            backoff = s.retry_backoff_min_s

    def _go_direct(self) -> None:
        self._direct = True
        outage_s = time.monotonic() - self._outage_started if self._outage_started else 0.0
        self._outage_started = None
        self._drain_failures = 0
        self._update_gauges()
        log.info("Kafka answers and the spool is drained; sending directly again",
                 extra=fields(outage_s=round(outage_s, 1)))

    async def _settle_abandoned(self) -> None:
        """Let aiokafka finish (deliver or expire) records we gave up on before resending them."""
        self._abandoned = {f for f in self._abandoned if not f.done()}
        if self._abandoned:
            timeout = self.settings.request_timeout_ms / 1000 + self.settings.delivery_timeout_s
            await asyncio.wait(self._abandoned, timeout=timeout)
            self._abandoned = {f for f in self._abandoned if not f.done()}

    async def _drain_once(self) -> bool:
        """Send the oldest spooled batch; ack it in the spool once Kafka acked all of it."""
        await self._settle_abandoned()
        if self._unconfirmed is not None:
            previous, futures, refused = self._unconfirmed
            self._unconfirmed = None
            if len(futures) + refused == len(previous) and all(
                    f.done() and not f.cancelled() and f.exception() is None for f in futures):
                # Kafka acked the whole previous attempt after we stopped waiting: no resend needed
                self._spool.ack(previous)
                self._kafka_ok = True
                self._drain_failures = 0
                self.health.inc("sent", len(futures))
                self._update_gauges()
                log.debug("late acks confirmed a spool batch", extra=fields(records=len(previous)))
                return True
        batch = self._spool.read_batch(max_records=self.settings.drain_batch_records,
                                       max_bytes=max(self.settings.max_request_size, 1 << 20) * 4)
        if batch is None:
            log.error("spool reports records but none could be read", extra=fields(pending=self._spool.pending_records))
            return False
        futures: list[asyncio.Future] = []
        permanent: list[BaseException] = []

        async def enqueue() -> None:
            async with self._enqueue_lock:
                for record in batch.records:
                    try:
                        futures.append(await self._kafka.send(record.topic, record.value, key=record.key))
                    except PERMANENT_ERRORS as exc:
                        permanent.append(exc)

        loop = asyncio.get_running_loop()
        timeout_s = self._timeout_for(len(batch))
        deadline = loop.time() + timeout_s
        task = loop.create_task(enqueue())
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        error: BaseException | None = None
        if task not in done:
            task.cancel()
            error = TimeoutError("enqueue timed out")
        elif task.exception() is not None:
            error = task.exception()
        if error is None and futures:
            _, pending = await asyncio.wait(futures, timeout=max(deadline - loop.time(), 0.1))
            if pending:
                error = TimeoutError(f"no ack within {self.settings.delivery_timeout_s}s")
            else:
                for fut in futures:
                    exc = fut.exception()
                    if exc is None:
                        continue
                    if is_permanent(exc):
                        permanent.append(exc)
                    else:
                        error = exc
        if error is not None:
            if task in done and task.exception() is None:
                self._unconfirmed = (batch, futures, len(permanent))
            for fut in futures:
                fut.add_done_callback(_retrieve)
                if not fut.done():
                    self._abandoned.add(fut)
            self._kafka_ok = False
            self._drain_failures += 1
            self.health.inc("errors")
            level = logging.WARNING if self._drain_failures == 1 else logging.DEBUG  # loud once, then quiet
            log.log(level, "draining the spool failed; will retry with backoff",
                    extra=fields(error=repr(error), pending=self._spool.pending_records, failures=self._drain_failures))
            return False
        self._spool.ack(batch)
        self._kafka_ok = True
        self._drain_failures = 0
        self.health.inc("sent", len(batch) - len(permanent))
        if permanent:
            self._count_permanent(permanent)
        self._update_gauges()
        return True

    def _timeout_for(self, records: int) -> float:
        """delivery_timeout_s, plus 50 us per record so that a huge batch on a busy machine is not
        mistaken for an outage."""
        return self.settings.delivery_timeout_s + records * 50e-6

    def _update_gauges(self) -> None:
        if self._spool is None:
            return
        self.health.set("spool_records", float(self._spool.pending_records))
        self.health.set("spool_bytes", float(self._spool.disk_bytes))
        self.health.set("spooling", 0.0 if self._direct else 1.0)
