"""The root handler follows sys.stderr, so a swapped-and-closed stderr never breaks later logging."""

from __future__ import annotations

import io
import logging
import sys

from podwatch.logs import configure_logging, fields


def test_log_lines_go_to_the_stderr_of_the_moment(monkeypatch):
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        first = io.StringIO()
        monkeypatch.setattr(sys, "stderr", first)
        configure_logging()  # as a CLI run inside CliRunner does
        logging.getLogger("podwatch.test").info("first", extra=fields(n=1))
        first.close()  # the harness closes its capture
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("podwatch.test").warning("second")  # went to the closed capture before
        assert "second" in second.getvalue() and "first" not in second.getvalue()
    finally:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
