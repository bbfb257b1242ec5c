"""Vectorised decoding of `podwatch.telemetry.v1` messages into long sample rows.

Two paths, same result:
- bulk (the hot path): `map(orjson.loads)` over the batch, the header fields pulled out with one
  `itemgetter` per message and transposed with `zip`, then every rule of the envelope header
  checked per COLUMN with C-level set/min/max (`_header_columns_valid`); points are flattened
  with `chain.from_iterable`. No Python-level loop per message or per point. It only proves
  that `envelope_problem` would accept every message; the moment anything is off (a bad or
  missing field, a tombstone, invalid JSON, a `true`/`false` anywhere in the batch, a bad point
  value) the batch goes to
- the checked path: a loop per message calling the stream stage's one validator
  (`envelope_problem`), which rejects the bad messages with their reason.
The per-reading columns (device, ts, seq, quality) are repeated to point granularity with numpy.
A message that cannot be turned into rows is reported with a reason (the sink sends it to the
dead-letter topic) and never stops the batch.

Validation follows the contract of `podwatch.stream.envelope.decode_envelope` (same rules, same
kind of reasons): point values must be finite numbers or null (booleans are rejected; a cheap
byte search finds the messages worth checking point by point).
Output columns (one row per point): ts (Datetime ms, UTC), device, metric, value (Float64,
null for bad points), quality (UInt8: 0 good, 1 stale, 2 bad), seq (UInt64).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import itemgetter

import numpy as np
import orjson
import polars as pl

from podwatch.samples import SCHEMA_VERSION, Quality
from podwatch.stream.envelope import MAX_SEQ, MAX_TS_MS, MIN_TS_MS, QUALITIES, envelope_problem

QUALITY_CODES = {str(q): q.code for q in Quality}  # storage codes: good=0, stale=1, bad=2

ROW_SCHEMA = {
    "ts": pl.Datetime("ms"),
    "device": pl.Categorical,
    "metric": pl.Categorical,
    "value": pl.Float64,
    "quality": pl.UInt8,
    "seq": pl.UInt64,
}


@dataclass(slots=True)
class Rejected:
    index: int  # position of the message in the decoded list
    reason: str


@dataclass
class DecodedBatch:
    """Rows of the accepted messages plus the per-reading view the deduplicator needs.

    The per-message columns are ready at once; the long rows (`rows`, `row_reading`) are built
    on first use (numpy/polars, mostly without the GIL): the sink builds them in its write
    thread, so the event loop is free to fetch and decode the next batch meanwhile."""

    # one entry per accepted message, in input order
    msg_index: np.ndarray  # int64: position in the input list
    devices: list[str]
    seqs: list[int]
    ts_ms: list[int]
    point_counts: np.ndarray  # int64
    rejected: list[Rejected] = field(default_factory=list)
    sites: set[str] = field(default_factory=set)
    _row_parts: tuple | None = field(default=None, repr=False)
    _layout: "RowLayout | None" = field(default=None, repr=False)
    _rows: pl.DataFrame | None = field(default=None, repr=False)

    @property
    def n_readings(self) -> int:
        return len(self.devices)

    @property
    def layout(self) -> "RowLayout":
        """The long rows as numpy columns in stored order (what the writer inserts)."""
        if self._layout is None:
            self._layout = _build_layout(self, *self._row_parts)
        return self._layout

    @property
    def rows(self) -> pl.DataFrame:
        """One row per point, ordered by (device, ts): ts, device, metric, value, quality, seq."""
        if self._rows is None:
            self._rows = _rows_of_layout(self, self.layout)
        return self._rows

    @property
    def row_reading(self) -> np.ndarray:
        """int64 per row: the index of its reading (into devices/seqs/ts_ms)."""
        return self.layout.reading


@dataclass(slots=True)
class RowLayout:
    """A batch's long rows as numpy columns, in stored order: readings ordered by (device, ts),
    a reading's points together in the order the device sent them."""

    reading: np.ndarray  # int64 per row: index of its reading (into devices/seqs/ts_ms)
    metric_code: np.ndarray  # uint32 per row: index into metric_names
    value: np.ndarray  # float64 per row; NaN = null (bad or missing value)
    quality: np.ndarray  # uint8 per row
    metric_names: pl.Series  # Categorical: the names metric_code indexes
    reading_order: np.ndarray  # int64: the readings in stored order
    key_id: np.ndarray  # int64 per reading: equal ids = the same metric names in the same order
    reading_devices: pl.Series  # Categorical, one per reading (its physical codes tell devices apart)


def empty_rows() -> pl.DataFrame:
    return pl.DataFrame(schema=ROW_SCHEMA)


# Metric-name dictionary of this process: name -> code, and key tuple -> codes. Bounded: cleared
# (and rebuilt on demand) if a producer sends an unreasonable number of distinct names.
_METRIC_CODE: dict[str, int] = {}
_METRIC_NAMES: list[str] = []
_KEY_CODES: dict[tuple, np.ndarray] = {}
_CATEGORIES: list = [None]
MAX_METRIC_NAMES = 100_000
MAX_KEY_TUPLES = 50_000


def _bound_metric_cache() -> None:
    """Called between batches only: codes handed out within a batch must stay valid."""
    if len(_METRIC_NAMES) > MAX_METRIC_NAMES or len(_KEY_CODES) > MAX_KEY_TUPLES:
        _METRIC_CODE.clear()
        _METRIC_NAMES.clear()
        _KEY_CODES.clear()
        _CATEGORIES[0] = None


def _codes_for(names: tuple) -> np.ndarray:
    codes = []
    for name in names:
        code = _METRIC_CODE.get(name)
        if code is None:
            code = _METRIC_CODE[name] = len(_METRIC_NAMES)
            _METRIC_NAMES.append(name)
            _CATEGORIES[0] = None
        codes.append(code)
    array = np.asarray(codes, dtype=np.uint32)
    _KEY_CODES[names] = array
    return array


def _metric_categories() -> pl.Series:
    if _CATEGORIES[0] is None:
        _CATEGORIES[0] = pl.Series("metric", _METRIC_NAMES, dtype=pl.Categorical)
    return _CATEGORIES[0]


def _bad_point_value(points: dict) -> str | None:
    for name, value in points.items():
        if value is not None and (type(value) not in (int, float) or not np.isfinite(value)):
            return f"point {name!r} has value {value!r}; expected a finite number or null"
    return None


_HEADER_GETTERS = [itemgetter(name) for name in ("v", "site", "device", "seq", "ts", "quality")]
_POINTS = itemgetter("points")
BULK_CHUNK = 64


def decode_messages(values: list[bytes | None]) -> DecodedBatch:
    """Decode Kafka message values into rows; rejected messages are listed with a reason."""
    _bound_metric_cache()
    batch = _decode_bulk(values)
    return batch if batch is not None else _decode_checked(values)


def _all_of_type(column, kind: type) -> bool:
    return set(map(type, column)) == {kind}  # `type is` semantics: bool is not an int here


def _header_columns_valid(vs, sites, devices, seqs, ts_ms, qualities) -> bool:
    """True only if `envelope_problem` returns None for every message (points and pq are
    checked apart).
    Each test is at least as strict as the validator's rule for that field."""
    if not (_all_of_type(vs, int) and min(vs) == max(vs) == SCHEMA_VERSION):
        return False
    for names in (sites, devices):
        distinct = set(names)  # unhashable (object/array) values raise TypeError: caller falls back
        if "" in distinct or not _all_of_type(distinct, str):
            return False
    if not (_all_of_type(seqs, int) and min(seqs) >= 0 and max(seqs) <= MAX_SEQ):
        return False
    if not (_all_of_type(ts_ms, int) and min(ts_ms) >= MIN_TS_MS and max(ts_ms) < MAX_TS_MS):
        return False
    distinct = set(qualities)
    return _all_of_type(distinct, str) and distinct <= QUALITIES


def _decode_bulk(values: list[bytes | None]) -> DecodedBatch | None:
    """The whole batch at C speed, or None when any message needs the checked path."""
    if not values:
        return None
    try:
        return _decode_bulk_unchecked(values)
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, OverflowError, pl.exceptions.PolarsError):
        return None  # tombstone, invalid JSON, missing field, not an object, bad point value


def _decode_bulk_unchecked(values: list[bytes | None]) -> DecodedBatch | None:
    loads = orjson.loads
    columns: list[list] = [[] for _ in _HEADER_GETTERS]
    key_tuples: list[tuple] = []
    counts: list[int] = []
    point_values: list = []
    overrides: list[tuple[int, tuple, dict]] = []
    # Chunks of a few dozen messages: the parsed dicts of a chunk are freed before the next is
    # parsed, so memory stays hot in cache (parsing the whole batch first costs ~2x: fresh memory
    # for every dict, and the garbage collector walking them).
    for lo in range(0, len(values), BULK_CHUNK):
        envs = list(map(loads, values[lo:lo + BULK_CHUNK]))
        for column, getter in zip(columns, _HEADER_GETTERS):
            column.extend(map(getter, envs))
        points = list(map(_POINTS, envs))
        if not _all_of_type(points, dict):
            return None
        first_key = len(key_tuples)
        key_tuples.extend(map(tuple, points))
        counts.extend(map(len, points))
        if any(map(dict.__contains__, envs, repeat("pq"))):
            row = len(point_values)
            for j, env in enumerate(envs):
                if "pq" in env:
                    if envelope_problem(env) is not None:  # a bad pq: the checked path names it
                        return None
                    overrides.append((row, key_tuples[first_key + j], env["pq"]))
                row += counts[first_key + j]
        point_values.extend(chain.from_iterable(map(dict.values, points)))
    if not _header_columns_valid(*columns):
        return None
    vs, sites, devices, seqs, ts_ms, qualities = columns
    # A device sends the same metric names in the same order every time: one dict lookup per
    # message instead of building a string per point.
    if not all(map(_KEY_CODES.__contains__, key_tuples)):
        for names in set(key_tuples) - _KEY_CODES.keys():
            _codes_for(names)
    metric_codes = list(map(_KEY_CODES.__getitem__, key_tuples))
    value_series = _value_series(point_values)  # raises on a string, list or object: the checked path names it
    if _holds_a_boolean(point_values, value_series):
        return None
    quality_codes = list(map(QUALITY_CODES.__getitem__, qualities))
    return _build_batch(devices, seqs, ts_ms, quality_codes, counts, metric_codes, value_series,
                        overrides, np.arange(len(values), dtype=np.int64), [], set(sites))


def _holds_a_boolean(point_values: list, value_series: pl.Series) -> bool:
    """polars takes a JSON boolean as 1.0/0.0 (and bool is an int), so only a value that came out
    exactly 0 or 1 can have been one: the types of those few are looked at, not of every value
    (a type check of every point cost ~0.7 us per 25-point message, ~10 % of the fetch process)."""
    values = value_series.to_numpy()
    maybe = np.flatnonzero((values == 0.0) | (values == 1.0))
    return any(type(point_values[i]) is bool for i in maybe.tolist())


def _value_series(point_values: list) -> pl.Series:
    """Float64 values; raises on a value that is not a number or not finite."""
    value_series = pl.Series("value", point_values, dtype=pl.Float64, strict=True)
    finite_ok = value_series.is_null() | value_series.is_finite()
    if not finite_ok.all():
        raise TypeError("non-finite value")
    return value_series


def _decode_checked(values: list[bytes | None]) -> DecodedBatch:
    """One message at a time through the stream stage's validator: exact reasons per message."""
    rejected: list[Rejected] = []
    msg_index: list[int] = []
    devices: list[str] = []
    seqs: list[int] = []
    ts_ms: list[int] = []
    qualities: list[int] = []
    counts: list[int] = []
    metric_codes: list[np.ndarray] = []  # per message: codes of its metric names (cached per key tuple)
    key_codes = _KEY_CODES
    point_values: list = []
    sites: set[str] = set()
    overrides: list[tuple[int, tuple, dict]] = []  # (first row, metric names, pq) for per-point quality
    loads = orjson.loads
    row = 0
    for i, raw in enumerate(values):
        if raw is None:
            rejected.append(Rejected(i, "message has no value (tombstone)"))
            continue
        try:
            env = loads(raw)
        except orjson.JSONDecodeError as exc:
            rejected.append(Rejected(i, f"not valid JSON: {exc}"))
            continue
        reason = envelope_problem(env)  # the stream stage's one validator of the envelope header
        if reason is not None:
            rejected.append(Rejected(i, reason))
            continue
        points = env["points"]
        if b"true" in raw or b"false" in raw:  # polars would take a JSON boolean as 1.0/0.0
            reason = _bad_point_value(points)
            if reason is not None:
                rejected.append(Rejected(i, reason))
                continue
        sites.add(env.get("site"))
        msg_index.append(i)
        devices.append(env["device"])
        seqs.append(env["seq"])
        ts_ms.append(env["ts"])
        qualities.append(QUALITY_CODES[env["quality"]])
        counts.append(len(points))
        pq = env.get("pq")
        if pq:
            overrides.append((row, tuple(points), pq))
        # A device sends the same metric names in the same order every time: one dict lookup per
        # message instead of building a string per point.
        names = tuple(points)
        codes = key_codes.get(names)
        if codes is None:
            codes = _codes_for(names)
        metric_codes.append(codes)
        point_values.extend(points.values())
        row += len(points)

    try:
        value_series = _value_series(point_values)
    except (TypeError, ValueError, OverflowError, pl.exceptions.PolarsError):
        # Slow path, only for a batch holding a bad value: find and reject the culprits.
        return _decode_with_bad_values(values, rejected, msg_index)
    return _build_batch(devices, seqs, ts_ms, qualities, counts, metric_codes, value_series, overrides,
                        np.asarray(msg_index, dtype=np.int64), rejected, {s for s in sites if isinstance(s, str)})


def _build_batch(devices: list[str], seqs: list[int], ts_ms: list[int], qualities: list[int], counts: list[int],
                 metric_codes: list[np.ndarray], value_series: pl.Series, overrides: list[tuple[int, tuple, dict]],
                 msg_index: np.ndarray, rejected: list[Rejected], sites: set[str]) -> DecodedBatch:
    """The batch; its long rows are built later from these parts (`DecodedBatch.rows`). The
    metric dictionary is captured now: it may be cleared before the rows are built."""
    counts_np = np.asarray(counts, dtype=np.int64)
    # the cached code array of a key tuple is one object: its id names the tuple (for the batch's life)
    key_ids = np.fromiter(map(id, metric_codes), dtype=np.int64, count=len(metric_codes))
    parts = (qualities, metric_codes, value_series, overrides, _metric_categories(), key_ids)
    return DecodedBatch(msg_index, devices, seqs, ts_ms, counts_np, rejected, sites, parts)


def portable_row_parts(batch: DecodedBatch) -> tuple:
    """What the batch's long rows are built from, as flat arrays another process can take
    (pickle protocol 5 moves them without copies): ~12 B per point instead of the rows' ~33.
    `restore_row_parts` is the other end."""
    qualities, metric_codes, value_series, overrides, metric_categories, key_ids = batch._row_parts
    codes = np.concatenate(metric_codes) if metric_codes else np.empty(0, np.uint32)
    return (np.asarray(qualities, dtype=np.uint8), codes, value_series.to_numpy(), overrides,
            metric_categories.to_list(), key_ids)


def restore_row_parts(batch: DecodedBatch, portable: tuple) -> DecodedBatch:
    """The batch with the row parts of `portable_row_parts`; its rows are built on first use,
    against this process's Categorical mapping (the metric codes index the names sent along)."""
    qualities, codes, values, overrides, names, key_ids = portable
    batch._row_parts = (qualities, [codes], pl.Series("value", values, dtype=pl.Float64), overrides,
                        pl.Series("metric", names, dtype=pl.Categorical), key_ids)
    return batch


def _build_layout(batch: DecodedBatch, qualities: list[int], metric_codes: list[np.ndarray], value_series: pl.Series,
                  overrides: list[tuple[int, tuple, dict]], metric_categories: pl.Series,
                  key_ids: np.ndarray) -> RowLayout:
    """Long rows ordered by (device, ts) from per-message columns and the flat point values."""
    devices, ts_ms, counts_np = batch.devices, batch.ts_ms, batch.point_counts
    row = len(value_series)
    values = shortest_float32_decimals(value_series.to_numpy())
    reading_of_row = np.repeat(np.arange(len(counts_np), dtype=np.int64), counts_np)
    quality_rows = np.asarray(qualities, dtype=np.uint8)[reading_of_row] if len(counts_np) else np.empty(0, np.uint8)
    if overrides:
        for first_row, names, pq in overrides:
            for j, name in enumerate(names):
                if name in pq:
                    quality_rows[first_row + j] = QUALITY_CODES[pq[name]]
    # Store rows ordered by (device, ts) - decided at reading granularity (cheap) - so that
    # DuckDB gets long runs per column (RLE on device/ts/seq, a repeating metric cycle).
    # Rows of one batch span a short time range, so time-range scans still prune by zone maps.
    device_series = pl.Series("device", devices, dtype=pl.Categorical)
    reading_order = (pl.DataFrame({"device": device_series, "ts": pl.Series(ts_ms, dtype=pl.Int64)})
                     .select(pl.arg_sort_by(["device", "ts"])).to_series().to_numpy().astype(np.int64))
    sorted_counts = counts_np[reading_order]
    first_row = np.concatenate(([0], np.cumsum(counts_np)[:-1])) if len(counts_np) else counts_np
    sorted_starts = np.concatenate(([0], np.cumsum(sorted_counts)[:-1])) if len(sorted_counts) else sorted_counts
    row_order = np.arange(row, dtype=np.int64) + np.repeat(first_row[reading_order] - sorted_starts, sorted_counts)
    codes = np.concatenate(metric_codes) if metric_codes else np.empty(0, np.uint32)
    return RowLayout(reading_of_row[row_order], codes[row_order], values[row_order], quality_rows[row_order],
                     metric_categories, reading_order, np.asarray(key_ids, dtype=np.int64), device_series)


def _rows_of_layout(batch: DecodedBatch, layout: RowLayout) -> pl.DataFrame:
    """The layout as a polars frame with names (for the batch listeners and tests)."""
    reading = layout.reading
    return pl.DataFrame(
        {
            "ts": pl.Series(batch.ts_ms, dtype=pl.Int64).gather(reading).cast(pl.Datetime("ms")),
            # Categorical: dictionary-encoded, cheap to carry and to compare
            "device": layout.reading_devices.gather(reading),
            "metric": layout.metric_names.gather(layout.metric_code),
            "value": pl.Series("value", layout.value, nan_to_null=True),
            "quality": pl.Series(layout.quality, dtype=pl.UInt8),
            "seq": pl.Series(batch.seqs, dtype=pl.UInt64).gather(reading),
        }
    )


def _decode_with_bad_values(values, rejected, msg_index) -> DecodedBatch:
    good: list[bytes] = []
    positions: list[int] = []
    for i in msg_index:
        env = orjson.loads(values[i])
        reason = _bad_point_value(env["points"])
        if reason:
            rejected.append(Rejected(i, reason))
        else:
            good.append(values[i])
            positions.append(i)
    inner = decode_messages(good)
    inner.msg_index = np.asarray(positions, dtype=np.int64)[inner.msg_index] if len(positions) else inner.msg_index
    inner.rejected = sorted(rejected + inner.rejected, key=lambda r: r.index)
    return inner


def shortest_float32_decimals(values: np.ndarray) -> np.ndarray:
    """Values that are exactly a float32 (Modbus float32 registers) become the shortest decimal
    (7-9 significant digits) that maps back to the same float32: no information the device sent
    is lost, and DuckDB stores them with ALP at ~3 bytes instead of ~7 (ALP_RD) per value.
    Other values (float64 registers, scaled integers) are left unchanged. NaN = null."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        as32 = values.astype(np.float32)  # beyond float32's range: inf, never equal to the value
        exact = (as32.astype(np.float64) == values) & (values != 0) & np.isfinite(values)
        if not exact.any():
            return values
        out = values.copy()
        candidates = np.flatnonzero(exact)
        picked = values[candidates]
        picked32 = as32[candidates]
        magnitude = np.floor(np.log10(np.abs(picked)))
        pending = np.ones(candidates.size, dtype=bool)
        for digits in (7, 8, 9):
            scale = 10.0 ** (digits - 1 - magnitude)
            rounded = np.round(picked * scale) / scale
            ok = pending & (rounded.astype(np.float32) == picked32) & np.isfinite(rounded)
            out[candidates[ok]] = rounded[ok]
            pending &= ~ok
            if not pending.any():
                break
    return out


def select_readings(batch: DecodedBatch, keep: np.ndarray) -> pl.DataFrame:
    """Rows of the readings where `keep` (bool per accepted reading) is true."""
    if keep.all():
        return batch.rows
    keep_rows = keep[batch.row_reading]
    return batch.rows.filter(pl.Series(keep_rows))


def latest_rows_of_layout(batch: DecodedBatch, keep: np.ndarray) -> np.ndarray | None:
    """Row positions (into the layout) of each kept (device, metric)'s newest row, when every
    device's kept readings carry the same metric names (then its newest reading holds all of
    them: a few rows per device instead of a group-by over all rows). None otherwise: the caller
    groups the rows."""
    layout = batch.layout
    order = layout.reading_order[keep[layout.reading_order]]
    if not order.size:
        return np.empty(0, np.int64)
    device_codes = layout.reading_devices.to_physical().to_numpy()[order]
    same_device_next = device_codes[1:] == device_codes[:-1]
    key_ids = layout.key_id[order]
    if not np.array_equal(key_ids[1:][same_device_next], key_ids[:-1][same_device_next]):
        return None
    last_of_device = np.ones(order.size, dtype=bool)
    last_of_device[:-1] = ~same_device_next
    newest = np.zeros(len(batch.devices), dtype=bool)
    newest[order[last_of_device]] = True
    return np.flatnonzero(newest[layout.reading])
