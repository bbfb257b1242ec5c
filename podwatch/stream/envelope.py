"""Wire format of the podwatch topics: encode readings, alert events and dead letters to bytes,
and decode telemetry messages strictly.

`podwatch.telemetry.v1` message: key = device id (UTF-8), value = orjson of
`Reading.to_envelope()` (schema version 1, JSON Schema in `schema/telemetry.v1.json`).
`decode_envelope(bytes)` accepts exactly what that schema accepts and raises `EnvelopeError`
with a one-line reason otherwise (garbage, truncated JSON, wrong or future version, missing
field, wrong type, non-finite number); consumers put the reason in the dead letter.

Dead letter (`podwatch.deadletter.v1`, schema `schema/deadletter.v1.json`):
    {"v": 1, "source": "mqtt_collector", "reason": "payload is not JSON: ...",
     "topic": "podwatch/demo/telemetry/cdu-01", "partition": null, "offset": null,
     "ts": 1732240000123, "payload_b64": "eyJmbG93...", "payload_bytes": 17}
The payload is kept whole up to `MAX_DEAD_LETTER_PAYLOAD_BYTES`; beyond it, only that many
leading bytes are kept and `payload_truncated` is true (a 1 MB blob must not break the
dead-letter topic's record size limit).
"""

from __future__ import annotations

import base64
import json
import math
import time
from functools import lru_cache
from importlib import resources
from typing import Any

import orjson

from podwatch.samples import SCHEMA_VERSION, Quality, Reading

DEAD_LETTER_VERSION = 1
ALERT_EVENT_VERSION = 1
MAX_DEAD_LETTER_PAYLOAD_BYTES = 64 * 1024
# Timestamps outside [2000-01-01, 2100-01-01) are a producer bug, not data (same bounds as the sink).
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 4_102_444_800_000
MAX_SEQ = 2**64 - 1
QUALITIES = frozenset(q.value for q in Quality)
SCHEMA_FILES = {"telemetry": "telemetry.v1.json", "alert": "alert.v1.json", "deadletter": "deadletter.v1.json"}


class EnvelopeError(ValueError):
    """A message that is not a valid envelope; `reason` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- encode


def reading_key(reading: Reading) -> bytes:
    """Message key: the device id, so every reading of a device lands on one partition (order)."""
    return reading.device.encode()


def encode_reading(reading: Reading) -> bytes:
    """Message value of one reading (non-finite values become null, as `to_envelope` does)."""
    return orjson.dumps(reading.to_envelope())


def encode_alert_event(event: dict) -> tuple[bytes, bytes]:
    """(key, value) of an alert event; key = alert_id (all transitions of an alert stay in order)."""
    if not isinstance(event, dict):
        raise EnvelopeError(f"an alert event must be a dict, not {type(event).__name__}")
    missing = [name for name in ("alert_id", "rule", "state", "ts") if name not in event]
    if missing:
        raise EnvelopeError(f"alert event is missing field(s) {', '.join(missing)}")
    body = {"v": ALERT_EVENT_VERSION, **event}
    try:
        value = orjson.dumps(body)
    except TypeError as exc:
        raise EnvelopeError(f"alert event is not JSON-serialisable: {exc}") from exc
    return str(event["alert_id"]).encode(), value


def dead_letter(payload: bytes, reason: str, source: str, *, topic: str | None = None,
                partition: int | None = None, offset: int | None = None, ts_ms: int | None = None,
                **meta: Any) -> dict:
    """The dead-letter envelope of an undecodable `payload` (see the module docstring).

    Extra keyword arguments (site, device, client id, ...) go into the `meta` object."""
    raw = bytes(payload or b"")
    kept = raw[:MAX_DEAD_LETTER_PAYLOAD_BYTES]
    letter: dict[str, Any] = {
        "v": DEAD_LETTER_VERSION, "source": source, "reason": str(reason), "topic": topic,
        "partition": partition, "offset": offset,
        "ts": int(time.time() * 1000) if ts_ms is None else int(ts_ms),
        "payload_b64": base64.b64encode(kept).decode(), "payload_bytes": len(raw),
    }
    if len(kept) < len(raw):
        letter["payload_truncated"] = True
    if meta:
        letter["meta"] = {k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v)) for k, v in meta.items()}
    return letter


def encode_dead_letter(letter: dict) -> bytes:
    return orjson.dumps(letter)


# --------------------------------------------------------------------------- decode


def _is_int(value: Any) -> bool:
    return type(value) is int  # bool is an int subclass and is not a valid count or time


def _is_number(value: Any) -> bool:
    return type(value) is float or type(value) is int


def envelope_problem(env: Any) -> str | None:
    """Why a parsed value is not a usable v1 telemetry envelope (one line), or None.

    The one validator of the envelope's header (version, site, device, seq, ts, quality, points
    type, pq); `decode_envelope` adds the per-point value checks, and the DuckDB sink uses this
    directly on its per-message hot path (point values are typed by its columnar decode)."""
    if type(env) is not dict:
        return f"envelope must be a JSON object, not a JSON {_json_type(env)}"
    if "v" not in env:
        return "missing field 'v' (schema version)"
    version = env["v"]
    if not _is_int(version):
        return f"field 'v' must be an integer, got {_json_type(version)}"
    if version > SCHEMA_VERSION:
        return f"schema version {version} is newer than this podwatch understands ({SCHEMA_VERSION}); upgrade"
    if version != SCHEMA_VERSION:
        return f"unsupported schema version {version} (expected {SCHEMA_VERSION})"
    for name in ("site", "device", "seq", "ts", "quality", "points"):
        if name not in env:
            return f"missing field '{name}'"
    for name in ("site", "device"):
        if type(env[name]) is not str or not env[name]:
            return f"field '{name}' must be a non-empty string, got {_json_type(env[name])}"
    seq = env["seq"]
    if not _is_int(seq) or not 0 <= seq <= MAX_SEQ:
        return f"field 'seq' must be an integer in [0, 2^64), got {_describe(seq)}"
    ts = env["ts"]
    if not _is_int(ts):
        return f"field 'ts' must be integer milliseconds since the epoch, got {_describe(ts)}"
    if not MIN_TS_MS <= ts < MAX_TS_MS:
        return f"field 'ts' {ts} is outside 2000-01-01..2100-01-01 (milliseconds expected)"
    if env["quality"] not in QUALITIES or type(env["quality"]) is not str:
        return f"field 'quality' must be one of good/stale/bad, got {_describe(env['quality'])}"
    if type(env["points"]) is not dict:
        return f"field 'points' must be an object, got {_json_type(env['points'])}"
    if "pq" in env:
        pq = env["pq"]
        if type(pq) is not dict:
            return f"field 'pq' must be an object, got {_json_type(pq)}"
        for metric, quality in pq.items():
            if type(quality) is not str or quality not in QUALITIES:
                return f"pq['{metric}'] must be one of good/stale/bad, got {_describe(quality)}"
    return None


def decode_envelope(data: bytes | bytearray | memoryview | None) -> dict:
    """Parse and validate one `podwatch.telemetry.v1` message value; return the envelope dict.

    Unknown top-level fields are ignored (additive changes keep version 1); anything the schema
    forbids raises `EnvelopeError(reason)`."""
    if data is None:
        raise EnvelopeError("message has no value (null payload)")
    if not data:
        raise EnvelopeError("message value is empty")
    try:
        env = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"value is not valid JSON (garbage, truncated, or NaN/Infinity): {exc}") from None
    problem = envelope_problem(env)
    if problem is not None:
        raise EnvelopeError(problem)
    for metric, value in env["points"].items():
        if value is None:
            continue
        if not _is_number(value):
            raise EnvelopeError(f"point '{metric}' must be a number or null, got {_json_type(value)}")
        if not math.isfinite(value):
            raise EnvelopeError(f"point '{metric}' is not a finite number ({value})")
    return env


def decode_reading(data: bytes) -> Reading:
    """`decode_envelope` then `Reading.from_envelope`."""
    return Reading.from_envelope(decode_envelope(data))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{_json_type(value)} {text[:40]}"


# --------------------------------------------------------------------------- JSON Schema


@lru_cache(maxsize=None)
def load_schema(kind: str) -> dict:
    """The JSON Schema (draft 2020-12) of 'telemetry', 'alert' or 'deadletter' messages."""
    try:
        name = SCHEMA_FILES[kind]
    except KeyError:
        raise ValueError(f"unknown schema {kind!r}; one of {', '.join(SCHEMA_FILES)}") from None
    return json.loads(resources.files("podwatch.stream").joinpath("schema", name).read_text())
