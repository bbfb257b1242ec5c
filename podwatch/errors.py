"""Errors a user can cause and understand. The CLI prints them as one line, no traceback."""

from __future__ import annotations


class PodwatchError(Exception):
    """An error with a message meant for a person; `exit_code` is what the CLI returns."""

    exit_code = 1


class ConfigError(PodwatchError):
    """A configuration file or flag is wrong. `errors` holds every problem, each with its path."""

    exit_code = 2

    def __init__(self, source: str, errors: list[str]):
        self.source = source
        self.errors = list(errors)
        lines = "\n".join(f"  {e}" for e in self.errors)
        super().__init__(f"{source}: {len(self.errors)} error(s)\n{lines}")


def user_errors(fn):
    """Decorator for CLI commands: a PodwatchError (or a ValueError/FileNotFoundError raised on a
    user's input) becomes one line on stderr and the error's exit code, never a traceback."""
    import functools

    import typer

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PodwatchError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except (ValueError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper
