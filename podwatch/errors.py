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
