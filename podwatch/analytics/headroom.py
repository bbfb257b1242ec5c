"""Headroom and stranded power per node and CDU, written as `forecasts` rows (`podwatch headroom`).

This module owns the numbers operators plan with:
- headroom_kw = usable_kw − forecast P99 peak: what the node can still take on top of its worst
  expected peak, with its failover rule applied (usable from `capacity.py`, design load from `load.py`).
- stranded_kw = provisioned_kw − forecast P99 peak: power that is allocated to racks (their rated
  kW behind the node) but that the racks are not expected to draw even at P99 — capacity that is
  paid for and reserved, yet idle; the target of consolidation or oversubscription.
- A node whose load comes from its own meter (a transformer: IT plus cooling and auxiliaries) gets
  headroom from the metered forecast, but stranded power from its IT-only (PDU) forecast, since
  the provisioned figure is the racks' rated IT power.
- measured_peak_kw: the largest bucketed load in the last 24 h (for the '24h' row) or 7 days ('7d').
The rows follow the pinned `forecasts` table (podwatch/storage/schema.py); the HTTP API serves them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl

from podwatch.analytics.capacity import site_capacities
from podwatch.analytics.forecast import HORIZON_HOURS, ForecastConfig, forecast_peaks
from podwatch.analytics.load import IT_SUFFIX, DataSourceError, LoadData, duckdb_frame
from podwatch.site import Site

FORECAST_COLUMNS = ("generated_at", "node", "node_kind", "horizon", "usable_kw", "provisioned_kw", "measured_peak_kw",
                    "p50_kw", "p95_kw", "p99_kw", "headroom_kw", "stranded_kw", "model_version")


@dataclass(frozen=True)
class ForecastRow:
    """One row of the `forecasts` table."""

    generated_at: datetime
    node: str
    node_kind: str
    horizon: str
    usable_kw: float
    provisioned_kw: float | None
    measured_peak_kw: float | None
    p50_kw: float | None
    p95_kw: float | None
    p99_kw: float | None
    headroom_kw: float | None
    stranded_kw: float | None
    model_version: str | None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class HeadroomReport:
    rows: list[ForecastRow]
    notes: dict[str, str] = field(default_factory=dict)  # per horizon: fallbacks, skips
    data_until: datetime | None = None

    def frame(self) -> pl.DataFrame:
        return rows_frame(self.rows)

    def for_horizon(self, horizon: str) -> dict[str, ForecastRow]:
        return {r.node: r for r in self.rows if r.horizon == horizon}


def rows_frame(rows: list[ForecastRow]) -> pl.DataFrame:
    schema = {"generated_at": pl.Datetime("us", "UTC"), "node": pl.String, "node_kind": pl.String,
              "horizon": pl.String, "usable_kw": pl.Float64, "provisioned_kw": pl.Float64,
              "measured_peak_kw": pl.Float64, "p50_kw": pl.Float64, "p95_kw": pl.Float64, "p99_kw": pl.Float64,
              "headroom_kw": pl.Float64, "stranded_kw": pl.Float64, "model_version": pl.String}
    return pl.DataFrame([r.as_dict() for r in rows], schema=schema)


def compute_headroom(site: Site, load: LoadData, config: ForecastConfig | None = None,
                     generated_at: datetime | None = None, horizons: tuple[str, ...] = ("24h", "7d")) -> HeadroomReport:
    """Forecast every node's peak and turn it into headroom/stranded rows, one per node and horizon."""
    generated_at = generated_at or datetime.now(timezone.utc)
    capacities = site_capacities(site)
    hourly = load.hourly_peaks()
    forecasts, notes = forecast_peaks(hourly, site.spec.site.timezone, config, horizons, node_info=load.node_info())
    by_key = {(f.node, f.horizon): f for f in forecasts}
    last_ts = load.loads["ts"].max()
    rows: list[ForecastRow] = []
    for horizon in horizons:
        since = last_ts - timedelta(hours=HORIZON_HOURS[horizon])
        recent = load.loads.filter(pl.col("ts") > since)
        for node_id, cap in capacities.items():
            fc = by_key.get((node_id, horizon))
            measured = None
            if node_id in recent.columns:
                measured = recent[node_id].max()
            p99 = fc.p99_kw if fc else (0.0 if not cap.racks else None)
            it_fc = by_key.get((node_id + IT_SUFFIX, horizon))  # metered node: stranded vs IT draw only
            it_p99 = it_fc.p99_kw if it_fc else p99
            version = fc.method if fc else ("no load behind this node" if not cap.racks else None)
            if p99 is None and measured is not None:
                # too little history to forecast (a new site, a short demo): say what we can, labelled
                p99 = it_p99 = None
                version = f"no forecast (history < 7 days); headroom from the measured {horizon} peak"
            rows.append(ForecastRow(
                generated_at=generated_at, node=node_id, node_kind=cap.kind, horizon=horizon,
                usable_kw=cap.usable_kw, provisioned_kw=cap.provisioned_kw,
                measured_peak_kw=float(measured) if measured is not None else None,
                p50_kw=fc.p50_kw if fc else None, p95_kw=fc.p95_kw if fc else None, p99_kw=fc.p99_kw if fc else None,
                headroom_kw=(cap.usable_kw - p99 if p99 is not None
                             else cap.usable_kw - float(measured) if measured is not None else None),
                stranded_kw=cap.provisioned_kw - it_p99 if it_p99 is not None else None,
                model_version=version))
    return HeadroomReport(rows=rows, notes=notes, data_until=last_ts)


def refresh_forecasts(con, site: Site, bucket_s: int = 60, history_days: float = 42.0,
                      config: ForecastConfig | None = None, now: datetime | None = None) -> HeadroomReport:
    """For the process that owns the DuckDB file (serve/demo): read the last `history_days` of
    samples over `con`, compute headroom for every node and CDU, and store the rows in `forecasts`
    (one transaction). Call it every few hours; a run takes seconds."""
    from podwatch.analytics.load import node_loads, read_samples_connection

    now = now or datetime.now(timezone.utc)
    frame, rows_read, not_good = read_samples_connection(con, bucket_s, start=now - timedelta(days=history_days))
    load = node_loads(site, frame, bucket_s)
    load.rows_read, load.rows_not_good = rows_read, not_good
    report = compute_headroom(site, load, config, generated_at=now)
    con.execute("BEGIN TRANSACTION")
    try:
        write_forecasts(con, report.rows)
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return report


class HeadroomRefresher:
    """The periodic headroom job for the process that owns the DuckDB file (`podwatch serve`/demo):

        service.add_periodic(HeadroomRefresher(site).run_once, every_s=3600)

    Each run reads the last `history_days` of samples through `service.db.run` (a cursor in a
    worker thread), fits and forecasts in another thread without holding the database, then
    stores the rows in `forecasts` in one transaction. A run with no samples yet does nothing."""

    def __init__(self, site: Site, bucket_s: int = 60, history_days: float = 42.0,
                 config: ForecastConfig | None = None):
        self.site, self.bucket_s, self.history_days, self.config = site, bucket_s, history_days, config
        self.runs = 0
        self.last: HeadroomReport | None = None

    async def run_once(self, service) -> HeadroomReport | None:
        import asyncio
        import logging

        from podwatch.analytics.load import node_loads, read_samples_connection

        now = datetime.now(timezone.utc)
        frame, rows_read, not_good = await service.db.run(
            lambda cur: read_samples_connection(cur, self.bucket_s, start=now - timedelta(days=self.history_days)))
        if frame.is_empty():
            logging.getLogger(__name__).info("headroom: no load samples yet; nothing to forecast")
            return None

        def compute() -> HeadroomReport:
            load = node_loads(self.site, frame, self.bucket_s)
            load.rows_read, load.rows_not_good = rows_read, not_good
            return compute_headroom(self.site, load, self.config, generated_at=now)

        report = await asyncio.to_thread(compute)

        def store(cur) -> int:
            cur.execute("BEGIN TRANSACTION")
            try:
                n = write_forecasts(cur, report.rows)
                cur.execute("COMMIT")
                return n
            except Exception:
                cur.execute("ROLLBACK")
                raise

        await service.db.run(store)
        self.runs += 1
        self.last = report
        return report


def write_forecasts(con, rows: list[ForecastRow]) -> int:
    """Insert (or replace, by primary key) rows into `forecasts` on an open DuckDB connection."""
    from podwatch.storage.schema import ensure_shared_tables

    ensure_shared_tables(con)
    if not rows:
        return 0
    frame = rows_frame(rows)  # noqa: F841  (read by DuckDB's replacement scan)
    con.execute(f"INSERT OR REPLACE INTO forecasts ({', '.join(FORECAST_COLUMNS)}) "
                f"SELECT {', '.join(FORECAST_COLUMNS)} FROM frame")
    return len(rows)


def write_forecasts_db(path: str | Path, rows: list[ForecastRow]) -> int:
    """Open the DuckDB file read-write just long enough to store the rows."""
    import duckdb

    try:
        con = duckdb.connect(str(path))
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise DataSourceError(f"cannot write forecasts to {path}: it is locked by another process (a running "
                                  "`podwatch serve`/`demo` owns it). Use --out FILE instead, or let that process "
                                  "compute headroom.") from None
        raise DataSourceError(f"cannot open {path}: {exc}") from None
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute("BEGIN TRANSACTION")
        n = write_forecasts(con, rows)
        con.execute("COMMIT")
        return n
    finally:
        con.close()


def read_forecasts(path: str | Path) -> list[ForecastRow]:
    """The latest `forecasts` row per (node, horizon) from a DuckDB file (read-only)."""
    import duckdb

    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.IOException as exc:
        raise DataSourceError(f"cannot read forecasts from {path}: {exc}") from None
    try:
        con.execute("SET TimeZone = 'UTC'")
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "forecasts" not in tables:
            return []
        frame = duckdb_frame(con, f"SELECT {', '.join(FORECAST_COLUMNS)} FROM forecasts "
                                  "QUALIFY row_number() OVER (PARTITION BY node, horizon ORDER BY generated_at DESC) = 1")
    finally:
        con.close()
    return [ForecastRow(**row) for row in frame.iter_rows(named=True)]


def write_rows_file(rows: list[ForecastRow], path: str | Path) -> Path:
    """Export rows as .parquet, .csv or .json (by suffix)."""
    path = Path(path)
    frame = rows_frame(rows)
    if path.suffix == ".parquet":
        frame.write_parquet(path)
    elif path.suffix == ".csv":
        frame.write_csv(path)
    elif path.suffix == ".json":
        frame.write_json(path)
    else:
        raise DataSourceError(f"--out {path}: unknown format (use .parquet, .csv or .json)")
    return path
