"""`podwatch report --out DIR`: one static HTML page with PNG plots people actually look at.

This module owns the page: site power against its usable capacity with the forecast band,
headroom per module (power per side and CDU), a headroom/stranded table per node, and — when the
data holds `risk_scores` / `alerts` rows — a risk timeline per rack with alerts marked. Plots are
matplotlib with the Agg backend (no display needed); the page has no scripts and no external assets.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import polars as pl

from podwatch.analytics.headroom import ForecastRow, HeadroomReport
from podwatch.analytics.load import LoadData, duckdb_frame
from podwatch.site import Site


@dataclass
class ReportInputs:
    site: Site
    load: LoadData
    headroom: HeadroomReport
    risk_scores: pl.DataFrame | None = None  # ts, rack, probability, level, ...
    alerts: pl.DataFrame | None = None  # target, severity, started_at, fired_at, ...
    notes: list[str] = field(default_factory=list)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _top_nodes(site: Site) -> list[str]:
    return [n.id for n in site.power_nodes.values() if n.kind == "transformer"]


def site_feed_groups(site: Site, tops: list[str]) -> list[list[str]]:
    """Transformers grouped by the racks they carry. Transformers carrying the same racks are the A
    and B sides of one 2N feed (edge-5mw: one transformer per side): the site is worth the weaker
    of them and each carries the same failover load, so a group counts once. Groups with other
    racks (campus-20mw: two transformers, five modules each) add up."""
    from podwatch.analytics.capacity import racks_behind

    groups: dict[frozenset, list[str]] = {}
    for node in tops:
        groups.setdefault(frozenset(racks_behind(site, node)), []).append(node)
    return list(groups.values())


def feed_usable_kw(site: Site, transformer: str, usable_kw: float) -> float:
    """What a transformer can deliver through the feeders it has: with A/B feeders every rack
    fails over onto one side, so no more than the weaker side's feeders (mqtt-only: a 1,900 kW
    transformer behind two 1,200 kW UPS delivers 1,200 kW). Busways are the modules' (their
    headroom is in the module plot), so the feed stops at the feeders."""
    per_side: dict[str, float] = {}
    for node in site.power_nodes.values():
        if node.parent == transformer and node.kind == "feeder":
            side = (node.side or "").lower()
            per_side[side] = per_side.get(side, 0.0) + node.usable_kw
    if not per_side:
        return usable_kw
    unsided = per_side.pop("", 0.0)
    return min(usable_kw, unsided + (min(per_side.values()) if per_side else 0.0))


def site_capacity_kw(site: Site, rows: dict, tops: list[str], horizon: str = "24h") -> tuple[float, float]:
    """(usable, provisioned) of the site's feed: per group of A/B transformers the weaker side's
    usable (each as far as its feeders allow), summed over groups."""
    usable = provisioned = 0.0
    for group in site_feed_groups(site, tops):
        parts = [(n, rows[(n, horizon)]) for n in group if (n, horizon) in rows]
        if parts:
            usable += min(feed_usable_kw(site, n, p.usable_kw) for n, p in parts)
            provisioned += max((p.provisioned_kw or 0) for _, p in parts)
    return usable, provisioned


def plot_site_power(inputs: ReportInputs, path: Path, days: float = 14.0) -> Path:
    """Hourly peak of the site (transformers) vs usable and provisioned, plus the forecast bands."""
    plt = _plt()
    site, load = inputs.site, inputs.load
    tops = [n for n in _top_nodes(site) if n in load.loads.columns]
    hourly = load.hourly_peaks()
    since = hourly["ts"].max() - timedelta(days=days)
    hourly = hourly.filter(pl.col("ts") >= since)
    fig, ax = plt.subplots(figsize=(11, 5.0))
    groups = site_feed_groups(site, tops)
    if tops:
        total = hourly.select(pl.col("ts"), pl.sum_horizontal([pl.max_horizontal([pl.col(n) for n in g])
                                                               for g in groups]).alias("kw"))
        ax.plot(total["ts"].to_list(), total["kw"].to_numpy(), color="black", linewidth=1, label="hourly peak (measured)")
    rows = {(r.node, r.horizon): r for r in inputs.headroom.rows}
    usable, provisioned = site_capacity_kw(site, rows, tops)
    ax.axhline(usable, color="tab:red", linestyle="--", label=f"usable {usable:,.0f} kW (80 %, derated)")
    ax.axhline(provisioned, color="tab:gray", linestyle=":", label=f"provisioned (rated racks) {provisioned:,.0f} kW")
    end = load.loads["ts"].max()
    colors = {"24h": "tab:blue", "7d": "tab:orange"}
    for horizon, hours in (("24h", 24), ("7d", 168)):
        parts = [[rows.get((n, horizon)) for n in g] for g in groups]
        if not parts or any(p is None or p.p99_kw is None for g in parts for p in g):
            continue
        p50 = sum(max(p.p50_kw for p in g) for g in parts)
        p95 = sum(max(p.p95_kw for p in g) for g in parts)
        p99 = sum(max(p.p99_kw for p in g) for g in parts)
        x = [end, end + timedelta(hours=hours)]
        ax.fill_between(x, [p50, p50], [p99, p99], color=colors[horizon], alpha=0.25,
                        label=f"{horizon} peak forecast P50–P99 ({p50:,.0f}–{p99:,.0f} kW)")
        ax.plot(x, [p95, p95], color=colors[horizon], linewidth=1.5)
    ax.set_ylabel("kW")
    ax.set_title(f"{site.spec.site.name or site.id}: site power (transformer load) vs capacity, with the peak forecast")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def module_headroom(site: Site, rows: dict[str, ForecastRow]) -> list[tuple[str, list[ForecastRow]]]:
    """Per module: the rows of its busways (both sides) and CDUs."""
    out = []
    for module in site.modules:
        ids = [b.id for b in module.busways] + [c.id for c in module.cdus]
        if not module.busways:  # racks fed from feeders directly
            ids = sorted({r.feed_a for r in site.racks if r.module == module.id}
                         | {r.feed_b for r in site.racks if r.module == module.id}) + [c.id for c in module.cdus]
        out.append((module.id, [rows[i] for i in ids if i in rows]))
    return out


def plot_module_headroom(inputs: ReportInputs, path: Path, horizon: str = "7d") -> Path:
    plt = _plt()
    rows = inputs.headroom.for_horizon(horizon) or inputs.headroom.for_horizon("24h")
    groups = module_headroom(inputs.site, rows)
    labels, p99, head, usable = [], [], [], []
    for module, rs in groups:
        for r in rs:
            labels.append(f"{module} · {r.node}")
            p99.append(r.p99_kw or 0.0)
            head.append(r.headroom_kw if r.headroom_kw is not None else 0.0)
            usable.append(r.usable_kw)
    fig, ax = plt.subplots(figsize=(11, 0.45 * max(4, len(labels)) + 1))
    y = list(range(len(labels)))
    ax.barh(y, p99, color="tab:orange", label="P99 peak forecast")
    ax.barh(y, [max(h, 0) for h in head], left=p99, color="tab:green", alpha=0.6, label="headroom (usable − P99)")
    over = [(i, -h) for i, h in enumerate(head) if h < 0]
    if over:
        ax.barh([i for i, _ in over], [v for _, v in over], left=[usable[i] for i, _ in over], color="tab:red",
                label="over usable")
    for i, (h, u) in enumerate(zip(head, usable)):
        ax.text(max(u, p99[i]) * 1.01, i, f"{h:,.0f} kW ({h / u * 100:.0f} %)" if u else "-", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("kW (CDUs: heat to liquid)")
    ax.set_title(f"Headroom per module ({horizon} P99; power nodes carry the full A+B failover load)")
    ax.set_xlim(0, max(max(usable, default=1.0), max(p99, default=0.0)) * 1.2)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def risk_time_window(risks: pl.DataFrame) -> tuple[datetime, datetime]:
    """x range of the risk timeline: the scores' own span, at least 10 minutes wide (one timestamp made
    matplotlib spread the axis over four years, with the scores invisible in it)."""
    lo, hi = risks["ts"].min(), risks["ts"].max()
    if hi - lo < timedelta(minutes=10):
        pad = (timedelta(minutes=10) - (hi - lo)) / 2
        lo, hi = lo - pad, hi + pad
    return lo, hi


def plot_risk_timeline(inputs: ReportInputs, path: Path) -> Path | None:
    """Risk probability per rack over time, alerts marked; None when there are no risk scores."""
    risks = inputs.risk_scores
    if risks is None or risks.is_empty():
        return None
    plt = _plt()
    racks = sorted(risks["rack"].unique().to_list())
    fig, axes = plt.subplots(len(racks), 1, figsize=(11, 0.6 * len(racks) + 1.2), sharex=True, squeeze=False)
    alerts = inputs.alerts if inputs.alerts is not None else pl.DataFrame()
    lo, hi = risk_time_window(risks)
    for ax, rack in zip(axes[:, 0], racks):
        one = risks.filter(pl.col("rack") == rack).sort("ts")
        ax.fill_between(one["ts"].to_list(), 0, one["probability"].to_numpy(), color="tab:red", alpha=0.5, step="post")
        # a lone score (`podwatch analyze` stores the latest one per rack) has no area to fill: mark it
        ax.plot(one["ts"].to_list(), one["probability"].to_numpy(), color="tab:red", marker="o", markersize=3,
                linestyle="none")
        ax.set_xlim(lo, hi)
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.set_ylabel(rack, rotation=0, ha="right", fontsize=7)
        if not alerts.is_empty() and "target" in alerts.columns:
            mine = alerts.filter(pl.col("target") == rack)
            for row in mine.iter_rows(named=True):
                when = row.get("fired_at") or row.get("started_at")
                if when is not None:
                    ax.axvline(when, color="black", linewidth=1)
                    ax.text(when, 0.85, f" {row.get('rule', 'alert')}", fontsize=6, va="top")
    axes[0, 0].set_title("Thermal risk per rack (probability of a breach within the horizon); black lines: alerts")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _table(rows: list[ForecastRow]) -> str:
    def f(v):
        return "" if v is None else f"{v:,.1f}"

    head = ("node", "kind", "usable kW", "provisioned kW", "measured peak kW", "P50 kW", "P95 kW", "P99 kW",
            "headroom kW", "stranded kW")
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in rows:
        cls = ' class="neg"' if r.headroom_kw is not None and r.headroom_kw < 0 else ""
        out.append(f"<tr{cls}><td>{html.escape(r.node)}</td><td>{r.node_kind}</td><td>{f(r.usable_kw)}</td>"
                   f"<td>{f(r.provisioned_kw)}</td><td>{f(r.measured_peak_kw)}</td><td>{f(r.p50_kw)}</td>"
                   f"<td>{f(r.p95_kw)}</td><td>{f(r.p99_kw)}</td><td>{f(r.headroom_kw)}</td><td>{f(r.stranded_kw)}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def write_report(inputs: ReportInputs, out_dir: str | Path, extra_figures: list[tuple[str, Path]] | None = None) -> Path:
    """Write index.html and its PNGs into `out_dir`; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = [
        ("Site power vs capacity, with the peak forecast band", plot_site_power(inputs, out / "site_power.png")),
        ("Headroom per module", plot_module_headroom(inputs, out / "module_headroom.png")),
    ]
    risk = plot_risk_timeline(inputs, out / "risk_timeline.png")
    notes = list(inputs.notes)
    if risk is not None:
        figures.append(("Thermal risk timeline per rack", risk))
    else:
        notes.append("No risk_scores rows in this data: the risk timeline is omitted.")
    figures += extra_figures or []
    for horizon, note in inputs.headroom.notes.items():
        notes.append(f"{horizon} forecast: {note}")
    site = inputs.site
    ts = inputs.load.loads["ts"]
    generated = datetime.now(timezone.utc)
    rows_7d = [r for r in inputs.headroom.rows if r.horizon == "7d" and r.node_kind != "rack_feed"]
    rows_24h = [r for r in inputs.headroom.rows if r.horizon == "24h" and r.node_kind != "rack_feed"]
    feeds = sorted((r for r in inputs.headroom.rows if r.horizon == "24h" and r.node_kind == "rack_feed"
                    and r.headroom_kw is not None), key=lambda r: r.headroom_kw)[:10]
    body = [f"<h1>{html.escape(site.spec.site.name or site.id)} — capacity and risk</h1>",
            f"<p>Generated {generated:%Y-%m-%d %H:%M} UTC from data {ts.min():%Y-%m-%d %H:%M} .. {ts.max():%Y-%m-%d %H:%M} "
            f"UTC ({inputs.load.bucket_s} s buckets). Headroom = usable − P99 forecast peak; stranded = provisioned "
            "(rated racks behind the node) − P99. Power nodes carry the full A+B load of their racks (failover view).</p>"]
    for title, path in figures:
        body.append(f"<h2>{html.escape(title)}</h2><img src='{path.name}' alt='{html.escape(title)}'>")
    body.append("<h2>Headroom and stranded power — next 7 days</h2>" + _table(rows_7d))
    body.append("<h2>Headroom and stranded power — next 24 hours</h2>" + _table(rows_24h))
    if feeds:
        body.append("<h2>Rack feeds with the least headroom (24 h)</h2>" + _table(feeds))
    if notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>podwatch report</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,th:first-child{text-align:left}"
            "tr.neg{background:#fdd}img{max-width:100%}</style></head><body>" + "\n".join(body) + "</body></html>")
    index = out / "index.html"
    index.write_text(page)
    return index


def read_risk_and_alerts(db: str | Path | None = None, history: str | Path | None = None
                         ) -> tuple[pl.DataFrame | None, pl.DataFrame | None]:
    """risk_scores and alerts rows from a DuckDB file (read-only) or Parquet files named
    risk_scores*.parquet / alerts*.parquet in the history folder; None where absent."""
    if db is not None:
        import duckdb

        con = duckdb.connect(str(db), read_only=True)
        try:
            con.execute("SET TimeZone = 'UTC'")
            tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
            risks = duckdb_frame(con, "SELECT ts, rack, probability, level FROM risk_scores ORDER BY ts") \
                if "risk_scores" in tables else None
            alerts = duckdb_frame(con, "SELECT rule, target, severity, state, started_at, fired_at FROM alerts") \
                if "alerts" in tables else None
        finally:
            con.close()
        return risks, alerts
    if history is not None:
        folder = Path(history)
        if not folder.is_dir():
            return None, None

        def read(prefix: str) -> pl.DataFrame | None:
            files = sorted(folder.rglob(f"{prefix}*.parquet"))
            return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed") if files else None

        return read("risk_scores"), read("alerts")
    return None, None
