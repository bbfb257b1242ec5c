"""CLI commands of the storage stage: ingest, serve, export, sql."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import signal
import sys
from typing import Optional

import typer

from podwatch.errors import PodwatchError
from podwatch.stream.config import kafka_option_callback
from podwatch.stream.topics import TELEMETRY_TOPIC


def _ingest(
    kafka: str = typer.Option(..., "--kafka", help="Kafka bootstrap servers HOST:PORT", callback=kafka_option_callback),
    db: str = typer.Option(..., "--db", help="DuckDB file (created if missing)"),
    site: Optional[str] = typer.Option(None, "--site", help="Site file: loads the topology tables"),
    group: str = typer.Option("podwatch-sink", "--group", help="Consumer group; 'none' assigns every partition directly"),
    topic: str = typer.Option(TELEMETRY_TOPIC, "--topic", help="Telemetry topic (one per site on a shared cluster)"),
) -> None:
    """Consume podwatch.telemetry.v1 into DuckDB, exactly once (offsets live in the file)."""
    from podwatch.storage.sink import SinkSettings, run_ingest

    settings = SinkSettings(kafka=kafka, group_id=None if group == "none" else group, topic=topic)
    asyncio.run(run_ingest(db, settings, site))


def _serve(
    db: str = typer.Option(..., "--db", help="DuckDB file (created if missing)"),
    kafka: Optional[str] = typer.Option(None, "--kafka", help="Kafka bootstrap servers; without it: API only", callback=kafka_option_callback),
    site: Optional[str] = typer.Option(None, "--site", help="Site file: topology tables, streaming checks, risk, headroom"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port", help="0 picks a free port"),
    token: Optional[str] = typer.Option(None, "--token", envvar="PODWATCH_API_TOKEN",
                                        help="Bearer token of /api/sql (default: random, in <db>.serve.json)"),
    model_dir: Optional[str] = typer.Option(None, "--model-dir",
                                            help="Thermal-risk model (from `podwatch train thermal`); default: physics-only risk"),
    alertmanager: Optional[str] = typer.Option(None, "--alertmanager", help="Alertmanager URL (API v2) to send alerts to"),
    alert_rules: Optional[str] = typer.Option(None, "--alert-rules", help="Site alert rules (override the defaults by id)"),
    alerting_config: Optional[str] = typer.Option(None, "--alerting-config",
                                                  help="Alerting settings file (receivers: webhook, e-mail, Alertmanager)"),
    headroom_every_s: float = typer.Option(600.0, "--headroom-every", help="Seconds between headroom forecast refreshes"),
    topic: str = typer.Option(TELEMETRY_TOPIC, "--topic", help="Telemetry topic (one per site on a shared cluster)"),
    speed: float = typer.Option(1.0, "--speed", min=0.001,
                                help="Accelerated runs against `podwatch simulate --speed`: periodic analytics run this much more often"),
) -> None:
    """Ingest + analytics + alerts + HTTP API in the one process that owns the DuckDB file."""
    from podwatch.serve import ServeOptions, run_serve

    opts = ServeOptions(db=db, kafka=kafka, site=site, host=host, port=port, token=token, model_dir=model_dir,
                        alertmanager=alertmanager, alert_rules=alert_rules, alerting_config=alerting_config,
                        headroom_every_s=headroom_every_s, speed=speed, topic=topic)
    asyncio.run(run_serve(opts, announce=lambda msg: typer.echo(msg, err=True)))


def _export(
    db: str = typer.Option(..., "--db", help="DuckDB file"),
    to: str = typer.Option(..., "--to", help="Output directory"),
    site: Optional[str] = typer.Option(None, "--site-id", help="Site id of the partitions (default: from the file)"),
) -> None:
    """Write hive-partitioned Parquet (site=/date=) readable by DuckDB, polars and pandas."""
    from podwatch.storage.export import export_parquet

    database = _open_read_only(db)
    try:
        written = export_parquet(database.connection, to, site)
    finally:
        database.close()
    typer.echo(json.dumps(written))


def _open_read_only(db: str):
    from podwatch.storage.db import Database, DatabaseLocked, read_owner

    if not os.path.exists(db):
        raise PodwatchError(f"{db}: no such DuckDB file")
    try:
        return Database(db, read_only=True)
    except DatabaseLocked as exc:
        owner = read_owner(db)
        where = f" (podwatch serve, pid {owner['pid']}, API {owner['api_url']})" if owner else ""
        detail = str(exc).split("Conflicting lock is held in ", 1)[-1] if "Conflicting lock" in str(exc) else ""
        holder = f" (lock held by {detail.split('. See also')[0].strip()})" if detail else ""
        raise PodwatchError(f"{db} is held by another process{where or holder}; export reads the file itself: "
                            f"stop that process first (its data stays queryable meanwhile through the API: "
                            f"podwatch sql --api URL)") from None


def _sql(
    query: str = typer.Argument(..., help="One SELECT / WITH statement"),
    db: Optional[str] = typer.Option(None, "--db", help="DuckDB file (read-only; through its service's API if one owns it)"),
    api: Optional[str] = typer.Option(None, "--api", help="Base URL of a running podwatch API"),
    token: Optional[str] = typer.Option(None, "--token", envvar="PODWATCH_API_TOKEN", help="Bearer token for --api"),
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
    max_rows: int = typer.Option(10_000, "--max-rows"),
    timeout_s: float = typer.Option(60.0, "--timeout", help="Seconds before the query is cancelled"),
) -> None:
    """Run a read-only query: directly on the file, or through the service that owns it."""
    from podwatch.storage.db import Database, DatabaseLocked, read_owner
    from podwatch.storage.sqlguard import SqlRejected, SqlTimeout, run_guarded_foreground

    if fmt not in ("table", "csv", "json"):
        raise PodwatchError(f"--format must be table, csv or json, got {fmt!r}")
    if api is None and db is None:
        raise PodwatchError("give --db FILE or --api URL")
    columns: list[str]
    rows: list[tuple]
    if api is None:
        if not os.path.exists(db):
            raise PodwatchError(f"{db}: no such DuckDB file")
        try:
            database = Database(db, read_only=True)
        except DatabaseLocked:
            owner = read_owner(db)
            if not owner or not owner.get("api_url"):
                raise PodwatchError(f"{db} is locked by another process that serves no podwatch API; "
                                    "stop it or pass --api URL") from None
            api, token = owner["api_url"], token or owner.get("token")
        else:
            try:
                result = run_guarded_foreground(database.cursor(), query, timeout_s, max_rows)
            except (SqlRejected, SqlTimeout) as exc:
                raise PodwatchError(str(exc)) from None
            finally:
                database.close()
            columns, rows = result.columns, result.rows
            if result.truncated:
                typer.echo(f"(showing the first {max_rows} rows)", err=True)
    if api is not None:
        columns, rows = _sql_via_api(api, token, query)
    _print_rows(columns, rows, fmt)


def _sql_via_api(api: str, token: str | None, query: str) -> tuple[list[str], list[tuple]]:
    import httpx

    try:
        response = httpx.post(api.rstrip("/") + "/api/sql", json={"sql": query},
                              headers={"Authorization": f"Bearer {token or ''}"}, timeout=120)
    except httpx.HTTPError as exc:
        raise PodwatchError(f"cannot reach the podwatch API at {api}: {exc}") from None
    if response.status_code != 200:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        raise PodwatchError(f"API answered {response.status_code}: {message}")
    records = response.json()
    columns = [c for c in response.headers.get("x-podwatch-columns", "").split(",") if c] or (list(records[0]) if records else [])
    if response.headers.get("x-podwatch-truncated") == "true":
        typer.echo("(row cap reached; the result is truncated)", err=True)
    return columns, [tuple(r.get(c) for c in columns) for r in records]


def _print_rows(columns: list[str], rows: list[tuple], fmt: str) -> None:
    if fmt == "json":
        import orjson

        sys.stdout.write(orjson.dumps([dict(zip(columns, r)) for r in rows], default=str,
                                      option=orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z).decode() + "\n")
    elif fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(columns)
        writer.writerows(rows)
        sys.stdout.write(out.getvalue())
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(*columns)
        for row in rows:
            table.add_row(*("NULL" if v is None else str(v) for v in row))
        Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("ingest")(_ingest)
    app.command("serve")(_serve)
    app.command("export")(_export)
    app.command("sql")(_sql)
