"""Alert state in DuckDB: the `alerts` table (columns pinned in `podwatch.storage.schema`, one
row per (rule, target) holding its latest lifecycle) and helpers to read it back as events.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import duckdb

from podwatch.analytics.alerting.model import EVENT_VERSION, as_utc, iso
from podwatch.analytics.alerting.outbox import ensure_outbox_table
from podwatch.storage.schema import ensure_shared_tables

ALERT_COLUMNS = ("alert_id", "rule", "target", "severity", "state", "labels", "annotations", "value",
                 "started_at", "fired_at", "resolved_at", "updated_at")


_TS_COLUMNS = ("started_at", "fired_at", "resolved_at", "updated_at", "created_at", "delivered_at")


def _select(columns: tuple[str, ...]) -> str:
    # TIMESTAMPTZ values come back as naive UTC (fetching tz-aware values would need pytz).
    return ", ".join(f"timezone('UTC', {c}) AS {c}" if c in _TS_COLUMNS else c for c in columns)


def ensure_alerting_tables(con: duckdb.DuckDBPyConnection) -> None:
    """`alerts` (shared, pinned) and `alert_outbox` (alerting's own), idempotently."""
    con.execute("SET TimeZone = 'UTC'")
    ensure_shared_tables(con)
    ensure_outbox_table(con)


def upsert_alert_rows(con: duckdb.DuckDBPyConnection, rows: list[tuple]) -> None:
    if rows:
        con.executemany(f"INSERT OR REPLACE INTO alerts ({', '.join(ALERT_COLUMNS)}) VALUES "
                        f"({', '.join('?' for _ in ALERT_COLUMNS)})", rows)


def _row_dict(row: tuple) -> dict[str, Any]:
    d = dict(zip(ALERT_COLUMNS, row, strict=True))
    d["labels"] = json.loads(d["labels"])
    d["annotations"] = json.loads(d["annotations"])
    for key in ("started_at", "fired_at", "resolved_at", "updated_at"):
        if isinstance(d[key], datetime):
            d[key] = as_utc(d[key])
    return d


def list_alerts(con: duckdb.DuckDBPyConnection, state: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    """Alerts newest first; `state` filters (pending | firing | resolved)."""
    sql = f"SELECT {_select(ALERT_COLUMNS)} FROM alerts"
    params: list[Any] = []
    if state:
        sql += " WHERE state = ?"
        params.append(state)
    sql += " ORDER BY updated_at DESC LIMIT ?"
    params.append(limit)
    return [_row_dict(r) for r in con.execute(sql, params).fetchall()]


def get_alert(con: duckdb.DuckDBPyConnection, alert_id_or_prefix: str) -> dict[str, Any] | None:
    rows = con.execute(f"SELECT {_select(ALERT_COLUMNS)} FROM alerts WHERE alert_id LIKE ? ORDER BY updated_at DESC LIMIT 2",
                       [alert_id_or_prefix + "%"]).fetchall()
    return _row_dict(rows[0]) if len(rows) == 1 else None


def outbox_of(con: duckdb.DuckDBPyConnection, alert_id: str) -> list[dict[str, Any]]:
    cols = ("receiver", "seq", "state", "status", "attempts", "created_at", "delivered_at", "last_error")
    rows = con.execute(f"SELECT {_select(cols)} FROM alert_outbox WHERE alert_id = ? ORDER BY created_at, receiver, seq",
                       [alert_id]).fetchall()
    return [dict(zip(cols, r, strict=True)) for r in rows]


def row_to_event(row: dict[str, Any]) -> dict[str, Any]:
    """The alert event of a stored row (its current state), as `model` documents."""
    ann = row["annotations"]
    reasons = ann.get("reasons", "")
    return {
        "v": EVENT_VERSION, "alert_id": row["alert_id"], "rule": row["rule"], "target": row["target"],
        "state": row["state"], "previous_state": None, "severity": row["severity"], "labels": row["labels"],
        "annotations": ann, "value": row["value"], "reasons": [r for r in reasons.split("; ") if r],
        "flapping": False, "startsAt": iso(row["started_at"]), "endsAt": iso(row["resolved_at"]),
        "firedAt": iso(row["fired_at"]), "ts": iso(row["updated_at"]),
    }


def firing_events(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    return [row_to_event(r) for r in list_alerts(con, state="firing", limit=100_000)]
