"""The Kafka side of the DuckDB sink: consumer, positions, lag, decoding, dead letters.

`Fetcher` turns the telemetry topic into `FetchedBatch`es ready for the writer: decoded rows,
the consumer's next offset per partition, the newest reading per partition. It runs either in
the sink's own event loop (`SinkSettings.decode_process=False`) or in the fetch process
(`fetch_process.py`); the writer (`sink.py`) owns the DuckDB file in both cases.

What it guarantees, in both modes:
- positions come from the writer: on assignment it calls `on_assigned(partitions)`, which
  answers with the offsets stored in DuckDB after every batch handed over before is committed;
  partitions without a stored offset start at the earliest message. Kafka's own committed
  offsets are never used.
- a stored offset beyond the partition's end (a recreated topic) is logged loudly and the
  partition is re-read from the earliest offset (counted in `FetchReport.new_topic_resets`).
- undecodable messages and readings of another site go to the dead-letter topic with the
  reason, and are acknowledged by Kafka before the batch carrying the offsets that pass them
  is handed to the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Awaitable, Callable

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaConnectionError, KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError

from podwatch.errors import PodwatchError
from podwatch.logs import fields
from podwatch.storage.decode import DecodedBatch, Rejected, decode_messages
from podwatch.stream.envelope import dead_letter, encode_dead_letter

log = logging.getLogger(__name__)

_RECORD_VALUE = attrgetter("value")

AssignedFn = Callable[[list[int]], Awaitable[dict[int, int]]]  # partitions -> stored next offsets
RevokedFn = Callable[[], Awaitable[None]]


@dataclass
class FetchedBatch:
    """One fetch, decoded: what the writer commits in one transaction."""

    batch: DecodedBatch  # accepted readings; `rejected` already sent as dead letters
    next_offsets: dict[int, int]  # partition -> offset after its last message in this batch
    newest_ms: dict[int, int]  # partition -> newest reading time among its accepted messages
    messages: int  # Kafka messages in the batch (accepted + dead letters)
    dead_letters: int
    own_site: str | None  # the file's site as the fetcher knows it (claimed by the first readings)
    fetched_at: float = field(default_factory=time.time)  # wall clock: comparable across processes


@dataclass
class FetchReport:
    """What one `Fetcher.poll()` brought: a batch or none, and the consumer's state."""

    batch: FetchedBatch | None
    lag: dict[int, int]
    new_topic_resets: int = 0
    new_fetch_errors: int = 0
    answered_ms: int | None = None  # wall ms of the broker's last fetch answer (empty ones too), any partition


class _SeekToStoredOffsets(ConsumerRebalanceListener):
    def __init__(self, fetcher: "Fetcher") -> None:
        self._fetcher = fetcher

    async def on_partitions_revoked(self, revoked) -> None:
        await self._fetcher.on_revoked()

    async def on_partitions_assigned(self, assigned) -> None:
        await self._fetcher.seek_assigned(list(assigned))


class Fetcher:
    """Consumer + dead-letter producer of one sink. `start()`, then `poll()` in a loop, `stop()`.

    `busy()` tells whether the writer is still busy with the previous batch: while it is, a
    fetch is topped up with whatever is already buffered (bigger transactions amortise the
    per-commit costs)."""

    def __init__(self, settings, own_site: str | None, on_assigned: AssignedFn, on_revoked: RevokedFn,
                 busy: Callable[[], bool]) -> None:
        self.settings = settings
        self.own_site = own_site
        self.on_assigned = on_assigned
        self.on_revoked = on_revoked
        self.busy = busy
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.lag: dict[int, int] = {}
        self._new_resets = 0
        self._new_errors = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.settings
        self.producer, self.consumer = self._make_clients()
        await self._start_kafka_clients()
        if s.group_id is not None:
            self.consumer.subscribe([s.topic], listener=_SeekToStoredOffsets(self))
        else:
            partitions = await self._wait_for_partitions()
            tps = [TopicPartition(s.topic, p) for p in sorted(partitions)]
            self.consumer.assign(tps)
            await self.seek_assigned(tps)

    async def stop(self) -> None:
        for client in (self.consumer, self.producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()

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
                await self.producer.start()
                await self.consumer.start()
                return
            except KafkaError as exc:
                for client in (self.consumer, self.producer):
                    with contextlib.suppress(Exception):
                        await client.stop()
                retriable = getattr(exc, "retriable", False) or isinstance(exc, KafkaConnectionError)
                if not retriable or time.monotonic() + delay_s > deadline:
                    raise PodwatchError(f"cannot reach Kafka at {self.settings.kafka}: {exc}") from None
                log.warning("Kafka not reachable yet; retrying", extra=fields(kafka=self.settings.kafka, error=str(exc)))
                await asyncio.sleep(delay_s * random.uniform(0.5, 1.5))
                delay_s = min(delay_s * 2, 5.0)
                self.producer, self.consumer = self._make_clients()

    async def _wait_for_partitions(self) -> set[int]:
        deadline = time.monotonic() + 30
        while True:
            await self.consumer.topics()
            partitions = self.consumer.partitions_for_topic(self.settings.topic)
            if partitions:
                return partitions
            if time.monotonic() > deadline:
                raise KafkaError(f"topic {self.settings.topic} has no partitions after 30 s")
            await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ offsets
    async def seek_assigned(self, tps: list[TopicPartition]) -> None:
        stored = await self.on_assigned([tp.partition for tp in tps])
        self.lag = {p: lag for p, lag in self.lag.items() if p in {tp.partition for tp in tps}}
        for tp in tps:
            if tp.partition in stored:
                self.consumer.seek(tp, stored[tp.partition])
            else:
                await self.consumer.seek_to_beginning(tp)
        log.info("partitions assigned; positions from DuckDB",
                 extra=fields(partitions=[tp.partition for tp in tps], stored={p: stored.get(p) for p in (tp.partition for tp in tps)}))

    async def _reset_to_earliest(self, tp: TopicPartition, stored: int, end: int | None) -> None:
        self._new_resets += 1
        log.error(
            "STORED OFFSET IS BEYOND THE END OF THE PARTITION: the topic was recreated (a broker restart with "
            "memory storage does this). Re-reading it from the earliest offset; readings already stored are "
            "skipped by (device, seq).",
            extra=fields(topic=tp.topic, partition=tp.partition, stored_offset=stored, partition_end=end),
        )
        await self.consumer.seek_to_beginning(tp)

    def _answered_ms(self) -> int | None:
        """When the broker last answered a fetch of ours (an idle topic answers too: long polls come
        back empty with the high watermark). The lag alone cannot tell a silent broker from a
        caught-up sink: it keeps its last value."""
        stamps = []
        for tp in list(self.consumer.assignment()):
            with contextlib.suppress(AssertionError, KeyError):
                stamps.append(self.consumer.last_poll_timestamp(tp))
        stamps = [t for t in stamps if t is not None]
        return max(stamps) if stamps else None

    async def _update_lag(self) -> None:
        consumer = self.consumer
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
            self.lag[tp.partition] = highwater - position

    # ------------------------------------------------------------------ fetching
    async def poll(self) -> FetchReport:
        """One fetch (up to `fetch_timeout_ms`), decoded, dead letters sent and acked."""
        fetched = None
        try:
            data = await self._fetch_batch()
        except OffsetOutOfRangeError as exc:
            for tp, offset in (exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}).items():
                await self._reset_to_earliest(tp, offset, self.consumer.highwater(tp))
            data = None
        except NoOffsetForPartitionError:
            # assigned a moment ago and its position is being fetched from the writer (the
            # rebalance listener seeks every assigned partition): not an error
            await asyncio.sleep(0.05)
            data = None
        except KafkaError as exc:
            self._new_errors += 1
            log.warning("Kafka fetch failed; retrying", extra=fields(error=repr(exc)))
            await asyncio.sleep(0.5)
            data = None
        if data:
            fetched = await self._decode(data)
        await self._update_lag()
        report = FetchReport(fetched, dict(self.lag), self._new_resets, self._new_errors, self._answered_ms())
        self._new_resets = self._new_errors = 0
        return report

    async def _fetch_batch(self) -> dict[TopicPartition, list]:
        """One fetch, topped up (up to max_batch_messages) with what arrives within
        `batch_fill_ms`, and for as long as the writer is still busy with the previous batch.
        A catching-up sink writes full transactions (a Tansu fetch brings about one producer
        batch per partition; small transactions leave the file ~50 % bigger in free blocks
        after the checkpoints), a live one waits at most `batch_fill_ms`."""
        s = self.settings
        consumer = self.consumer
        data = await consumer.getmany(timeout_ms=s.fetch_timeout_ms, max_records=s.max_batch_messages)
        count = sum(len(v) for v in data.values())
        deadline = time.monotonic() + s.batch_fill_ms / 1000
        while data and count < s.max_batch_messages:
            wait_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            if not wait_ms and not self.busy():
                break
            more = await consumer.getmany(timeout_ms=wait_ms or 5, max_records=s.max_batch_messages - count)
            for tp, records in more.items():
                data.setdefault(tp, []).extend(records)
                count += len(records)
        return data

    async def _decode(self, data: dict[TopicPartition, list]) -> FetchedBatch | None:
        values: list[bytes | None] = []
        next_offsets: dict[int, int] = {}
        parts = [(tp, records) for tp, records in data.items() if records]
        for tp, records in parts:
            values.extend(map(_RECORD_VALUE, records))
            next_offsets[tp.partition] = records[-1].offset + 1
        if not values:
            return None
        batch = decode_messages(values)
        if self.own_site is None and len(batch.sites) == 1:
            (self.own_site,) = batch.sites
            log.info("this DuckDB file holds site %s (its first readings)", self.own_site)
        if batch.sites and (self.own_site is None or not batch.sites <= {self.own_site}):
            batch = self._drop_foreign_sites(values, batch)
        dead_letters = len(batch.rejected)
        if batch.rejected:
            # (partition, offset) per message is needed only for dead letters
            origins = [(tp, r.offset) for tp, records in parts for r in records]
            await self._send_dead_letters(batch, values, origins)
            batch.rejected = []
        return FetchedBatch(batch, next_offsets, _newest_per_partition(parts, batch.msg_index, batch.ts_ms),
                            len(values), dead_letters, self.own_site)

    def _drop_foreign_sites(self, values: list, batch: DecodedBatch) -> DecodedBatch:
        """One DuckDB file holds one site: device ids repeat across sites (`cdu-m1` exists in
        many), so another site's readings would merge into this site's series. They become dead
        letters naming both sites. Without a site file the first reading's site claims the file.
        Slow path (parses the accepted messages once more): only when a batch carries a site
        other than this file's, which is a deployment mistake to fix, not a steady state."""
        accepted = batch.msg_index.tolist()
        msg_sites = [orjson.loads(values[i]).get("site") for i in accepted]
        if self.own_site is None:
            self.own_site = msg_sites[0]
            log.info("this DuckDB file holds site %s (its first readings)", self.own_site)
        own = self.own_site
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

    async def _send_dead_letters(self, batch: DecodedBatch, values: list, origins: list) -> None:
        futures = []
        for rej in batch.rejected:
            tp, offset = origins[rej.index]
            letter = dead_letter(values[rej.index] or b"", rej.reason, "duckdb_sink", topic=tp.topic,
                                 partition=tp.partition, offset=offset)
            futures.append(await self.producer.send(self.settings.dead_letter_topic, encode_dead_letter(letter),
                                                    key=b"duckdb_sink"))
            log.warning("message sent to dead letters", extra=fields(partition=tp.partition, offset=offset, reason=rej.reason))
        # The offsets that pass these messages are committed only after the dead letters are acked.
        await asyncio.gather(*futures)


class LeanRecord:
    """What the sink reads of a Kafka record: its offset and its value."""

    __slots__ = ("offset", "value")

    def __init__(self, offset: int, value: bytes | None) -> None:
        self.offset = offset
        self.value = value


@contextlib.contextmanager
def lean_records():
    """Within this block, this process's aiokafka consumers hand out `LeanRecord`s instead of
    `ConsumerRecord`s. Only for a process whose consumers are all the sink's (the fetch
    process): aiokafka builds an 11-field dataclass and a headers tuple per message, ~1.3 us of
    the fetch process's CPU per message (~10 %), and the sink reads two fields of it (measured
    against the raw consumer: 4.3 -> 3.1 us/msg). It replaces a private method of aiokafka
    (`PartitionRecords._consumer_record`, pinned to aiokafka 0.14.x in pyproject.toml); when that
    method is not the one this was written against, nothing is replaced (yields False)."""
    try:
        from aiokafka.consumer.fetcher import PartitionRecords
    except ImportError:
        yield False
        return
    original = PartitionRecords.__dict__.get("_consumer_record")
    try:
        import inspect

        fits = original is not None and list(inspect.signature(original).parameters) == ["self", "tp", "record"]
    except (TypeError, ValueError):
        fits = False
    if not fits:
        log.warning("aiokafka's record constructor is not the expected one; using its full records")
        yield False
        return

    def lean_record(self, tp, record, _new=LeanRecord):
        if self._value_deserializer is not None:  # not the sink's consumer: aiokafka's own records
            return original(self, tp, record)
        return _new(record.offset, record.value)

    PartitionRecords._consumer_record = lean_record
    try:
        yield True
    finally:
        PartitionRecords._consumer_record = original


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
