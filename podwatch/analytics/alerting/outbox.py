"""The durable alert outbox (`alert_outbox` table, owned by alerting) and its delivery loop.

Every alert event meant for a receiver is written to the outbox in the same DuckDB transaction
as the alert's new state, one row per receiver, numbered by a per-receiver sequence. The
`OutboxDispatcher` delivers each receiver's rows in sequence order and marks a row delivered only
after the receiver acknowledged it (HTTP 2xx, SMTP accepted, publish returned). A retriable
failure stops that receiver's queue (order is kept) and retries with jittered exponential
backoff; a permanent failure (e.g. HTTP 400, SMTP 550) marks the row `dead` with the reason,
logs it loudly and moves on (a rejected batch of a receiver that takes an alert again harmlessly -
Alertmanager - is first retried one event at a time, so one bad event does not take the others
down with it). So nothing is lost while a receiver is down: it gets every event,
in order, after it returns. Within one process each event is sent once; a crash between the
receiver's ack and the `delivered` mark can repeat that one event (at-least-once), which is why
webhook deliveries carry an `X-Podwatch-Delivery` id and Alertmanager is idempotent by labels.

Lifecycle: `tick()` does one delivery pass (the storage service calls it periodically);
`kick()` asks for a pass as soon as possible (after new events); `run(stop)` loops on its own
when no service drives it. Delivery times are wall-clock (they talk to real servers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import duckdb

from podwatch.health import REGISTRY, ComponentHealth

if TYPE_CHECKING:
    from podwatch.analytics.alerting.receivers import Receiver

log = logging.getLogger(__name__)

OUTBOX_DDL = """
CREATE TABLE IF NOT EXISTS alert_outbox (
    receiver        VARCHAR     NOT NULL,   -- receiver name from the alerting settings
    seq             BIGINT      NOT NULL,   -- per-receiver delivery order
    alert_id        VARCHAR     NOT NULL,
    state           VARCHAR     NOT NULL,   -- the event's alert state
    event           VARCHAR     NOT NULL,   -- the alert event, JSON (docs/alerts.md)
    created_at      TIMESTAMPTZ NOT NULL,
    status          VARCHAR     NOT NULL,   -- pending | delivered | dead
    attempts        INTEGER     NOT NULL,
    next_attempt_at TIMESTAMPTZ,
    last_error      VARCHAR,
    delivered_at    TIMESTAMPTZ,
    PRIMARY KEY (receiver, seq)
)
"""


def ensure_outbox_table(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(OUTBOX_DDL)


def _now() -> datetime:
    return datetime.now(UTC)


class DeliveryError(Exception):
    """A receiver could not deliver. `retriable` says whether trying again may help."""

    def __init__(self, message: str, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    receiver: str
    seq: int
    alert_id: str
    event: dict


def enqueue(con: duckdb.DuckDBPyConnection, receiver_names: Sequence[str], events: Sequence[dict]) -> int:
    """Append `events` to each named receiver's queue (caller holds the transaction). Returns rows written."""
    rows = []
    now = _now()
    for name in receiver_names:
        next_seq = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM alert_outbox WHERE receiver = ?", [name]).fetchone()[0]
        for event in events:
            rows.append((name, next_seq, event["alert_id"], event["state"], json.dumps(event), now, "pending", 0))
            next_seq += 1
    if rows:
        con.executemany(
            "INSERT INTO alert_outbox (receiver, seq, alert_id, state, event, created_at, status, attempts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return len(rows)


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Full-jitter exponential backoff: uniform(0.5, 1) x min(max, initial x 2^(attempts-1))."""
    ceiling = min(max_s, initial_s * (2 ** max(0, attempts - 1)))
    return ceiling * random.uniform(0.5, 1.0)


class OutboxDispatcher:
    """Delivers the outbox of every configured receiver (see the module docstring)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, receivers: Sequence["Receiver"], *,
                 initial_backoff_s: float = 0.5, max_backoff_s: float = 60.0, batch_size: int = 100,
                 idle_interval_s: float = 1.0) -> None:
        self._con = con
        ensure_outbox_table(con)
        self.receivers = {r.name: r for r in receivers}
        self.initial_backoff_s, self.max_backoff_s = initial_backoff_s, max_backoff_s
        self.batch_size, self.idle_interval_s = batch_size, idle_interval_s
        self._not_before: dict[str, float] = {}  # receiver -> monotonic time of its next retry
        self._lock = asyncio.Lock()
        self._again = False
        self._wake: asyncio.Event | None = None
        self._kick_task: asyncio.Task | None = None
        self.health: dict[str, ComponentHealth] = {n: REGISTRY.component("alert_receiver", n) for n in self.receivers}
        self._warn_orphans()

    def _warn_orphans(self) -> None:
        rows = self._con.execute("SELECT receiver, count(*) FROM alert_outbox WHERE status = 'pending' GROUP BY receiver").fetchall()
        for name, count in rows:
            if name not in self.receivers:
                log.warning("alert outbox holds %d undelivered events for receiver %r, which is no longer configured; "
                            "they stay in alert_outbox until it is configured again", count, name)

    @property
    def receiver_names(self) -> list[str]:
        return list(self.receivers)

    def pending_count(self, receiver: str | None = None) -> int:
        sql = "SELECT count(*) FROM alert_outbox WHERE status = 'pending'"
        params: list = []
        if receiver is not None:
            sql += " AND receiver = ?"
            params.append(receiver)
        return self._con.execute(sql, params).fetchone()[0]

    def kick(self) -> None:
        """Ask for a delivery pass soon (non-blocking; safe without a running loop)."""
        if self._wake is not None:
            self._wake.set()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._kick_task is None or self._kick_task.done():
            self._kick_task = loop.create_task(self.tick())
        else:
            self._again = True

    async def tick(self) -> int:
        """One delivery pass over every receiver; returns the number of events delivered."""
        if self._lock.locked():
            self._again = True
            return 0
        delivered = 0
        async with self._lock:
            while True:
                self._again = False
                for name in self.receivers:
                    delivered += await self._deliver(name)
                if not self._again:
                    break
            for receiver in self.receivers.values():
                if self._not_before.get(receiver.name, 0.0) <= time.monotonic() and self.pending_count(receiver.name) == 0:
                    try:
                        await receiver.periodic()
                    except DeliveryError as exc:
                        log.info("periodic refresh of receiver %s failed: %s", receiver.name, exc)
        return delivered

    async def _deliver(self, name: str) -> int:
        receiver = self.receivers[name]
        health = self.health[name]
        if time.monotonic() < self._not_before.get(name, 0.0):
            return 0
        delivered = 0
        while True:
            rows = self._con.execute(
                "SELECT seq, alert_id, event, attempts FROM alert_outbox WHERE receiver = ? AND status = 'pending' "
                "ORDER BY seq LIMIT ?", [name, self.batch_size]).fetchall()
            if not rows:
                return delivered
            chunk = rows[: max(1, receiver.max_batch)]
            entries = [OutboxEntry(name, seq, aid, json.loads(ev)) for seq, aid, ev, _ in chunk]
            try:
                await receiver.send(entries)
            except DeliveryError as exc:
                attempts = chunk[0][3] + 1
                seqs = [e.seq for e in entries]
                if exc.retriable:
                    wait_s = backoff_s(attempts, self.initial_backoff_s, self.max_backoff_s)
                    self._not_before[name] = time.monotonic() + wait_s
                    self._mark(seqs, name, "pending", attempts, str(exc), next_attempt=_now() + timedelta(seconds=wait_s))
                    health.inc("retries")
                    level = logging.WARNING if attempts == 1 else logging.DEBUG  # loud once, quiet until recovery
                    log.log(level, "alert receiver %s is failing (%s); %d event(s) queued, retry %d in %.2fs",
                            name, exc, self.pending_count(name), attempts, wait_s)
                    return delivered
                if len(entries) > 1 and receiver.takes_updates:
                    # One bad event must not take its batch down with it (Alertmanager answers 400
                    # for a whole POST with one invalid alert): such a receiver takes the same
                    # alert again harmlessly, so the batch is retried one event at a time and only
                    # the events it rejects on their own are dead.
                    sent, stopped = await self._deliver_one_at_a_time(receiver, entries, attempts - 1)
                    delivered += sent
                    if stopped:
                        return delivered
                    continue
                self._mark(seqs, name, "dead", attempts, str(exc))
                health.inc("errors", len(seqs))
                log.error("alert receiver %s rejected %d event(s) permanently (%s); marked dead in alert_outbox "
                          "(seq %s) - fix the receiver settings", name, len(seqs), exc, seqs)
                continue
            was_failing = chunk[0][3] > 0
            self._mark([e.seq for e in entries], name, "delivered", chunk[0][3] + 1, None, delivered_at=_now())
            self._not_before.pop(name, None)
            health.inc("sent", len(entries))
            delivered += len(entries)
            if was_failing:
                log.warning("alert receiver %s is back; delivering its queued events", name)

    async def _deliver_one_at_a_time(self, receiver: "Receiver", entries: list[OutboxEntry],
                                     attempts: int) -> tuple[int, bool]:
        """Send `entries` one by one, marking each delivered or dead on its own answer. Returns
        (delivered, stopped): a retriable failure stops the queue there (order kept, backoff)."""
        name, health = receiver.name, self.health[receiver.name]
        delivered = 0
        for entry in entries:
            try:
                await receiver.send([entry])
            except DeliveryError as exc:
                if exc.retriable:
                    wait_s = backoff_s(attempts + 1, self.initial_backoff_s, self.max_backoff_s)
                    self._not_before[name] = time.monotonic() + wait_s
                    self._mark([entry.seq], name, "pending", attempts + 1, str(exc),
                               next_attempt=_now() + timedelta(seconds=wait_s))
                    health.inc("retries")
                    return delivered, True
                self._mark([entry.seq], name, "dead", attempts + 1, str(exc))
                health.inc("errors")
                log.error("alert receiver %s rejected an event permanently (%s); marked dead in alert_outbox "
                          "(seq %s, alert %s) - fix the receiver settings or the rule", name, exc, entry.seq,
                          entry.alert_id)
                continue
            self._mark([entry.seq], name, "delivered", attempts + 1, None, delivered_at=_now())
            health.inc("sent")
            delivered += 1
        return delivered, False

    def _mark(self, seqs: list[int], name: str, status: str, attempts: int, error: str | None,
              next_attempt: datetime | None = None, delivered_at: datetime | None = None) -> None:
        self._con.executemany(
            "UPDATE alert_outbox SET status = ?, attempts = ?, last_error = ?, next_attempt_at = ?, delivered_at = ? "
            "WHERE receiver = ? AND seq = ?",
            [(status, attempts, error, next_attempt, delivered_at, name, s) for s in seqs])

    def prune(self, older_than: timedelta) -> int:
        """Delete delivered rows older than `older_than` (dead rows stay for inspection)."""
        cutoff = _now() - older_than
        n = self._con.execute("SELECT count(*) FROM alert_outbox WHERE status = 'delivered' AND delivered_at < ?", [cutoff]).fetchone()[0]
        if n:
            self._con.execute("DELETE FROM alert_outbox WHERE status = 'delivered' AND delivered_at < ?", [cutoff])
        return n

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set: a pass on every kick, on retry deadlines, and every idle interval."""
        self._wake = asyncio.Event()
        try:
            while not stop.is_set():
                await self.tick()
                deadlines = [t - time.monotonic() for t in self._not_before.values()]
                timeout = max(0.01, min([self.idle_interval_s, *deadlines]))
                waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
                _, pending = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for w in pending:
                    w.cancel()
                self._wake.clear()
        finally:
            self._wake = None

    async def aclose(self) -> None:
        """Close every receiver (idempotent)."""
        if self._kick_task is not None and not self._kick_task.done():
            await asyncio.wait([self._kick_task], timeout=5)
        for receiver in self.receivers.values():
            await receiver.aclose()
