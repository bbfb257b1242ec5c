"""`podwatch config ...`: validate a site file, print its JSON Schema, list the metric catalog."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import typer

from podwatch.errors import ConfigError


def register(app: typer.Typer) -> None:
    config = typer.Typer(help="Site files: validate, schema, metric catalog.", no_args_is_help=True)
    app.add_typer(config, name="config")

    @config.command("validate")
    def validate(site_file: Path = typer.Argument(..., help="Site YAML file"),
                 scenario: list[Path] = typer.Option(None, "--scenario", help="Also check this fault scenario against "
                                                                             "the site (repeatable)"),
                 quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing when valid")) -> None:
        """Validate a site file (and scenarios against it); print every error with its field path (exit 2), or a summary."""
        from podwatch.site import load_site

        def fail(exc: ConfigError) -> None:
            typer.echo(f"{exc.source}: invalid, {len(exc.errors)} error(s):", err=True)
            for err in exc.errors:
                typer.echo(f"  {err}", err=True)
            raise typer.Exit(2) from None

        try:
            site = load_site(site_file)
        except ConfigError as exc:
            fail(exc)
        scenarios = []
        for path in scenario or []:
            from podwatch.simulators.scenario import Scenario

            try:
                scenarios.append(Scenario.load(path, site))
            except ConfigError as exc:
                fail(exc)
        if quiet:
            return
        kinds = Counter(d.kind for d in site.devices)
        protocols = Counter(d.protocol for d in site.devices)
        it_kw = sum(r.rated_kw for r in site.racks)
        typer.echo(f"{site_file}: valid site '{site.id}' ({site.spec.site.timezone})")
        typer.echo(f"  modules {len(site.modules)}, CDUs {len(site.cdus)}, racks {len(site.racks)} ({it_kw:,.0f} kW rated IT)")
        typer.echo(f"  power nodes {len(site.power_nodes)}; devices {len(site.devices)}"
                   + (": " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
                      + " | " + ", ".join(f"{k} {n}" for k, n in sorted(protocols.items())) if site.devices else
                      " (nothing to collect: attach meters, PDUs, CDU devices or rack sensors)"))
        for path, sc in zip(scenario or [], scenarios):
            typer.echo(f"{path}: valid scenario '{sc.name}' ({len(sc.faults)} fault(s))")

    @config.command("schema")
    def schema(out: Path = typer.Option(None, "--out", "-o", help="Write to this file instead of stdout")) -> None:
        """Print the JSON Schema of site files."""
        from podwatch.site import site_json_schema

        text = json.dumps(site_json_schema(), indent=2)
        if out:
            out.write_text(text + "\n")
        else:
            typer.echo(text)

    @config.command("metrics")
    def metrics(markdown: bool = typer.Option(False, "--markdown", help="Markdown table")) -> None:
        """List the canonical metric names with units."""
        from podwatch.metrics import CATALOG

        if markdown:
            typer.echo("| metric | unit | device kind | description |\n| --- | --- | --- | --- |")
        for m in CATALOG.values():
            typer.echo(f"| `{m.name}` | {m.unit} | {m.kind} | {m.description} |" if markdown
                       else f"{m.name:34} {m.unit:6} {m.kind:6} {m.description}")

    @config.command("profiles")
    def profiles() -> None:
        """List the built-in device profiles."""
        from podwatch.collectors.profiles import available_profiles

        for pid, p in sorted(available_profiles().items()):
            typer.echo(f"{pid:20} {p.kind:6} {p.protocol:7} {p.vendor} {p.model} ({len(p.points)} points)")
