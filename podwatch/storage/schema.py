"""The DuckDB schema: every table and view podwatch keeps, created idempotently.

Ownership: the storage stage owns `samples`, rollups, topology, `ingest_offsets` and views.
The analytics stage writes `risk_scores` and `forecasts`; the alerting stage writes `alerts`
and `alert_outbox`. Their columns are a contract read by the HTTP API and the dashboards:
change them only together with `docs/storage.md` and the API.
"""

from __future__ import annotations

import duckdb

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
