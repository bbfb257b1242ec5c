"""Duplicate readings: drop a reading whose (device, seq) is already stored.

Producers retry without idempotence (Tansu cannot do it), spools drain after outages and the
sink re-reads a recreated topic from the start, so the same reading can arrive several times,
not always in order. Per device we keep the highest sequence number and a ring of the last
`window` (seq, ts) pairs, in memory, rebuilt on start from `readings` (one row per stored
reading, see schema.py).

A reading is a duplicate when its seq is in the ring with the same timestamp (a retry carries
the very same bytes). The same seq with a *different* timestamp, or a seq far below the
maximum with a newer timestamp, means the producer's counter restarted (collector restarted
without its state): the reading is accepted and the device's state restarts from it. A seq
older than the window with an older timestamp cannot be told apart from a very late
duplicate; it is dropped and counted as `too_old`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import duckdb
import numpy as np

from podwatch.logs import fields

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 4096  # readings per device (~68 min at 1 Hz)
EMPTY_TS = -1  # ring slot never written (seqs span all of uint64, so the ts marks emptiness)


@dataclass(slots=True)
class _DeviceSeqs:
    max_seq: int
    max_ts_ms: int
    ring_seq: np.ndarray
    ring_ts: np.ndarray


@dataclass
class DedupOutcome:
    keep: np.ndarray  # bool per reading
    duplicates: int = 0
    too_old: int = 0
    resets: int = 0
    changed_devices: set[str] = field(default_factory=set)


class SeqDeduper:
    """In-memory dedup state. `check()` marks kept readings as seen right away, so a batch
    being written and the next batch being decoded never admit the same reading twice; if a
    write fails the sink stops and the state is rebuilt from the database on restart."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        self.window = window
        self._devices: dict[str, _DeviceSeqs] = {}

    def __len__(self) -> int:
        return len(self._devices)

    def _new_device(self, seq: int, ts_ms: int) -> _DeviceSeqs:
        # uint64: the envelope allows any seq in [0, 2^64); an int64 ring overflowed on seq >= 2^63
        state = _DeviceSeqs(seq, ts_ms, np.zeros(self.window, dtype=np.uint64),
                            np.full(self.window, EMPTY_TS, dtype=np.int64))
        return state

    def _remember(self, state: _DeviceSeqs, seq: int, ts_ms: int) -> None:
        slot = seq % self.window
        state.ring_seq[slot] = seq
        state.ring_ts[slot] = ts_ms
        if seq > state.max_seq:
            state.max_seq = seq
        if ts_ms > state.max_ts_ms:
            state.max_ts_ms = ts_ms

    def check(self, devices: list[str], seqs: list[int], ts_ms: list[int]) -> DedupOutcome:
        """Decide per reading (message granularity) whether to keep it, and remember the kept."""
        n = len(devices)
        keep = np.ones(n, dtype=bool)
        outcome = DedupOutcome(keep)
        window = self.window
        states = self._devices
        for i in range(n):
            device, seq, ts = devices[i], seqs[i], ts_ms[i]
            state = states.get(device)
            if state is None:
                state = states[device] = self._new_device(seq, ts)
            elif seq > state.max_seq - window:
                slot = seq % window
                if state.ring_ts[slot] != EMPTY_TS and int(state.ring_seq[slot]) == seq:
                    if state.ring_ts[slot] == ts:
                        keep[i] = False
                        outcome.duplicates += 1
                        continue
                    outcome.resets += 1  # same seq, different reading: the counter restarted
                    log.warning("device sequence restarted (same seq, new timestamp); accepting",
                                extra=fields(device=device, seq=seq, max_seq=state.max_seq))
                    state = states[device] = self._new_device(seq, ts)
            elif ts > state.max_ts_ms:
                outcome.resets += 1
                log.warning("device sequence restarted (seq far below the maximum, newer timestamp); accepting",
                            extra=fields(device=device, seq=seq, max_seq=state.max_seq))
                state = states[device] = self._new_device(seq, ts)
            else:
                keep[i] = False
                outcome.too_old += 1
                continue
            self._remember(state, seq, ts)
            outcome.changed_devices.add(device)
        return outcome

    def newest_ts_ms(self) -> int | None:
        """Newest reading time over all devices (epoch ms), or None when empty."""
        return max((d.max_ts_ms for d in self._devices.values()), default=None)

    def state_rows(self, devices: set[str]) -> list[tuple[str, int, int]]:
        """(device, max_seq, max_ts_ms) for the `dedup_state` table."""
        return [(d, self._devices[d].max_seq, self._devices[d].max_ts_ms) for d in devices]

    def load(self, con: duckdb.DuckDBPyConnection, lookback_hours: float = 24.0) -> None:
        """Rebuild from `dedup_state` and the last window of stored `readings`."""
        self._devices.clear()
        rows = con.execute("SELECT device, max_seq, epoch_ms(max_ts) FROM dedup_state").fetchall()
        if not rows:
            return
        for device, max_seq, max_ts in rows:
            self._devices[device] = self._new_device(int(max_seq), int(max_ts))
        recent = con.execute(
            """
            SELECT r.device, r.seq, epoch_ms(r.ts) AS ts_ms
            FROM readings r JOIN dedup_state d ON d.device = r.device
            WHERE r.ts >= (SELECT min(max_ts) FROM dedup_state) - to_seconds(CAST(? * 3600 AS BIGINT))
              AND r.seq + ? > d.max_seq AND r.seq <= d.max_seq
            ORDER BY r.ts
            """,
            [lookback_hours, self.window],
        ).fetchnumpy()
        for device, seq, ts in zip(recent["device"], recent["seq"].tolist(), recent["ts_ms"].tolist()):
            state = self._devices[device]
            slot = seq % self.window
            state.ring_seq[slot] = seq
            state.ring_ts[slot] = ts
        log.info("dedup state loaded", extra=fields(devices=len(self._devices), recent_readings=len(recent["device"])))
