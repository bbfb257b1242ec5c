"""Rollups (1 min, 15 min, 1 h) maintained incrementally, and retention.

A rollup bucket is computed once, when it is closed: its end lies `lateness_s` behind the
newest stored sample. `rollup_state.done_until` records how far each rollup is final;
`advance_rollups()` computes only the buckets between that mark and the new one (1 min from
`samples`, 15 min from 1 min, 1 h from 15 min) and moves the mark in the same transaction.
Samples that arrive for an already-closed bucket make the sink call `recompute_buckets()` in
its write transaction, so rollups never disagree with the raw table. Queries read closed
buckets from the rollup and aggregate the still-open tail from `samples` (see queries.py).

Retention deletes raw rows (samples and their readings) and rollup rows older than the
configured age, measured from the newest stored sample (not the wall clock, so a backfilled
history is not deleted on import).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import duckdb
from pydantic import BaseModel, ConfigDict, Field

from podwatch.logs import fields
from podwatch.storage.schema import ROLLUP_SECONDS, ROLLUP_STORED_COLUMNS, ROLLUPS

log = logging.getLogger(__name__)

# Each rollup and the relation it is computed from.
ROLLUP_SOURCES = {"rollup_1m": "samples", "rollup_15m": "rollup_1m", "rollup_1h": "rollup_15m"}
MAX_BUCKETS_PER_STEP = 720  # bound one transaction (12 h of 1-min buckets) while catching up


class StorageSettings(BaseModel):
    """Retention and rollup settings of the DuckDB store."""

    model_config = ConfigDict(extra="forbid")

    raw_retention_days: float | None = Field(14.0, gt=0, description="Keep raw samples this long (None: forever)")
    rollup_1m_retention_days: float | None = Field(90.0, gt=0)
    rollup_15m_retention_days: float | None = Field(400.0, gt=0)
    rollup_1h_retention_days: float | None = Field(None, gt=0, description="None: kept forever")
    rollup_lateness_s: float = Field(120.0, ge=0, description="A bucket is closed this long after its end (newest sample time)")
    retention_every_s: float = Field(600.0, gt=0, description="How often the sink applies retention")

    def retention_days(self) -> dict[str, float | None]:
        return {
            "samples": self.raw_retention_days,
            "rollup_1m": self.rollup_1m_retention_days,
            "rollup_15m": self.rollup_15m_retention_days,
            "rollup_1h": self.rollup_1h_retention_days,
        }


# Sums are compensated (fsum, Kahan): besides being more exact, the sum of values with a few
# decimals then comes out as the double nearest that short decimal, which ALP stores in ~3 B;
# a naive sum's rounding noise needs ALP_RD (~7 B per rollup row).
def _aggregate_sql(rollup: str) -> str:
    interval = ROLLUPS[rollup]
    source = ROLLUP_SOURCES[rollup]
    if source == "samples":
        return f"""
        SELECT time_bucket(INTERVAL '{interval}', ts) AS bucket, device, metric,
               min(value), max(value), fsum(value), arg_max(value, ts), max(ts),
               count(*), count(value), max(quality)
        FROM samples WHERE ts >= $lo AND ts < $hi {{extra}}
        GROUP BY ALL ORDER BY bucket, device, metric
        """
    return f"""
        SELECT time_bucket(INTERVAL '{interval}', ts) AS bucket, device, metric,
               min(value_min), max(value_max), fsum(value_sum),
               arg_max(value_last, last_ts), max(last_ts), sum(n), sum(n_values), max(quality_max)
        FROM {source} WHERE ts >= $lo AND ts < $hi {{extra}}
        GROUP BY ALL ORDER BY bucket, device, metric
    """


def _insert_sql(rollup: str) -> str:
    """INSERT of the stored columns (value_avg is generated), rows in (bucket, device, metric)
    order: time-major like the raw rows, and runs of device names compress better than the
    hash aggregate's order."""
    return f"INSERT INTO {rollup} ({', '.join(ROLLUP_STORED_COLUMNS)}) " + _aggregate_sql(rollup).format(extra="")


def newest_sample_ts(con: duckdb.DuckDBPyConnection) -> datetime | None:
    """Newest stored reading time (from the small dedup_state table, not a scan of samples)."""
    return con.execute("SELECT max(max_ts) FROM dedup_state").fetchone()[0]


def done_until(con: duckdb.DuckDBPyConnection) -> dict[str, datetime | None]:
    rows = dict(con.execute("SELECT rollup, done_until FROM rollup_state").fetchall())
    return {name: rows.get(name) for name in ROLLUPS}


def _floor(ts: datetime, seconds: int) -> datetime:
    epoch = datetime(1970, 1, 1)
    return epoch + timedelta(seconds=int((ts - epoch).total_seconds() // seconds * seconds))


def advance_rollups(con: duckdb.DuckDBPyConnection, lateness_s: float = 120.0) -> dict[str, int]:
    """Compute newly closed buckets of every rollup; returns rows written per rollup.
    Each step is its own transaction; call it again while it reports work while catching up."""
    written: dict[str, int] = {}
    newest = newest_sample_ts(con)
    if newest is None:
        return written
    marks = done_until(con)
    for rollup, seconds in ROLLUP_SECONDS.items():
        source = ROLLUP_SOURCES[rollup]
        # Closed = bucket end <= newest - lateness; coarser rollups also wait for their source.
        limit = newest - timedelta(seconds=lateness_s)
        if source != "samples":
            source_mark = marks.get(source)
            if source_mark is None:
                continue
            limit = min(limit, source_mark)
        target = _floor(limit, seconds)
        start = marks.get(rollup)
        if start is None:
            first = con.execute(f"SELECT min(ts) FROM {source}").fetchone()[0]
            if first is None:
                continue
            start = _floor(first, seconds)
        if target <= start:
            continue
        target = min(target, start + timedelta(seconds=seconds * MAX_BUCKETS_PER_STEP))
        con.execute("BEGIN TRANSACTION")
        try:
            n = con.execute(
                _insert_sql(rollup), {"lo": start, "hi": target}
            ).fetchone()[0]
            con.execute("INSERT OR REPLACE INTO rollup_state VALUES (?, ?)", [rollup, target])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        marks[rollup] = target
        written[rollup] = n
    return written


def recompute_buckets(con: duckdb.DuckDBPyConnection, late_ts_min: datetime, late_ts_max: datetime,
                      marks: dict[str, datetime | None], raw_kept_since: datetime | None = None) -> int:
    """Recompute the closed buckets touched by late samples in [late_ts_min, late_ts_max].
    Runs inside the caller's transaction (the sink's write). Returns buckets recomputed.
    Buckets whose raw samples are (partly) past retention are left alone: recomputing them
    from what is left would lose the rollup of the deleted samples."""
    if raw_kept_since is not None:
        safe_from = _floor(raw_kept_since, max(ROLLUP_SECONDS.values())) + timedelta(seconds=max(ROLLUP_SECONDS.values()))
        if late_ts_min < safe_from:
            log.warning("late samples older than the raw retention: stored, rollups not recomputed",
                        extra=fields(oldest=late_ts_min, raw_kept_since=raw_kept_since))
            late_ts_min = safe_from
            if late_ts_min > late_ts_max:
                return 0
    recomputed = 0
    for rollup, seconds in ROLLUP_SECONDS.items():
        mark = marks.get(rollup)
        if mark is None or late_ts_min >= mark:
            continue
        lo = _floor(late_ts_min, seconds)
        hi = min(mark, _floor(late_ts_max, seconds) + timedelta(seconds=seconds))
        con.execute(f"DELETE FROM {rollup} WHERE ts >= ? AND ts < ?", [lo, hi])
        con.execute(_insert_sql(rollup), {"lo": lo, "hi": hi})
        recomputed += int((hi - lo).total_seconds() // seconds)
    if recomputed:
        log.info("rollup buckets recomputed for late samples", extra=fields(buckets=recomputed, since=late_ts_min))
    return recomputed


def write_retention_settings(con: duckdb.DuckDBPyConnection, settings: StorageSettings) -> None:
    for relation, days in settings.retention_days().items():
        con.execute("INSERT OR REPLACE INTO retention_settings VALUES (?, ?)", [relation, days])


def apply_retention(con: duckdb.DuckDBPyConnection, settings: StorageSettings) -> dict[str, int]:
    """Delete rows older than each relation's retention (relative to the newest sample)."""
    newest = newest_sample_ts(con)
    deleted: dict[str, int] = {}
    if newest is None:
        return deleted
    for relation, days in settings.retention_days().items():
        if days is None:
            continue
        cutoff = newest - timedelta(days=days)
        if relation == "samples":  # a view over sample_rows; the readings of those rows go with them
            n = con.execute("DELETE FROM sample_rows WHERE ts < ?", [cutoff]).fetchone()[0]
            readings = con.execute("DELETE FROM reading_rows WHERE ts < ?", [cutoff]).fetchone()[0]
            if readings:
                deleted["readings"] = readings
        else:
            n = con.execute(f"DELETE FROM {relation} WHERE ts < ?", [cutoff]).fetchone()[0]
        if n:
            deleted[relation] = n
    if deleted:
        log.info("retention applied", extra=fields(**deleted))
    return deleted
