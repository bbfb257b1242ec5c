"""Logging set-up: sentences with structured fields (`key=value`), one line each."""

from __future__ import annotations

import logging
import sys


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            base += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return base


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at emit time, not the stream of the moment it was made:
    a command run inside a harness that swaps stderr (typer's CliRunner) would otherwise leave
    the root logger writing to a closed stream for everyone after it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


def configure_logging(level: int = logging.INFO) -> None:
    handler = _CurrentStderrHandler()
    handler.setFormatter(_KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pymodbus", "amqtt", "transitions", "uvicorn.access", "httpx", "asyncio"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    # aiokafka logs every failed reconnect at ERROR during an outage; podwatch's producer and sink log
    # the outage once, with what they do about it (spool, retry), so its own lines are kept for -v.
    logging.getLogger("aiokafka").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.CRITICAL)


def fields(**kw) -> dict:
    """`log.info("poll failed", extra=fields(device=d, error=e))` adds key=value pairs."""
    return {"fields": kw}
