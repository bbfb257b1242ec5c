"""`podwatch alerts ...`: list and show alerts, validate rules, outbox state, test the receivers.

The DuckDB file is locked by the process that owns it (`podwatch serve`); `list` and `show`
then read through that process's HTTP API (`GET /api/alerts`), found from `<db>.serve.json`
or given with `--api` (default http://127.0.0.1:8080 when neither --db nor --api is given).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Optional

import typer

from podwatch.errors import PodwatchError

DEFAULT_API = "http://127.0.0.1:8080"
STATES = ("pending", "firing", "resolved")


def _from_api(api: str, state: str | None) -> list[dict[str, Any]]:
    import httpx

    params = {"state": state} if state else {}
    url = f"{api.rstrip('/')}/api/alerts"
    try:
        resp = httpx.get(url, params=params, timeout=10)
    except httpx.HTTPError as exc:
        raise PodwatchError(f"cannot reach the podwatch API at {url}: {exc}") from None
    if resp.status_code != 200:
        raise PodwatchError(f"GET {url}: HTTP {resp.status_code} {resp.text[:200]}")
    rows = resp.json()
    for row in rows:
        row.pop("time", None)
    return rows


def _load(db: str | None, api: str | None, state: str | None) -> tuple[list[dict[str, Any]], str]:
    """Alerts from the file (read-only) or, when it is locked or --api is given, the API."""
    if api is None and db is not None:
        import duckdb

        from podwatch.analytics.alerting.store import list_alerts
        from podwatch.storage.db import is_lock_error, read_owner

        if not Path(db).exists():
            raise PodwatchError(f"{db}: no such DuckDB file")
        try:
            con = duckdb.connect(db, read_only=True)
        except duckdb.Error as exc:
            if not is_lock_error(exc):
                raise PodwatchError(f"cannot open {db}: {exc}") from None
            owner = read_owner(db)
            api = (owner or {}).get("api_url") or DEFAULT_API
            typer.echo(f"({db} is held by another process; reading through its API at {api})", err=True)
        else:
            try:
                tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
                rows = list_alerts(con, state) if "alerts" in tables else []
            finally:
                con.close()
            return rows, db
    api = api or DEFAULT_API
    return _from_api(api, state), api


def _fmt_time(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return str(value).replace("T", " ")[:19]


def _json_default(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _list(
    db: Optional[str] = typer.Option(None, "--db", help="DuckDB file (through its service's API when locked)"),
    api: Optional[str] = typer.Option(None, "--api", help=f"Base URL of a running podwatch API (default {DEFAULT_API})"),
    state: Optional[str] = typer.Option(None, "--state", help="pending | firing | resolved"),
    fmt: str = typer.Option("table", "--format", help="table | json"),
) -> None:
    """List alerts, newest change first."""
    if state is not None and state not in STATES:
        raise PodwatchError(f"--state must be one of {', '.join(STATES)}, got {state!r}")
    if fmt not in ("table", "json"):
        raise PodwatchError(f"--format must be table or json, got {fmt!r}")
    rows, _ = _load(db, api, state)
    if fmt == "json":
        typer.echo(json.dumps(rows, default=_json_default, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rows)} alert(s)" + (f" ({state})" if state else ""))
    for col in ("id", "state", "severity", "rule", "target", "started", "value", "cause", "summary"):
        table.add_column(col)
    for r in rows:
        value = r.get("value")
        table.add_row(r["alert_id"][:12], r["state"], r["severity"], r["rule"], r["target"], _fmt_time(r.get("started_at")),
                      "-" if value is None else f"{value:g}", cause_column(r), (r.get("annotations") or {}).get("summary", ""))
    Console(width=220).print(table)


def cause_column(row: dict[str, Any]) -> str:
    """The `cause` column of `alerts list`: a rack alert's probable cause (`<cdu>:<rule>`, as the
    engine keeps it current), or for a CDU alert how many racks it explains."""
    annotations, labels = row.get("annotations") or {}, row.get("labels") or {}
    ref = annotations.get("probable_cause_ref") or labels.get("probable_cause")
    if ref:
        return ref
    affected = annotations.get("affected_racks")
    if affected:
        return f"explains {affected.split(' ', 1)[0]} rack(s)"
    return "-"


def _show(
    alert_id: str = typer.Argument(..., help="Alert id (or a unique prefix of it)"),
    db: Optional[str] = typer.Option(None, "--db", help="DuckDB file (through its service's API when locked)"),
    api: Optional[str] = typer.Option(None, "--api", help=f"Base URL of a running podwatch API (default {DEFAULT_API})"),
) -> None:
    """Show one alert: state, times, labels, annotations (and its deliveries when read from the file)."""
    rows, source = _load(db, api, None)
    matches = [r for r in rows if r["alert_id"].startswith(alert_id)]
    if not matches:
        raise PodwatchError(f"no alert with id {alert_id!r} in {source}")
    if len(matches) > 1:
        raise PodwatchError(f"{alert_id!r} matches {len(matches)} alerts; give more of the id")
    alert = matches[0]
    if db is not None and source == db:
        import duckdb

        from podwatch.analytics.alerting.store import outbox_of

        con = duckdb.connect(db, read_only=True)
        try:
            tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            alert["deliveries"] = outbox_of(con, alert["alert_id"]) if "alert_outbox" in tables else []
        finally:
            con.close()
    typer.echo(json.dumps(alert, default=_json_default, indent=2, ensure_ascii=False))


def _rules(
    rules: Optional[Path] = typer.Option(None, "--rules", help="Site rules file merged over the shipped defaults"),
    fmt: str = typer.Option("table", "--format", help="table | json"),
) -> None:
    """Validate and print the effective alert rules (defaults + site file)."""
    from podwatch.analytics.alerting.rules import load_rules

    rs = load_rules(rules)  # its warnings (a rule on no known check) go to the log, i.e. stderr
    if fmt == "json":
        typer.echo(json.dumps(rs.model_dump(by_alias=True), indent=2, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(rs.rules)} rule(s)")
    for col in ("id", "on", "source", "condition", "for", "clear_for", "severity"):
        table.add_column(col)
    for r in rs.rules:
        cond = f"{' | '.join(r.metric or [])} {r.op or ''} {'' if r.threshold is None else f'{r.threshold:g}'}".strip()
        if r.clear_threshold is not None:
            cond += f" (clear {r.clear_threshold:g})"
        if r.stale_after_s is not None:
            cond += f" stale>{r.stale_after_s:g}s"
        if r.threshold_from:
            cond += f" (per rack: {r.threshold_from} from the site)"
        table.add_row(r.id, "yes" if r.enabled else "no", r.source, cond or "active", f"{r.hold_s:g}s", f"{r.clear_for_s:g}s",
                      r.severity)
    Console(width=200).print(table)


def _outbox(
    db: str = typer.Option(..., "--db", help="DuckDB file (read-only; not while `podwatch serve` holds it)"),
    receiver: Optional[str] = typer.Option(None, "--receiver", help="Only this receiver"),
    show_dead: bool = typer.Option(False, "--dead", help="List the events that were rejected for good"),
) -> None:
    """Delivery state of the alert outbox per receiver: pending, delivered, dead, oldest pending."""
    import duckdb

    from podwatch.storage.db import is_lock_error

    if not Path(db).exists():
        raise PodwatchError(f"{db}: no such DuckDB file")
    try:
        con = duckdb.connect(db, read_only=True)
    except duckdb.Error as exc:
        if is_lock_error(exc):
            raise PodwatchError(f"{db} is held by another process; ask it through its API instead: podwatch sql --db {db} "
                                "\"SELECT receiver, status, count(*) FROM alert_outbox GROUP BY ALL\"") from None
        raise PodwatchError(f"cannot open {db}: {exc}") from None
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "alert_outbox" not in tables:
            typer.echo("no alert outbox in this file (alerting never ran on it)")
            return
        where, params = ("WHERE receiver = ?", [receiver]) if receiver else ("", [])
        rows = con.execute(
            "SELECT receiver, count(*) FILTER (status = 'pending'), count(*) FILTER (status = 'delivered'), "
            "count(*) FILTER (status = 'dead'), min(timezone('UTC', created_at)) FILTER (status = 'pending'), "
            f"max(attempts) FILTER (status = 'pending'), any_value(last_error) FILTER (status = 'pending') "
            f"FROM alert_outbox {where} GROUP BY receiver ORDER BY receiver", params).fetchall()
        for name, pending, delivered, dead, oldest, attempts, error in rows:
            line = f"{name}: {pending} pending, {delivered} delivered, {dead} dead"
            if pending:
                line += f"; oldest pending since {_fmt_time(oldest)} UTC, {attempts} attempt(s), last error: {error}"
            typer.echo(line)
        if show_dead:
            for name, seq, alert, state, error in con.execute(
                    f"SELECT receiver, seq, alert_id, state, last_error FROM alert_outbox WHERE status = 'dead' "
                    f"{'AND receiver = ?' if receiver else ''} ORDER BY receiver, seq", params).fetchall():
                typer.echo(f"dead {name}#{seq} {alert[:12]} {state}: {error}")
    finally:
        con.close()


def receiver_test_event(now: datetime | None = None) -> dict:
    from podwatch.analytics.alerting.model import EVENT_VERSION, alert_id

    now = now or datetime.now(UTC)
    aid = alert_id("podwatch_receiver_test", "test")
    return {"v": EVENT_VERSION, "alert_id": aid, "rule": "podwatch_receiver_test", "target": "test", "state": "firing",
            "previous_state": "pending", "severity": "info",
            "labels": {"alertname": "podwatch_receiver_test", "severity": "info", "target": "test"},
            "annotations": {"summary": "podwatch test alert: this receiver works",
                            "description": "Sent by `podwatch alerts test-receivers`; no action needed.",
                            "reasons": "receiver test"},
            "value": None, "reasons": ["receiver test"], "flapping": False, "startsAt": now.isoformat(), "endsAt": None,
            "firedAt": now.isoformat(), "ts": now.isoformat()}


async def _test_all(settings, only: str | None) -> list[tuple[str, str, bool, str, float]]:
    from podwatch.analytics.alerting.outbox import DeliveryError
    from podwatch.analytics.alerting.receivers import AlertmanagerReceiver, build_receivers

    results = []
    for receiver, rs in zip(build_receivers(settings), settings.receivers, strict=True):
        if only and receiver.name != only:
            continue
        started = time.perf_counter()
        event = receiver_test_event()
        try:
            await receiver.send_test(event)
            if isinstance(receiver, AlertmanagerReceiver):  # resolve it again so it does not linger
                later = datetime.now(UTC) + timedelta(milliseconds=1)
                await receiver.send_test({**event, "state": "resolved", "endsAt": later.isoformat()})
            results.append((receiver.name, rs.type, True, "delivered", time.perf_counter() - started))
        except DeliveryError as exc:
            kind = "retriable" if exc.retriable else "permanent"
            results.append((receiver.name, rs.type, False, f"{exc} ({kind})", time.perf_counter() - started))
        finally:
            await receiver.aclose()
    return results


def _test_receivers(
    config: Path = typer.Option(..., "--config", help="Alerting settings file (YAML) with `receivers:`"),
    receiver: Optional[str] = typer.Option(None, "--receiver", help="Test only this receiver"),
) -> None:
    """Send a test alert to each receiver; print OK / FAIL per receiver (exit 1 if any failed)."""
    from podwatch.analytics.alerting.settings import load_settings

    settings = load_settings(config)
    if not settings.receivers:
        raise PodwatchError(f"{config}: no receivers configured")
    if receiver and receiver not in {r.name for r in settings.receivers}:
        raise PodwatchError(f"{config}: no receiver named {receiver!r}")
    results = asyncio.run(_test_all(settings, receiver))
    for name, kind, ok, detail, elapsed_s in results:
        typer.echo(f"{'OK  ' if ok else 'FAIL'} {name} ({kind}) {elapsed_s * 1000:.0f} ms: {detail}")
    if not all(ok for _name, _kind, ok, _detail, _elapsed in results):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    alerts = typer.Typer(help="Alerts: list, show, rules, outbox, test the receivers.", no_args_is_help=True)
    alerts.command("list")(_list)
    alerts.command("show")(_show)
    alerts.command("rules")(_rules)
    alerts.command("outbox")(_outbox)
    alerts.command("test-receivers")(_test_receivers)
    app.add_typer(alerts, name="alerts")
