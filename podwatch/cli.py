"""The `podwatch` command line.

Each stage owns its commands in `podwatch/<stage>/commands.py`, which exposes
`register(app: typer.Typer) -> None`; this module only assembles them, so stages stay
independent and a new command never touches another stage's file.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer

app = typer.Typer(
    name="podwatch",
    help="Power and thermal telemetry for modular AI sites.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Order is the order of `podwatch --help`: foundation first, then the pipeline stages.
COMMAND_MODULES = (
    "podwatch.config_commands",
    "podwatch.simulators.commands",
    "podwatch.collectors.commands",
    "podwatch.stream.commands",
    "podwatch.storage.commands",
    "podwatch.analytics.commands",
    "podwatch.analytics.capacity_commands",
    "podwatch.analytics.alerting.commands",
    "podwatch.dashboards.commands",
    "podwatch.demo",
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Power and thermal telemetry for modular AI sites."""
    from podwatch.logs import configure_logging

    configure_logging(logging.DEBUG if verbose else logging.INFO)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):  # stage not built yet
                continue
            raise
        module.register(app)


_register_all()


def main() -> None:
    """Entry point: run the CLI; user errors exit non-zero without a traceback."""
    from podwatch.errors import PodwatchError

    try:
        app()
    except PodwatchError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
