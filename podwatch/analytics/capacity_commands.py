"""Capacity commands: `podwatch forecast`, `podwatch headroom`, `podwatch plan`,
`podwatch eval forecast`, `podwatch report`.

Each reads a site file plus one data source: `--db FILE` (a podwatch DuckDB file, opened
read-only; a running `podwatch serve` holds it locked, in which case the command says so and
points at the API/export) or `--history DIR` (Parquet in the long sample format, from the
simulator or `podwatch export`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from podwatch.errors import PodwatchError, user_errors

SITE_OPT = typer.Option(..., "--site", help="Site YAML file")
DB_OPT = typer.Option(None, "--db", help="podwatch DuckDB file (read-only)")
HISTORY_OPT = typer.Option(None, "--history", help="Folder of Parquet samples (ts, device, metric, value, quality)")
BUCKET_OPT = typer.Option(60, "--bucket-s", min=1, help="Load buckets in seconds (peaks are taken over these)")




def _load(site_file: Path, db: Path | None, history: Path | None, bucket_s: int, write_db: Path | None = None):
    from podwatch.analytics.load import load_from_source
    from podwatch.site import load_site
    from podwatch.storage.topology import check_file_site

    site = load_site(site_file)
    for path in (db, write_db):
        if path is not None:
            check_file_site(path, site.id)
    return site, load_from_source(site, db=db, history=history, bucket_s=bucket_s)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:,.1f}"


def _eval_group(app: typer.Typer) -> typer.Typer:
    """The shared `podwatch eval` group (the thermal commands add `eval thermal` to the same group)."""
    for info in app.registered_groups:
        if info.name == "eval" and info.typer_instance is not None:
            return info.typer_instance
    group = typer.Typer(help="Evaluate models against simulated ground truth.", no_args_is_help=True)
    app.add_typer(group, name="eval")
    return group


def register(app: typer.Typer) -> None:
    @app.command("forecast")
    @user_errors
    def forecast_cmd(site_file: Path = SITE_OPT, db: Path = DB_OPT, history: Path = HISTORY_OPT,
                     bucket_s: int = BUCKET_OPT,
                     out: Path = typer.Option(None, "--out", help="Also write the rows (.parquet, .csv or .json)"),
                     rack_feeds: bool = typer.Option(False, "--rack-feeds", help="Also print rack feeds")) -> None:
        """Quantile forecasts (P50/P95/P99) of each node's peak over the next 24 h and 7 days."""
        from podwatch.analytics.headroom import compute_headroom, write_rows_file

        site, load = _load(site_file, db, history, bucket_s)
        report = compute_headroom(site, load)
        typer.echo(f"peak forecasts from data up to {report.data_until:%Y-%m-%d %H:%M} UTC")
        typer.echo(f"{'node':<16} {'kind':<11} {'horizon':<7} {'P50 kW':>10} {'P95 kW':>10} {'P99 kW':>10}  method")
        for r in report.rows:
            if r.node_kind == "rack_feed" and not rack_feeds:
                continue
            typer.echo(f"{r.node:<16} {r.node_kind:<11} {r.horizon:<7} {_fmt(r.p50_kw):>10} {_fmt(r.p95_kw):>10} "
                       f"{_fmt(r.p99_kw):>10}  {r.model_version or '-'}")
        for horizon, note in report.notes.items():
            typer.echo(f"note: {horizon}: {note}")
        if out:
            typer.echo(f"wrote {write_rows_file(report.rows, out)}")

    @app.command("headroom")
    @user_errors
    def headroom_cmd(site_file: Path = SITE_OPT, db: Path = DB_OPT, history: Path = HISTORY_OPT,
                     bucket_s: int = BUCKET_OPT,
                     horizon: str = typer.Option("7d", "--horizon", help="24h or 7d (rows for both are written)"),
                     write_db: Path = typer.Option(None, "--write-db", help="Store the rows in this DuckDB file's "
                                                   "`forecasts` table (must not be held by a running server)"),
                     out: Path = typer.Option(None, "--out", help="Also write the rows (.parquet, .csv or .json)"),
                     rack_feeds: bool = typer.Option(False, "--rack-feeds", help="Also print rack feeds"),
                     as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON")) -> None:
        """Usable capacity, forecast P99 peak, headroom and stranded power per node and CDU."""
        from podwatch.analytics.headroom import compute_headroom, write_forecasts_db, write_rows_file

        if horizon not in ("24h", "7d"):
            raise ValueError(f"--horizon must be 24h or 7d, got '{horizon}'")
        site, load = _load(site_file, db, history, bucket_s, write_db)
        report = compute_headroom(site, load)
        rows = [r for r in report.rows if r.horizon == horizon and (rack_feeds or r.node_kind != "rack_feed")]
        if as_json:
            typer.echo(json.dumps([r.as_dict() for r in rows], default=str, indent=1))
        else:
            typer.echo(f"headroom for the next {horizon}, data up to {report.data_until:%Y-%m-%d %H:%M} UTC "
                       "(power nodes: full A+B failover load; CDUs: heat to liquid)")
            typer.echo(f"{'node':<16} {'kind':<11} {'usable':>9} {'provis.':>9} {'measured':>9} {'P99':>9} "
                       f"{'headroom':>9} {'stranded':>9}")
            for r in rows:
                typer.echo(f"{r.node:<16} {r.node_kind:<11} {_fmt(r.usable_kw):>9} {_fmt(r.provisioned_kw):>9} "
                           f"{_fmt(r.measured_peak_kw):>9} {_fmt(r.p99_kw):>9} {_fmt(r.headroom_kw):>9} "
                           f"{_fmt(r.stranded_kw):>9}")
            for h, note in report.notes.items():
                typer.echo(f"note: {h}: {note}")
        if write_db:
            n = write_forecasts_db(write_db, report.rows)
            typer.echo(f"stored {n} forecasts rows in {write_db}", err=as_json)
        if out:
            typer.echo(f"wrote {write_rows_file(report.rows, out)}", err=as_json)

    @app.command("plan")
    @user_errors
    def plan_cmd(site_file: Path = SITE_OPT, rack_kw: float = typer.Option(..., "--rack-kw", help="Power of each new rack, kW"),
                 count: int = typer.Option(1, "--count", min=1, help="How many new racks"),
                 module: str = typer.Option(None, "--module", help="Only place them in this module"),
                 db: Path = DB_OPT, history: Path = HISTORY_OPT, bucket_s: int = BUCKET_OPT,
                 fresh: bool = typer.Option(False, "--fresh", help="With --db: recompute forecasts instead of using "
                                            "the stored `forecasts` rows"),
                 flow_lpm_per_kw: float = typer.Option(1.2, "--flow-lpm-per-kw", help="Design coolant flow of the new racks"),
                 whips_per_side: int = typer.Option(None, "--whips-per-side", min=1,
                                                    help="Power whips per side of each new rack (default: as the "
                                                         "site's existing racks, most common first)"),
                 whip_amps: float = typer.Option(None, "--whip-amps", min=0.001,
                                                 help="Rating of each whip, A (default: as the existing racks)"),
                 details: bool = typer.Option(False, "--details", help="Print every resource checked"),
                 as_json: bool = typer.Option(False, "--json", help="Print the result as JSON")) -> None:
        """Whether and where N more racks fit, against forecast P99 headroom with redundancy."""
        import dataclasses

        from podwatch.analytics.headroom import compute_headroom, read_forecasts
        from podwatch.analytics.load import DataSourceError, load_from_source
        from podwatch.analytics.planner import plan
        from podwatch.site import load_site

        site = load_site(site_file)
        if db is not None:
            from podwatch.storage.topology import check_file_site

            check_file_site(db, site.id)
        rows = []
        if db is not None and not fresh:
            try:
                rows = read_forecasts(db)
            except DataSourceError:
                rows = []
        if not rows:
            if (db is None) == (history is None):
                raise PodwatchError("give exactly one data source: --db FILE (DuckDB) or --history DIR (Parquet)")
            rows = compute_headroom(site, load_from_source(site, db=db, history=history, bucket_s=bucket_s)).rows
        whips = _new_rack_whips(site, module, whips_per_side, whip_amps)
        result = plan(site, rows, rack_kw, count, module=module, flow_lpm_per_kw=flow_lpm_per_kw, whips=whips)
        if as_json:
            typer.echo(json.dumps(dataclasses.asdict(result), default=str, indent=1))
            return
        for line in result.summary_lines():
            typer.echo(line)
        if details:
            typer.echo(f"{'resource':<22} {'kind':<11} {'before kW':>10} {'after kW':>10}  basis")
            for c in result.checks:
                typer.echo(f"{c.id:<22} {c.kind:<11} {c.margin_before_kw:>10,.1f} {c.margin_after_kw:>10,.1f}  {c.basis}")

    eval_app = _eval_group(app)

    @eval_app.command("forecast")
    @user_errors
    def eval_forecast_cmd(site_file: Path = SITE_OPT, db: Path = DB_OPT, history: Path = HISTORY_OPT,
                          bucket_s: int = typer.Option(300, "--bucket-s", min=1, help="Load buckets in seconds"),
                          synthetic_days: float = typer.Option(None, "--synthetic-days",
                                                               help="No data source: backtest on this many days of "
                                                                    "built-in synthetic load"),
                          out: Path = typer.Option(None, "--out", help="Write figures (PNG) and scores (JSON) here"),
                          step_h: int = typer.Option(6, "--step-h", min=1, help="Hours between forecast origins"),
                          seed: int = typer.Option(0, "--seed")) -> None:
        """Rolling-origin backtest: pinball loss and coverage vs seasonal naive."""
        from podwatch.analytics.backtest import backtest_figures, rolling_origin_backtest, synthetic_history
        from podwatch.analytics.load import node_loads
        from podwatch.site import load_site

        if synthetic_days is not None:
            if not math.isfinite(synthetic_days) or synthetic_days <= 0:
                raise ValueError(f"--synthetic-days must be a number of days > 0 (got {synthetic_days:g})")
            if db is not None or history is not None:
                raise ValueError("--synthetic-days replaces --db/--history; give one or the other")
            site = load_site(site_file)
            load = node_loads(site, synthetic_history(site, synthetic_days, bucket_s, seed=seed), bucket_s)
        else:
            site, load = _load(site_file, db, history, bucket_s)
        result = rolling_origin_backtest(load.hourly_peaks(), site.spec.site.timezone, step_h=step_h,
                                         node_info=load.node_info())
        for line in result.summary_lines():
            typer.echo(line)
        if out:
            paths = backtest_figures(result, out)
            scores = {h: {"origins": s.origins, "pairs": s.pairs,
                          "pinball_model": {str(q): v for q, v in s.pinball_model.items()},
                          "pinball_naive": {str(q): v for q, v in s.pinball_naive.items()},
                          "coverage_model": {str(q): v for q, v in s.coverage_model.items()},
                          "coverage_naive": {str(q): v for q, v in s.coverage_naive.items()},
                          "p95_improvement": s.improvement(0.95)} for h, s in result.scores.items()}
            (Path(out) / "scores.json").write_text(json.dumps(scores, indent=1))
            typer.echo(f"wrote {', '.join(str(p) for p in paths)} and {Path(out) / 'scores.json'}")

    @app.command("report")
    @user_errors
    def report_cmd(site_file: Path = SITE_OPT, out: Path = typer.Option(..., "--out", help="Output folder"),
                   db: Path = DB_OPT, history: Path = HISTORY_OPT, bucket_s: int = BUCKET_OPT) -> None:
        """HTML report: site power vs capacity with forecast band, headroom per module, risk per rack."""
        from podwatch.analytics.headroom import compute_headroom
        from podwatch.analytics.report import ReportInputs, read_risk_and_alerts, write_report

        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: exists and is not a folder (the report writes index.html and PNGs into a folder)")
        site, load = _load(site_file, db, history, bucket_s)
        headroom = compute_headroom(site, load)
        risks, alerts = read_risk_and_alerts(db=db, history=history)
        index = write_report(ReportInputs(site=site, load=load, headroom=headroom, risk_scores=risks, alerts=alerts), out)
        typer.echo(f"wrote {index}")


def _new_rack_whips(site, module: str | None, per_side: int | None, rating_a: float | None):
    """The new racks' power entry: the given whips, else those of the site's existing racks (of
    `module` when given; the most common spec) - a new rack is usually another of the same kind."""
    from collections import Counter

    from podwatch.site import RackWhips

    racks = [r for r in site.racks if module is None or r.module == module] or list(site.racks)
    specs = Counter((r.spec.whips.per_side, r.spec.whips.rating_a, r.spec.whips.voltage_v) for r in racks)
    usual = RackWhips()
    if specs:
        (n, amps, volts), _ = specs.most_common(1)[0]
        usual = RackWhips(per_side=n, rating_a=amps, voltage_v=volts)
    return usual.model_copy(update={k: v for k, v in (("per_side", per_side), ("rating_a", rating_a)) if v is not None})
