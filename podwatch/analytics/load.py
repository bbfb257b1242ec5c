"""Load series of every power node and CDU, built from stored samples.

This module owns two things: reading the samples capacity analytics needs (from a DuckDB file,
read-only, or a folder of Parquet in the long format `ts, device, metric, value, quality`), and
turning per-PDU power into the *design load* of each node.

Design load under A/B (2N) feeds — why a busway carries "whole racks":
- In normal operation each rack draws about half its power from its A PDU and half from its B PDU,
  so a meter on busway A reads roughly half of the racks' power.
- Capacity must survive the loss of one side: when the B path fails, the A path carries each rack
  *entirely*. So the load a node must be sized for is the sum of the FULL power (A + B) of every
  rack that has the node on its A or its B path — each rack counted once, also at a transformer
  that both paths share. A rack feed (`m1-r01/a`) likewise carries the whole rack.
- A node's usable capacity (one side's rating x 80 %) is compared against that failover load; the
  normal, half-loaded reading is not the number that matters.
- A rack whose A or B PDU has no reading in a bucket is estimated at twice the side that did read
  (normal sharing is even). A rack with no PDU reading in a bucket — or no PDUs at all (a colo pod
  whose racks report only through their BMS) — takes the rack's own power figure
  (`rack.power_kw`, the whole rack). A rack with no reading at all leaves its nodes without a
  value for that bucket (counted in `LoadData.missing_buckets`) rather than pretending the load
  was lower.
- A transformer (or any node with no side) that has its own meter and lies on both the A and the B
  path of every rack behind it uses the meter: it also sees the cooling plant, auxiliaries and
  losses that rack PDUs do not. Sided nodes — and a transformer that feeds one side only (one
  transformer per side, edge-5mw) — use the failover load from PDUs, because their meters read
  only the normal half share. Such a node also gets an
  IT-only column (`<node>#it`, from PDUs) so that stranded power compares like with like.
- A CDU's load is the heat it removes (`cdu.heat_removed_kw`); without that reading, its racks'
  power x heat-to-liquid share.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import polars as pl

from podwatch.analytics.capacity import racks_behind
from podwatch.errors import PodwatchError
from podwatch.site import Site

log = logging.getLogger(__name__)

LOAD_METRICS = ("pdu.power_kw", "meter.power_kw", "cdu.heat_removed_kw", "rack.power_kw")
GOOD_QUALITY = 0
FILL_LIMIT_BUCKETS = 5  # a reading carries forward over at most this many empty buckets
IT_SUFFIX = "#it"  # column of the IT-only (PDU) load of a node whose design load comes from its meter
# Bucketed rows read and load-grid cells built at most: `--bucket-s 1` over months of data would
# otherwise fill the machine's memory (90 days at 1 s is 7.8 M buckets per series).
MAX_BUCKETED_ROWS = 50_000_000
MAX_GRID_CELLS = 200_000_000


class DataSourceError(PodwatchError):
    """The samples could not be read (locked DuckDB file, missing folder, wrong columns)."""


def _too_fine(bucket_s: int, span_s: float, per_bucket: int, estimate: float, what: str, cap: int) -> DataSourceError:
    # (span / b + 1) x per_bucket <= cap  <=>  b >= span x per_bucket / (cap - per_bucket)
    smallest = max(int(bucket_s) + 1, -(-int(span_s * per_bucket) // max(1, cap - per_bucket)))
    return DataSourceError(f"--bucket-s {bucket_s}: {span_s / 86400:,.1f} days of data in {bucket_s} s buckets give "
                           f"{estimate:,.0f} {what} (at most {cap:,}); use --bucket-s {smallest} or more, or less data")


@dataclass
class LoadData:
    """Design load per node on a regular time grid."""

    loads: pl.DataFrame  # columns: ts (UTC datetime), one Float64 column per node id (kW)
    bucket_s: int
    node_kinds: dict[str, str]
    rows_read: int = 0
    rows_not_good: int = 0  # samples with quality != good, not used (counted, not hidden)
    missing_buckets: dict[str, int] = field(default_factory=dict)
    racks_behind: dict[str, int] = field(default_factory=dict)

    def node_info(self) -> dict:
        """Kind and rack count per series, for the forecaster (`forecast.NodeInfo`)."""
        from podwatch.analytics.forecast import NodeInfo

        return {n: NodeInfo(kind=self.node_kinds.get(n, "other"), racks=self.racks_behind.get(n, 0)) for n in self.nodes}

    @property
    def nodes(self) -> list[str]:
        return [c for c in self.loads.columns if c != "ts"]

    def hourly_peaks(self) -> pl.DataFrame:
        """Peak (max over buckets) per clock hour and node: ts = start of the hour."""
        return (self.loads.sort("ts").group_by_dynamic("ts", every="1h")
                .agg([pl.col(n).max() for n in self.nodes]))


def _utc(frame: pl.DataFrame) -> pl.DataFrame:
    """`ts` as microsecond UTC datetimes, whatever the source wrote (ms, naive, epoch ms)."""
    return _to_utc(frame).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))


def _to_utc(frame: pl.DataFrame) -> pl.DataFrame:
    dtype = frame.schema["ts"]
    if dtype.is_integer():
        return frame.with_columns(pl.from_epoch("ts", time_unit="ms").dt.replace_time_zone("UTC"))
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            return frame.with_columns(pl.col("ts").dt.replace_time_zone("UTC"))
        return frame.with_columns(pl.col("ts").dt.convert_time_zone("UTC"))
    raise DataSourceError(f"column 'ts' has type {dtype}; expected a timestamp or epoch milliseconds")


def duckdb_frame(con, sql: str, params: list | None = None) -> pl.DataFrame:
    """Run a query and return all its rows as polars (DuckDB 2 wants results fully consumed)."""
    return con.sql(sql, params=params or None).pl()


def read_samples_duckdb(path: str | Path, bucket_s: int, start: datetime | None = None,
                        end: datetime | None = None, metrics: tuple[str, ...] = LOAD_METRICS) -> tuple[pl.DataFrame, int, int]:
    """Bucket means per (device, metric) from the `samples` table, opened read-only.

    Returns (frame[ts, device, metric, value], rows read, rows with quality != good)."""
    import duckdb

    path = Path(path)
    if not path.exists():
        raise DataSourceError(f"--db {path}: no such file")
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise DataSourceError(
                f"--db {path} is locked by another process (a running `podwatch serve`/`demo` owns it; DuckDB "
                "allows no second reader). Read through the HTTP API instead, or export Parquet "
                "(`podwatch export`) and pass --history DIR.") from None
        raise DataSourceError(f"--db {path}: {exc}") from None
    try:
        return read_samples_connection(con, bucket_s, start, end, metrics, what=f"--db {path}")
    finally:
        con.close()


def _naive_utc(moment: datetime) -> datetime:
    """`samples.ts` is TIMESTAMP holding UTC: compare with naive UTC datetimes."""
    from datetime import timezone

    return moment.astimezone(timezone.utc).replace(tzinfo=None) if moment.tzinfo is not None else moment


def read_samples_connection(con, bucket_s: int, start: datetime | None = None, end: datetime | None = None,
                            metrics: tuple[str, ...] = LOAD_METRICS, what: str = "database") -> tuple[pl.DataFrame, int, int]:
    """Like `read_samples_duckdb`, over an open connection — for the process that owns the file."""
    con.execute("SET TimeZone = 'UTC'")
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if "samples" not in tables:
        raise DataSourceError(f"{what}: no 'samples' table (is this a podwatch database?)")
    where = ["metric IN (" + ",".join("?" for _ in metrics) + ")"]
    params: list = list(metrics)
    if start is not None:
        where.append("ts >= ?")
        params.append(_naive_utc(start))
    if end is not None:
        where.append("ts < ?")
        params.append(_naive_utc(end))
    cond = " AND ".join(where)
    counts = con.execute(f"SELECT count(*), count(*) FILTER (WHERE quality <> {GOOD_QUALITY} OR value IS NULL) "
                         f"FROM samples WHERE {cond}", params).fetchall()[0]
    if counts[0] > MAX_BUCKETED_ROWS:  # buckets that small might not shrink the rows enough
        t0, t1, series = con.execute(f"SELECT min(ts), max(ts), count(DISTINCT (device, metric)) FROM samples "
                                     f"WHERE {cond}", params).fetchall()[0]
        span_s = (t1 - t0).total_seconds()
        estimate = min(counts[0], (span_s / bucket_s + 1) * series)
        if estimate > MAX_BUCKETED_ROWS:
            raise _too_fine(bucket_s, span_s, series, estimate, "bucketed readings", MAX_BUCKETED_ROWS)
    frame = duckdb_frame(
        con, f"SELECT time_bucket(INTERVAL '{int(bucket_s)} seconds', ts) AS ts, device, metric, avg(value) AS value "
             f"FROM samples WHERE {cond} AND quality = {GOOD_QUALITY} AND value IS NOT NULL GROUP BY ALL ORDER BY ts",
        params)
    return _utc(frame), int(counts[0]), int(counts[1])


def read_samples_parquet(folder: str | Path, bucket_s: int, start: datetime | None = None,
                         end: datetime | None = None, metrics: tuple[str, ...] = LOAD_METRICS) -> tuple[pl.DataFrame, int, int]:
    """Bucket means per (device, metric) from Parquet files in the long format under `folder`:
    a simulator history folder (`samples.parquet`), a `podwatch export` folder
    (`samples/site=*/date=*/*.parquet`), or any folder of long-format files."""
    folder = Path(folder)
    files = sorted(folder.rglob("*.parquet")) if folder.is_dir() else ([folder] if folder.suffix == ".parquet" else [])
    # a simulator folder also holds truth_*.parquet, a `podwatch export` folder rollups, topology,
    # alerts, ...: read only samples (simulator: samples.parquet; export: samples/site=/date=/*.parquet)
    named = [f for f in files if f.name.startswith("samples") or "samples" in f.relative_to(folder).parts[:-1]] \
        if folder.is_dir() else files
    files = named or files
    if not files:
        raise DataSourceError(f"--history {folder}: no .parquet files found")
    lazy = pl.scan_parquet(files, hive_partitioning=False, missing_columns="insert", extra_columns="ignore")
    names = set(lazy.collect_schema().names())
    missing = {"ts", "device", "metric", "value"} - names
    if missing:
        raise DataSourceError(f"--history {folder}: Parquet lacks column(s) {', '.join(sorted(missing))} "
                              "(expected the long format ts, device, metric, value, quality)")
    lazy = lazy.filter(pl.col("metric").is_in(list(metrics)))
    frame = lazy.select(["ts", "device", "metric", "value"] + (["quality"] if "quality" in names else [])).collect()
    frame = _utc(frame)
    if start is not None:
        frame = frame.filter(pl.col("ts") >= pl.lit(start).dt.replace_time_zone("UTC") if start.tzinfo is None else pl.col("ts") >= start)
    if end is not None:
        frame = frame.filter(pl.col("ts") < pl.lit(end).dt.replace_time_zone("UTC") if end.tzinfo is None else pl.col("ts") < end)
    good = pl.col("value").is_not_null() & pl.col("value").is_finite()
    if "quality" in frame.columns:
        good = good & (pl.col("quality") == GOOD_QUALITY)
    rows = frame.height
    kept = frame.filter(good)
    bucketed = (kept.with_columns(pl.col("ts").dt.truncate(f"{int(bucket_s)}s"))
                .group_by(["ts", "device", "metric"]).agg(pl.col("value").mean()).sort("ts"))
    return bucketed, rows, rows - kept.height


def node_loads(site: Site, samples: pl.DataFrame, bucket_s: int) -> LoadData:
    """Design load (kW) per power node and CDU on a regular grid of `bucket_s` seconds.

    `samples`: bucketed means with columns ts, device, metric, value (see the read_* functions)."""
    from podwatch.analytics.capacity import site_capacities

    capacities = site_capacities(site)
    kinds = {n: c.kind for n, c in capacities.items()}
    if samples.is_empty():
        raise DataSourceError("no pdu.power_kw / rack.power_kw / meter.power_kw / cdu.heat_removed_kw samples "
                              "in the selected data")
    site_devices = {d.id for d in site.devices}
    if not samples.filter(pl.col("device").is_in(list(site_devices))).height:
        others = sorted(samples["device"].unique().to_list())
        raise DataSourceError(f"the data holds no load samples of any device of site '{site.id}' ({len(others)} other "
                              f"device(s), e.g. '{others[0]}'): is it another site's data? Give the matching --site file")
    every = f"{int(bucket_s)}s"
    samples = samples.with_columns(pl.col("ts").dt.truncate(every))
    t0, t1 = samples["ts"].min(), samples["ts"].max()
    span_s = (t1 - t0).total_seconds()
    cells = (span_s / bucket_s + 1) * max(1, len(capacities))
    if cells > MAX_GRID_CELLS:
        raise _too_fine(bucket_s, span_s, max(1, len(capacities)), cells, "load cells (buckets x nodes)", MAX_GRID_CELLS)
    grid = pl.DataFrame({"ts": pl.datetime_range(t0, t1, every, eager=True, time_zone="UTC")})

    def wide(metric: str, column_of: dict[str, str]) -> pl.DataFrame:
        part = samples.filter((pl.col("metric") == metric) & pl.col("device").is_in(list(column_of)))
        if part.is_empty():
            return grid
        part = (part.with_columns(pl.col("device").replace_strict(column_of).alias("col"))
                .group_by(["ts", "col"]).agg(pl.col("value").sum())
                .pivot(on="col", index="ts", values="value"))
        return grid.join(part, on="ts", how="left").sort("ts")

    pdu_col = {d.id: f"{d.entity}/{d.side}" for d in site.devices if d.kind == "pdu" and d.side in ("a", "b")}
    pdu = wide("pdu.power_kw", pdu_col).with_columns(pl.exclude("ts").forward_fill(limit=FILL_LIMIT_BUCKETS))
    bms_col = {d.id: f"bms:{d.entity}" for d in site.devices if d.kind == "rack"}
    bms = wide("rack.power_kw", bms_col).with_columns(pl.exclude("ts").forward_fill(limit=FILL_LIMIT_BUCKETS))
    pdu = pdu.join(bms, on="ts", how="left")
    rack_exprs = []
    for rack in site.racks:
        a = pl.col(f"{rack.id}/a") if f"{rack.id}/a" in pdu.columns else pl.lit(None, pl.Float64)
        b = pl.col(f"{rack.id}/b") if f"{rack.id}/b" in pdu.columns else pl.lit(None, pl.Float64)
        own = pl.col(f"bms:{rack.id}") if f"bms:{rack.id}" in pdu.columns else pl.lit(None, pl.Float64)
        rack_exprs.append(pl.when(a.is_not_null() & b.is_not_null()).then(a + b)
                          .when(a.is_not_null()).then(2 * a).when(b.is_not_null()).then(2 * b)
                          .otherwise(own).cast(pl.Float64).alias(rack.id))
    racks = pdu.select(["ts", *rack_exprs])

    meter_col = {d.id: d.entity for d in site.devices if d.kind == "meter" and d.entity in site.power_nodes}
    meters = wide("meter.power_kw", meter_col).with_columns(pl.exclude("ts").forward_fill(limit=FILL_LIMIT_BUCKETS))
    cdu_col = {d.id: d.entity for d in site.devices if d.kind == "cdu" and d.entity in capacities}
    heat = wide("cdu.heat_removed_kw", cdu_col).with_columns(pl.exclude("ts").forward_fill(limit=FILL_LIMIT_BUCKETS))

    def racks_sum(rack_ids) -> pl.Expr:
        cols = [pl.col(r) for r in rack_ids]
        # any rack without a value -> the node has no value (never under-report a load)
        return pl.when(pl.any_horizontal([c.is_null() for c in cols])).then(None).otherwise(pl.sum_horizontal(cols))

    def on_both_paths(node_id: str, rack_ids) -> bool:
        """The node carries every rack behind it on both its A and B path, so its meter sees the whole
        load. A transformer that feeds one side only (edge-5mw: xfmr-a -> A switchgear) reads the
        normal half share, like a sided node, and must be sized on the failover load instead."""
        for rack in (site.rack(r) for r in rack_ids):
            paths = [{n.id for n in site.power_path(feed)} for feed in (rack.feed_a, rack.feed_b)]
            if not all(node_id in ids for ids in paths):
                return False
        return True

    exprs = []
    for node_id, cap in capacities.items():
        if not cap.racks:
            continue
        pdu_load = racks_sum(cap.racks)
        if cap.kind == "cdu":
            share = site.cdu(node_id).heat_to_liquid
            expr = pl.coalesce(pl.col(f"heat:{node_id}"), pdu_load * share) if node_id in heat.columns else pdu_load * share
        elif cap.side is None and node_id in meters.columns and on_both_paths(node_id, cap.racks):
            expr = pl.coalesce(pl.col(f"meter:{node_id}"), pdu_load)
            # the IT-only load too: stranded power compares rated IT allocation with IT draw
            exprs.append(pdu_load.cast(pl.Float64).alias(f"{node_id}{IT_SUFFIX}"))
        else:
            expr = pdu_load
        exprs.append(expr.cast(pl.Float64).alias(node_id))
    combined = (racks
                .join(meters.rename({c: f"meter:{c}" for c in meters.columns if c != "ts"}), on="ts", how="left")
                .join(heat.rename({c: f"heat:{c}" for c in heat.columns if c != "ts"}), on="ts", how="left"))
    loads = combined.select(["ts", *exprs])
    missing = {c: int(loads[c].null_count()) for c in loads.columns if c != "ts" and loads[c].null_count()}
    if missing:
        log.info("some buckets have no load value (a rack or meter without readings)",
                 extra={"nodes_with_gaps": len(missing), "max_missing_buckets": max(missing.values())})
    return LoadData(loads=loads, bucket_s=int(bucket_s),
                    node_kinds={c: kinds[c.removesuffix(IT_SUFFIX)] for c in loads.columns if c != "ts"},
                    missing_buckets=missing,
                    racks_behind={c: len(capacities[c.removesuffix(IT_SUFFIX)].racks) for c in loads.columns if c != "ts"})


def load_from_source(site: Site, db: str | Path | None = None, history: str | Path | None = None,
                     bucket_s: int = 60, start: datetime | None = None, end: datetime | None = None) -> LoadData:
    """Read samples from exactly one of `db` (DuckDB, read-only) or `history` (Parquet folder)
    and build the node loads."""
    if (db is None) == (history is None):
        raise DataSourceError("give exactly one data source: --db FILE (DuckDB) or --history DIR (Parquet)")
    if db is not None:
        frame, rows, bad = read_samples_duckdb(db, bucket_s, start, end)
    else:
        frame, rows, bad = read_samples_parquet(history, bucket_s, start, end)
    data = node_loads(site, frame, bucket_s)
    data.rows_read, data.rows_not_good = rows, bad
    return data
