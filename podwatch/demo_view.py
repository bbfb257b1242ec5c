"""The demo's live terminal view (rich), built only from what the HTTP API answered."""

from __future__ import annotations

import time

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

LEVEL_STYLE = {"ok": "green", "watch": "yellow", "warning": "dark_orange", "critical": "bold red"}


def _device_health(demo) -> tuple[int, int, int]:
    """(healthy, stale, silent) devices: newest reading within 3 poll intervals, older, none."""
    latest = demo.state.last.get("latest") or []
    newest: dict[str, float] = {}
    for row in latest:
        t = row.get("time")
        if isinstance(t, str):
            from datetime import datetime

            try:
                t = datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
        elif isinstance(t, (int, float)):
            t = t / 1000.0 if t > 1e11 else t
        else:
            continue
        newest[row["device"]] = max(newest.get(row["device"], 0.0), t)
    now_sim = (demo.state.clock_origin_ms / 1000.0 + demo.sim_seconds()) if demo.state.clock_origin_ms else time.time()
    healthy = stale = 0
    for dev in demo.site.devices:
        t = newest.get(dev.id)
        if t is None:
            continue
        if now_sim - t <= 3 * dev.poll_interval_s + 2:
            healthy += 1
        else:
            stale += 1
    silent = len(demo.site.devices) - healthy - stale
    return healthy, stale, silent


def render_dashboard(demo):
    snap = demo.state.last
    pipe = (snap.get("pipeline") or [{}])[0]
    healthy, stale, silent = _device_health(demo)
    header = Text.assemble(
        ("podwatch demo", "bold"), f"  site {demo.site.id}  ",
        (f"t = {demo.sim_seconds():6.0f} s simulated (x{demo.opts.speed:g})", "cyan"), "   API ", (demo.api_url, "underline"))
    stats = Table.grid(padding=(0, 3))
    stats.add_row(
        f"stored [bold]{pipe.get('points_total', 0):,}[/] points",
        f"ingest [bold]{(pipe.get('points_per_s') or 0):,.0f}[/] points/s",
        f"Kafka lag [bold]{pipe.get('lag_messages', 0)}[/]",
        f"dead letters [bold]{pipe.get('dead_letters', 0)}[/]",
        f"devices [green]{healthy} healthy[/] [yellow]{stale} stale[/] [red]{silent} silent[/]",
    )

    risk = sorted(snap.get("risk") or [], key=lambda r: -(r.get("probability") or 0))[:8]
    risk_table = Table(title="Racks by thermal risk", expand=True)
    risk_table.add_column("rack")
    risk_table.add_column("risk", justify="right")
    risk_table.add_column("level")
    risk_table.add_column("reasons", ratio=3)
    for r in risk:
        reasons = r.get("reasons") or []
        if isinstance(reasons, str):
            reasons = [reasons]
        level = r.get("level", "")
        risk_table.add_row(r.get("rack", ""), f"{(r.get('probability') or 0):.2f}",
                           Text(level, style=LEVEL_STYLE.get(level, "")), "; ".join(reasons[:2]))

    head = Table(title="Headroom (24 h): usable capacity minus the forecast P99 peak (measured peak while history is short)",
                 expand=True)
    for col in ("node", "usable kW", "peak kW", "headroom kW", "stranded kW"):
        head.add_column(col, justify="right" if "kW" in col else "left")
    rows = [h for h in snap.get("headroom") or [] if h.get("horizon") == "24h" and h.get("node_kind") in ("busway", "transformer", "cdu")]
    for h in sorted(rows, key=lambda h: h.get("node", ""))[:8]:
        peak = h.get("p99_kw")
        peak_text = f"{peak:,.0f} P99" if peak is not None else f"{(h.get('measured_peak_kw') or 0):,.0f} measured"
        head.add_row(h.get("node", ""), f"{(h.get('usable_kw') or 0):,.0f}", peak_text,
                     *(f"{(h.get(k) or 0):,.0f}" for k in ("headroom_kw", "stranded_kw")))

    order = {"firing": 0, "pending": 1}
    rank = {"critical": 0, "warning": 1, "info": 2}
    alerts = sorted((a for a in snap.get("alerts") or [] if a.get("state") in order),
                    key=lambda a: (order[a["state"]], rank.get(a.get("severity"), 3), a.get("target", "")))
    alert_table = Table(title="Active alerts", expand=True)
    for col in ("state", "severity", "rule", "target", "summary"):
        alert_table.add_column(col)
    for a in alerts[:8]:
        summary = (a.get("annotations") or {}).get("summary", "") if isinstance(a.get("annotations"), dict) else ""
        alert_table.add_row(Text(a.get("state", ""), style="bold red" if a.get("state") == "firing" else "yellow"),
                            a.get("severity", ""), a.get("rule", ""), a.get("target", ""), summary)

    events = Text("\n".join(demo.state.events[-8:]))
    return Group(Panel(Group(header, stats)), risk_table, head, alert_table, Panel(events, title="Events"),
                 Text("Ctrl-C stops everything cleanly.", style="dim"))
