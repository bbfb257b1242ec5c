"""`podwatch export`: the DuckDB file as hive-partitioned Parquet, for tools without podwatch.

Layout (each table directory is rewritten as a whole):

    DIR/samples/site=<site>/date=<YYYY-MM-DD>/data_0.parquet   ts, device, metric, value, quality
    DIR/readings/site=<site>/date=<YYYY-MM-DD>/data_0.parquet  ts, device, seq, n_points (one row per reading)
    DIR/rollup_1m/site=<site>/date=<YYYY-MM-DD>/...             (same for rollup_15m, rollup_1h)
    DIR/topology/{topo_racks,topo_devices,topo_power,topo_cdus}.parquet
    DIR/{alerts,risk_scores,forecasts}.parquet

Read back with `duckdb.read_parquet('DIR/samples/**/*.parquet', hive_partitioning=true)`,
`polars.scan_parquet('DIR/samples/**/*.parquet', hive_partitioning=True)` or
`pandas.read_parquet('DIR/samples')`. Timestamps are UTC (`TIMESTAMP` / `datetime64[us]`).
"""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path

import duckdb

from podwatch.errors import PodwatchError
from podwatch.logs import fields

log = logging.getLogger(__name__)

# table -> sort order inside a date partition
PARTITIONED = {"samples": "device, metric, ts", "readings": "device, ts", "rollup_1m": "device, metric, ts",
               "rollup_15m": "device, metric, ts", "rollup_1h": "device, metric, ts"}
TOPOLOGY = ("topo_racks", "topo_devices", "topo_power", "topo_cdus")
SHARED = ("alerts", "risk_scores", "forecasts")


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def site_id_of(con: duckdb.DuckDBPyConnection, default: str = "unknown") -> str:
    row = con.execute("SELECT value FROM podwatch_meta WHERE key = 'site'").fetchone()
    return row[0] if row else default


def export_parquet(con: duckdb.DuckDBPyConnection, out_dir: str | Path, site: str | None = None,
                   start: date | None = None, end: date | None = None) -> dict[str, int]:
    """Write the export; returns rows written per table. `start`/`end` limit the dates (inclusive)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    site = site or site_id_of(con)
    if "/" in site or "=" in site:
        raise PodwatchError(f"site id {site!r} cannot be a partition value (no '/' or '=')")
    written: dict[str, int] = {}
    where, params = ["TRUE"], []
    if start:
        where.append("ts >= ?")
        params.append(start)
    if end:
        where.append("ts < ?::DATE + 1")
        params.append(end)
    for table, order in PARTITIONED.items():
        n = con.execute(f"SELECT count(*) FROM {table} WHERE {' AND '.join(where)}", params).fetchone()[0]
        written[table] = n
        if n == 0:
            continue
        con.execute(
            f"COPY (SELECT ?::VARCHAR AS site, CAST(ts AS DATE) AS date, * FROM {table} WHERE {' AND '.join(where)} "
            f"ORDER BY date, {order}) TO {_quote(out / table)} "
            f"(FORMAT parquet, COMPRESSION zstd, PARTITION_BY (site, date), OVERWRITE)",
            [site, *params],
        )
    (out / "topology").mkdir(exist_ok=True)
    for table in TOPOLOGY:
        written[table] = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        con.execute(f"COPY {table} TO {_quote(out / 'topology' / (table + '.parquet'))} (FORMAT parquet)")
    for table in SHARED:
        written[table] = con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        con.execute(f"COPY {table} TO {_quote(out / (table + '.parquet'))} (FORMAT parquet)")
    log.info("export written", extra=fields(dir=str(out), site=site, **{k: v for k, v in written.items() if v}))
    return written
