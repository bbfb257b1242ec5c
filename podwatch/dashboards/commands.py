"""`podwatch dashboards ...`: export provisioning files, push to a Grafana, check every panel
query against a live podwatch API."""

from __future__ import annotations

from pathlib import Path

import typer

from podwatch.errors import ConfigError


def register(app: typer.Typer) -> None:
    dashboards = typer.Typer(help="Grafana dashboards: export provisioning files, push, check queries.",
                             no_args_is_help=True)
    app.add_typer(dashboards, name="dashboards")

    api_url_option = typer.Option("http://127.0.0.1:8080", "--api-url",
                                  help="podwatch API base URL as Grafana's server reaches it")
    prometheus_option = typer.Option(None, "--prometheus-url",
                                     help="Optional Prometheus that scrapes the API's /metrics")

    @dashboards.command("export")
    def export_cmd(
        directory: Path = typer.Argument(..., help="Output directory (provisioning/ and dashboards/ inside)"),
        api_url: str = api_url_option,
        prometheus_url: str = prometheus_option,
        dashboards_path: str = typer.Option("/var/lib/grafana/dashboards/podwatch", "--dashboards-path",
                                            help="Where DIR/dashboards is mounted in the Grafana container"),
        datasource_name: str = typer.Option("podwatch", "--datasource-name",
                                            help="Name of the Infinity datasource (must contain 'podwatch')"),
        datasource_uid: str = typer.Option("podwatch-api", "--datasource-uid",
                                           help="Uid of the Infinity datasource (one per site API)"),
    ) -> None:
        """Write Grafana provisioning files (datasource YAML, dashboard provider YAML, dashboard JSON)."""
        from podwatch.dashboards.provisioning import export

        _check_name(datasource_name)
        for path in export(directory, api_url, prometheus_url, dashboards_path, datasource_name, datasource_uid):
            typer.echo(str(path))

    @dashboards.command("push")
    def push_cmd(
        grafana_url: str = typer.Option(..., "--grafana-url", help="Grafana root URL, e.g. http://grafana:3000"),
        token: str = typer.Option(..., "--token", envvar="GRAFANA_TOKEN",
                                  help="Service-account token (Editor or Admin); or $GRAFANA_TOKEN"),
        folder: str = typer.Option("podwatch", "--folder", help="Folder uid (created with this title if missing)"),
        api_url: str = api_url_option,
        prometheus_url: str = prometheus_option,
        datasource_name: str = typer.Option("podwatch", "--datasource-name",
                                            help="Name of the Infinity datasource (must contain 'podwatch')"),
        datasource_uid: str = typer.Option("podwatch-api", "--datasource-uid",
                                           help="Uid of the Infinity datasource (one per site API)"),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="Replace dashboards even if they were changed in Grafana"),
        timeout_s: float = typer.Option(10.0, "--timeout-s", min=0.1),
        retries: int = typer.Option(3, "--retries", min=0, max=10),
    ) -> None:
        """Create the folder and datasources if missing and upsert the dashboards through Grafana's HTTP API."""
        from pydantic import ValidationError

        from podwatch.dashboards.build import dashboard_docs
        from podwatch.dashboards.grafana_client import GrafanaSettings, push
        from podwatch.dashboards.provisioning import datasource_specs

        _check_name(datasource_name)
        try:
            settings = GrafanaSettings(url=grafana_url, token=token, timeout_s=timeout_s, retries=retries)
        except ValidationError as exc:
            raise ConfigError("grafana settings", [f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                   for e in exc.errors()]) from None
        report = push(settings, list(dashboard_docs().values()),
                      datasource_specs(api_url, prometheus_url, datasource_name, datasource_uid), folder, folder,
                      overwrite)
        for kind, uid, action in report.actions:
            typer.echo(f"{kind:<10} {uid:<28} {action}")
        typer.echo(f"{report.requests} request(s), {report.retries} retried")

    @dashboards.command("list")
    def list_cmd() -> None:
        """Print every dashboard, panel and query as Markdown (the panel reference of docs/dashboards.md)."""
        from podwatch.dashboards.build import markdown_inventory

        typer.echo(markdown_inventory(), nl=False)

    @dashboards.command("check")
    def check_cmd(
        api: str = typer.Option(..., "--api", help="podwatch API base URL, e.g. http://127.0.0.1:8080"),
        range_h: float = typer.Option(6.0, "--range-h", min=0.01, help="Time range of the panels, hours back from now"),
        prometheus: bool = typer.Option(True, "--prometheus/--no-prometheus",
                                        help="Also check that Prometheus panels' metrics are on /metrics"),
    ) -> None:
        """Run every panel's query as Grafana's Infinity datasource would; print panel, rows, ok."""
        import httpx

        from podwatch.dashboards.check import check_prometheus_names, run_checks
        from podwatch.errors import PodwatchError

        try:
            httpx.get(api.rstrip("/") + "/healthz", timeout=10)
        except httpx.HTTPError as exc:
            raise PodwatchError(f"cannot reach the podwatch API at {api}: {type(exc).__name__}: {exc}") from None
        try:
            results = run_checks(api, range_s=range_h * 3600)
            if prometheus:
                results += check_prometheus_names(api)
        except httpx.HTTPError as exc:
            raise PodwatchError(f"cannot reach the podwatch API at {api}: {exc}") from None
        failed = [r for r in results if not r.ok]
        for r in results:
            mark = "ok" if r.ok else "FAIL"
            line = f"{mark:<4} {r.dashboard_uid:<24} {r.panel_title[:58]:<58} {r.ref_id:<8} {r.rows:>6}"
            typer.echo(line + (f"  {r.problem}" if r.problem else ""))
        typer.echo(f"{len(results) - len(failed)}/{len(results)} queries ok")
        if failed:
            raise typer.Exit(1)


def _check_name(name: str) -> None:
    # The dashboards' `site` variable lists Infinity datasources whose name matches /podwatch/.
    if "podwatch" not in name:
        raise ConfigError("--datasource-name", [f"{name!r} must contain 'podwatch' (the dashboards' site "
                                                "variable lists datasources matching /podwatch/)"])
