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


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
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
