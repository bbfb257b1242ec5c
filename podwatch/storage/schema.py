"""The DuckDB schema: every table and view podwatch keeps, created idempotently.

Ownership: the storage stage owns `samples`, `readings`, rollups, topology, `ingest_offsets` and views.
The analytics stage writes `risk_scores` and `forecasts`; the alerting stage writes `alerts`
and `alert_outbox`. Their columns are a contract read by the HTTP API and the dashboards:
change them only together with `docs/storage.md` and the API.
"""

from __future__ import annotations

import contextlib
import logging

import duckdb

from podwatch.errors import PodwatchError

log = logging.getLogger(__name__)

# Tables written by analytics and alerting (contract; see docs/storage.md).
SHARED_TABLES_DDL = [
    """
    CREATE TABLE IF NOT EXISTS risk_scores (
        ts            TIMESTAMPTZ NOT NULL,   -- time the score refers to (end of the feature window)
        rack          VARCHAR     NOT NULL,
        horizon_s     INTEGER     NOT NULL,   -- breach within this many seconds
        probability   DOUBLE      NOT NULL,   -- 0..1
        level         VARCHAR     NOT NULL,   -- ok | watch | warning | critical
        reasons       VARCHAR     NOT NULL,   -- JSON array of sentences, most important first
        model_version VARCHAR     NOT NULL,
        PRIMARY KEY (rack, ts, horizon_s)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS forecasts (
        generated_at     TIMESTAMPTZ NOT NULL,
        node             VARCHAR     NOT NULL,  -- power node id (transformer, feeder, busway, rack feed) or CDU id
        node_kind        VARCHAR     NOT NULL,  -- transformer | feeder | busway | rack_feed | cdu
        horizon          VARCHAR     NOT NULL,  -- '24h' | '7d'
        usable_kw        DOUBLE      NOT NULL,  -- rating x derating x 0.8, weaker A/B side, N+1 applied
        provisioned_kw   DOUBLE,               -- allocated/rated load behind the node
        measured_peak_kw DOUBLE,
        p50_kw           DOUBLE,
        p95_kw           DOUBLE,
        p99_kw           DOUBLE,
        headroom_kw      DOUBLE,               -- usable - p99
        stranded_kw      DOUBLE,               -- provisioned - p99
        model_version    VARCHAR,
        PRIMARY KEY (node, horizon, generated_at)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS alerts (
        alert_id     VARCHAR PRIMARY KEY,    -- stable per (rule, target): sha1 of both
        rule         VARCHAR     NOT NULL,
        target       VARCHAR     NOT NULL,   -- rack / cdu / device / node id the alert is about
        severity     VARCHAR     NOT NULL,   -- info | warning | critical
        state        VARCHAR     NOT NULL,   -- pending | firing | resolved
        labels       VARCHAR     NOT NULL,   -- JSON object (site, module, rack, device, team, ...)
        annotations  VARCHAR     NOT NULL,   -- JSON object (summary, description, runbook, reasons)
        value        DOUBLE,
        started_at   TIMESTAMPTZ NOT NULL,   -- condition first true (pending since)
        fired_at     TIMESTAMPTZ,
        resolved_at  TIMESTAMPTZ,
        updated_at   TIMESTAMPTZ NOT NULL
    )
    """,
]


def ensure_shared_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create the analytics/alerting tables if missing (idempotent)."""
    for ddl in SHARED_TABLES_DDL:
        con.execute(ddl)


# --------------------------------------------------------------------------- storage-owned tables
#
# Times in storage-owned tables are TIMESTAMP holding UTC (no time zone arithmetic on the hot
# path; every connection also runs with TimeZone=UTC so TIMESTAMPTZ columns print as UTC).

SAMPLES_DDL = """
CREATE TABLE IF NOT EXISTS sample_rows (
    ts        TIMESTAMP NOT NULL,   -- UTC time the device was read (ms precision)
    device_id UINTEGER  NOT NULL,   -- device_ids.device_id
    metric_id UINTEGER  NOT NULL,   -- metric_ids.metric_id
    value     DOUBLE,               -- NULL when quality is bad
    quality   UTINYINT  NOT NULL    -- 0 good, 1 stale, 2 bad
)
"""

# One row per stored reading (message): its sequence number lives here, not on each of its
# points (25x fewer rows). Written in the sink's transaction with the points, ordered by
# (ts, device_id) within a batch; a reading's points are the `sample_rows` with the same
# (device_id, ts), `n_points` of them. ts is TIMESTAMP_MS (readings have ms precision): in
# time order the deltas between readings bit-pack to ~1 B in ms, ~2.5 B in us.
READINGS_DDL = """
CREATE TABLE IF NOT EXISTS reading_rows (
    ts        TIMESTAMP_MS NOT NULL,  -- UTC time the device was read, = sample_rows.ts of its points
    device_id UINTEGER     NOT NULL,  -- device_ids.device_id
    seq       UBIGINT      NOT NULL,  -- the device's sequence number (dedup key with device)
    n_points  UINTEGER     NOT NULL   -- points of the reading stored in sample_rows
)
"""

# `samples` is what everyone reads: one row per reading of one metric, with names.
SAMPLES_VIEW_DDL = """
CREATE OR REPLACE VIEW samples AS
SELECT r.ts, d.device, m.metric, r.value, r.quality
FROM sample_rows r
JOIN device_ids d ON d.device_id = r.device_id
JOIN metric_ids m ON m.metric_id = r.metric_id
"""

# `readings`: one row per stored reading, with the device name.
READINGS_VIEW_DDL = """
CREATE OR REPLACE VIEW readings AS
SELECT CAST(r.ts AS TIMESTAMP) AS ts, d.device, r.seq, r.n_points
FROM reading_rows r
JOIN device_ids d ON d.device_id = r.device_id
"""

STORAGE_TABLES_DDL = [
    SAMPLES_DDL,
    READINGS_DDL,
    # Integer ids of names (storage/ids.py): ids compress to almost nothing, strings do not.
    """
    CREATE TABLE IF NOT EXISTS device_ids (
        device_id UINTEGER PRIMARY KEY,
        device    VARCHAR NOT NULL UNIQUE
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS metric_ids (
        metric_id UINTEGER PRIMARY KEY,
        metric    VARCHAR NOT NULL UNIQUE
    )
    """,
    # Per-device dedup state: the highest sequence number stored and its time; the recent
    # window of sequence numbers is rebuilt from `readings` on start (see dedup.py).
    """
    CREATE TABLE IF NOT EXISTS dedup_state (
        device  VARCHAR PRIMARY KEY,
        max_seq UBIGINT   NOT NULL,
        max_ts  TIMESTAMP NOT NULL
    )
    """,
    # Newest value per series, upserted by the sink in its write transaction (for /api/latest
    # without scanning `samples`).
    """
    CREATE TABLE IF NOT EXISTS latest_values (
        device  VARCHAR   NOT NULL,
        metric  VARCHAR   NOT NULL,
        ts      TIMESTAMP NOT NULL,
        value   DOUBLE,
        quality UTINYINT  NOT NULL,
        PRIMARY KEY (device, metric)
    )
    """,
    # Facts about this file: 'site' (the site id seen in the envelopes, used by the export).
    """
    CREATE TABLE IF NOT EXISTS podwatch_meta (
        key   VARCHAR PRIMARY KEY,
        value VARCHAR NOT NULL
    )
    """,
    # Kafka position of the sink, written in the same transaction as the rows.
    """
    CREATE TABLE IF NOT EXISTS ingest_offsets (
        topic       VARCHAR NOT NULL,
        "partition" INTEGER NOT NULL,
        next_offset BIGINT  NOT NULL,   -- offset of the next message to read
        updated_at  TIMESTAMP NOT NULL,
        PRIMARY KEY (topic, "partition")
    )
    """,
    # How far each rollup has been computed: buckets with start < done_until are final
    # (late samples below it trigger a recompute of their buckets).
    """
    CREATE TABLE IF NOT EXISTS rollup_state (
        rollup     VARCHAR PRIMARY KEY,
        done_until TIMESTAMP NOT NULL
    )
    """,
    # Retention in force (written from StorageSettings on start, for people reading the file).
    """
    CREATE TABLE IF NOT EXISTS retention_settings (
        relation  VARCHAR PRIMARY KEY,
        keep_days DOUBLE              -- NULL: kept forever
    )
    """,
    # Topology, loaded from the site file (replaced as a whole on every load).
    """
    CREATE TABLE IF NOT EXISTS topo_racks (
        rack            VARCHAR PRIMARY KEY,
        module          VARCHAR,
        cdu             VARCHAR,
        rated_kw        DOUBLE,
        workload        VARCHAR,
        feed_a          VARCHAR,   -- power node id of the A feed
        feed_b          VARCHAR,
        design_flow_lpm DOUBLE,
        return_limit_c  DOUBLE
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS topo_devices (
        device   VARCHAR PRIMARY KEY,
        kind     VARCHAR,          -- pdu | meter | cdu | rack
        protocol VARCHAR,
        profile  VARCHAR,
        entity   VARCHAR,          -- rack / cdu / power-node id the device measures
        module   VARCHAR,
        side     VARCHAR,          -- a | b for PDUs and metered feeds
        rack     VARCHAR,          -- entity when it is a rack
        cdu      VARCHAR,          -- entity when it is a CDU
        node     VARCHAR,          -- entity when it is a power node
        poll_interval_s DOUBLE
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS topo_power (
        node        VARCHAR PRIMARY KEY,
        kind        VARCHAR,       -- transformer | feeder | busway | rack_feed
        parent      VARCHAR,
        side        VARCHAR,
        module      VARCHAR,
        nameplate_kw DOUBLE,
        usable_kw   DOUBLE         -- nameplate x derating x 80 %
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS topo_cdus (
        cdu          VARCHAR PRIMARY KEY,
        module       VARCHAR,
        capacity_kw  DOUBLE,
        pumps        INTEGER,
        supply_setpoint_c DOUBLE,
        racks        VARCHAR        -- comma-separated rack ids
    )
    """,
]

# Rollups: one row per (bucket, device, metric). Mergeable columns (sum, n) let coarser
# rollups be built from finer ones; value_last/last_ts give the last value in the bucket.
ROLLUPS: dict[str, str] = {"rollup_1m": "1 minute", "rollup_15m": "15 minutes", "rollup_1h": "1 hour"}
ROLLUP_SECONDS: dict[str, int] = {"rollup_1m": 60, "rollup_15m": 900, "rollup_1h": 3600}


def _rollup_ddl(name: str, table: str | None = None) -> str:
    # value_avg is computed on read (VIRTUAL): storing it cost as much as value_sum (~0.1 B per
    # raw point in rollup_1m: an average rarely has a short decimal form, ALP_RD ~6.5 B a row).
    return f"""
    CREATE TABLE IF NOT EXISTS {table or name} (
        ts          TIMESTAMP NOT NULL,   -- bucket start (UTC)
        device      VARCHAR   NOT NULL,
        metric      VARCHAR   NOT NULL,
        value_min   DOUBLE,
        value_max   DOUBLE,
        value_avg   DOUBLE GENERATED ALWAYS AS (value_sum / nullif(n_values, 0)) VIRTUAL,
        value_sum   DOUBLE,
        value_last  DOUBLE,
        last_ts     TIMESTAMP,
        n           UBIGINT   NOT NULL,   -- readings in the bucket (rows, NULL values included)
        n_values    UBIGINT   NOT NULL,   -- non-NULL values (denominator of value_avg)
        quality_max UTINYINT  NOT NULL    -- worst quality seen in the bucket
    )
    """

# Stored rollup columns in insert order (value_avg is generated).
ROLLUP_STORED_COLUMNS = ("ts", "device", "metric", "value_min", "value_max", "value_sum", "value_last", "last_ts",
                         "n", "n_values", "quality_max")


# Friendly wide views for people. Buckets of 10 s line up the A and B PDUs of a rack,
# which are polled separately and so carry slightly different timestamps.
VIEWS_DDL = [
    """
    CREATE OR REPLACE VIEW rack_power AS
    WITH per_device AS (
        SELECT time_bucket(INTERVAL '10 seconds', s.ts) AS ts, d.rack, d.module, d.side, s.device,
               avg(s.value) AS power_kw
        FROM samples s JOIN topo_devices d ON d.device = s.device
        WHERE s.metric = 'pdu.power_kw' AND d.rack IS NOT NULL
        GROUP BY ALL
    )
    SELECT p.ts, p.rack, p.module,
           sum(p.power_kw) FILTER (WHERE lower(p.side) = 'a') AS feed_a_kw,
           sum(p.power_kw) FILTER (WHERE lower(p.side) = 'b') AS feed_b_kw,
           sum(p.power_kw) AS total_kw,
           any_value(r.rated_kw) AS rated_kw,
           sum(p.power_kw) / nullif(any_value(r.rated_kw), 0) * 100 AS load_pct
    FROM per_device p LEFT JOIN topo_racks r ON r.rack = p.rack
    GROUP BY p.ts, p.rack, p.module
    """,
    """
    CREATE OR REPLACE VIEW cdu_loops AS
    SELECT time_bucket(INTERVAL '10 seconds', s.ts) AS ts,
           coalesce(d.cdu, s.device) AS cdu, s.device, any_value(d.module) AS module,
           avg(value) FILTER (WHERE metric = 'cdu.supply_temp_c')      AS supply_temp_c,
           avg(value) FILTER (WHERE metric = 'cdu.return_temp_c')      AS return_temp_c,
           avg(value) FILTER (WHERE metric = 'cdu.delta_t_c')          AS delta_t_c,
           avg(value) FILTER (WHERE metric = 'cdu.supply_setpoint_c')  AS supply_setpoint_c,
           avg(value) FILTER (WHERE metric = 'cdu.flow_lpm')           AS flow_lpm,
           avg(value) FILTER (WHERE metric = 'cdu.supply_pressure_kpa') AS supply_pressure_kpa,
           avg(value) FILTER (WHERE metric = 'cdu.return_pressure_kpa') AS return_pressure_kpa,
           avg(value) FILTER (WHERE metric = 'cdu.diff_pressure_kpa')  AS diff_pressure_kpa,
           avg(value) FILTER (WHERE metric = 'cdu.valve_pct')          AS valve_pct,
           avg(value) FILTER (WHERE metric = 'cdu.heat_removed_kw')    AS heat_removed_kw,
           avg(value) FILTER (WHERE metric = 'cdu.facility_supply_temp_c') AS facility_supply_temp_c,
           avg(value) FILTER (WHERE metric = 'cdu.reservoir_level_pct') AS reservoir_level_pct,
           max(value) FILTER (WHERE metric = 'cdu.leak_state')         AS leak_state
    FROM samples s LEFT JOIN topo_devices d ON d.device = s.device
    WHERE s.metric LIKE 'cdu.%'
    GROUP BY ALL
    """,
    """
    CREATE OR REPLACE VIEW substation AS
    SELECT time_bucket(INTERVAL '10 seconds', s.ts) AS ts,
           coalesce(d.node, s.device) AS node, s.device,
           avg(value) FILTER (WHERE metric = 'meter.power_kw')            AS power_kw,
           avg(value) FILTER (WHERE metric = 'meter.reactive_power_kvar') AS reactive_power_kvar,
           avg(value) FILTER (WHERE metric = 'meter.apparent_power_kva')  AS apparent_power_kva,
           avg(value) FILTER (WHERE metric = 'meter.power_factor')        AS power_factor,
           avg(value) FILTER (WHERE metric = 'meter.frequency_hz')        AS frequency_hz,
           avg(value) FILTER (WHERE metric = 'meter.l1.voltage_v')        AS l1_voltage_v,
           avg(value) FILTER (WHERE metric = 'meter.l2.voltage_v')        AS l2_voltage_v,
           avg(value) FILTER (WHERE metric = 'meter.l3.voltage_v')        AS l3_voltage_v,
           avg(value) FILTER (WHERE metric = 'meter.l1.current_a')        AS l1_current_a,
           avg(value) FILTER (WHERE metric = 'meter.l2.current_a')        AS l2_current_a,
           avg(value) FILTER (WHERE metric = 'meter.l3.current_a')        AS l3_current_a,
           max(value) FILTER (WHERE metric = 'meter.energy_kwh')          AS energy_kwh
    FROM samples s LEFT JOIN topo_devices d ON d.device = s.device
    WHERE s.metric LIKE 'meter.%'
    GROUP BY ALL
    """,
]


def configure_connection(con: duckdb.DuckDBPyConnection) -> None:
    """Session settings every podwatch connection uses."""
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET checkpoint_threshold = '256MB'")


class SchemaMigrationError(PodwatchError):
    """A file of an older layout could not be brought to the current one."""


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str | None]:
    """column -> generation expression (None for a stored column) of a table of this file."""
    return dict(con.execute(
        "SELECT column_name, column_default FROM duckdb_columns() WHERE database_name = current_database() "
        "AND schema_name = 'main' AND table_name = ?", [table]).fetchall())


def _migrate(con: duckdb.DuckDBPyConnection, what: str, statements: list[str]) -> None:
    """Run one migration step in one transaction; a failure leaves the file as it was."""
    con.execute("BEGIN TRANSACTION")
    try:
        for sql in statements:
            con.execute(sql)
        con.execute("COMMIT")
    except duckdb.Error as exc:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise SchemaMigrationError(
            f"cannot migrate this DuckDB file from the old layout ({what}): {exc}. The file is unchanged; "
            "free disk space (the migration needs room for a copy of what it moves) and start again, or "
            "export the file with the podwatch version that wrote it and start a new one") from None


def pending_migrations(con: duckdb.DuckDBPyConnection) -> list[str]:
    """What `migrate_old_layout` would change in this file (empty: current layout)."""
    pending = []
    if "seq" in _columns(con, "sample_rows"):
        pending.append("sample_rows.seq -> reading_rows")
    for name in ROLLUPS:
        columns = _columns(con, name)
        if "value_avg" in columns and columns["value_avg"] is None:
            pending.append(f"{name}.value_avg -> generated")
    return pending


def migrate_old_layout(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Bring a file written by an older podwatch to the current layout, one step per change,
    each in its own transaction. Returns what was migrated (empty: nothing to do). Raises
    SchemaMigrationError, naming the step and what to do, if a step fails.

    - `seq` on every row of `sample_rows` -> one `reading_rows` row per (ts, device_id, seq);
    - a stored `value_avg` in the rollups -> the generated column (table rebuilt, rows kept).
    """
    done: list[str] = []
    if not pending_migrations(con):
        return done
    if "seq" in _columns(con, "sample_rows"):
        con.execute(READINGS_DDL)
        _migrate(con, "sequence number on every sample row -> per-reading table reading_rows", [
            """INSERT INTO reading_rows
               SELECT ts, device_id, seq, count(*) FROM sample_rows GROUP BY ts, device_id, seq
               ORDER BY ts, device_id, seq""",
            "ALTER TABLE sample_rows DROP COLUMN seq",
            SAMPLES_VIEW_DDL,
        ])
        done.append("sample_rows.seq -> reading_rows")
    for name in ROLLUPS:
        columns = _columns(con, name)
        if "value_avg" in columns and columns["value_avg"] is None:
            stored = ", ".join(ROLLUP_STORED_COLUMNS)
            _migrate(con, f"{name}.value_avg stored -> computed", [
                f"DROP TABLE IF EXISTS {name}__new",
                _rollup_ddl(name, f"{name}__new"),
                f"INSERT INTO {name}__new ({stored}) SELECT {stored} FROM {name} ORDER BY ts, device, metric",
                f"DROP TABLE {name}",
                f"ALTER TABLE {name}__new RENAME TO {name}",
            ])
            done.append(f"{name}.value_avg -> generated")
    if done:
        con.execute("CHECKPOINT")  # give the dropped columns' blocks back now
    return done


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create every podwatch table and view if missing (idempotent; safe on every start);
    migrate a file of an older layout first (`migrate_old_layout`)."""
    configure_connection(con)
    migrated = migrate_old_layout(con)
    if migrated:
        log.warning("migrated the DuckDB file to the current layout: %s", "; ".join(migrated))
    for ddl in STORAGE_TABLES_DDL:
        con.execute(ddl)
    for name in ROLLUPS:
        con.execute(_rollup_ddl(name))
    ensure_shared_tables(con)
    con.execute(SAMPLES_VIEW_DDL)
    con.execute(READINGS_VIEW_DDL)
    for ddl in VIEWS_DDL:
        con.execute(ddl)
