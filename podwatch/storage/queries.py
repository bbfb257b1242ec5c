"""The read queries behind the HTTP API (and usable directly on a cursor).

Every function takes a DuckDB cursor and plain arguments and returns a list of flat dicts
(one per row) with a `time` column where rows are time-stamped — the shape Grafana's
Infinity datasource reads without transformations. Times are naive UTC datetimes here; the
API serialises them as ISO 8601 with a `Z`.
"""

from __future__ import annotations

import json
import re
import warnings
from datetime import datetime, timedelta, timezone
from typing import Any

import duckdb
import pyarrow as pa

from podwatch.errors import PodwatchError
from podwatch.storage.rollups import done_until
from podwatch.storage.schema import ROLLUP_SECONDS


class QueryError(PodwatchError):
    """A bad query parameter; the message names it (HTTP 400)."""


_RELATIVE = re.compile(r"^now(?:\s*-\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w|y))?$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?$")
MAX_BUCKETS = 100_000  # per series, as many rows as `step=raw` returns at most
MAX_RAW_ROWS = 100_000  # rows of `step=raw`; a longer result is cut (oldest first) and marked truncated
MAX_SERIES_ROWS = 1_000_000  # rows of a bucketed answer over all its series (a module at 10 s over a week): cut and marked


class SeriesRows(list):
    """Rows of `series`; `truncated` when `step=raw` hit MAX_RAW_ROWS or buckets MAX_SERIES_ROWS."""

    truncated = False
MAX_STEP_S = 3650 * 86400  # a step's microseconds go to DuckDB as an integer literal
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 365 * 86400}


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def parse_time(value: str | None, name: str, default: datetime | None = None, now: datetime | None = None) -> datetime | None:
    """Epoch milliseconds (Grafana's ${__from}), epoch seconds (< 1e11), ISO 8601, `now`,
    or `now-6h` (ms, s, m, h, d, w, y). Returns a naive UTC datetime."""
    if value is None or value == "":
        return default
    try:
        return _parse_time(value, name, now or utcnow())
    except (OverflowError, ValueError):  # past datetime's years 1-9999
        raise QueryError(f"parameter '{name}': time {value!r} is out of range (years 1-9999)") from None


def _parse_time(value: str, name: str, now: datetime) -> datetime:
    text = value.strip()
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        number = float(text)
        seconds = number / 1000 if abs(number) >= 1e11 else number
        return datetime(1970, 1, 1) + timedelta(seconds=seconds)
    match = _RELATIVE.match(text)
    if match:
        amount, unit = match.groups()
        return now if amount is None else now - timedelta(seconds=float(amount) * _UNIT_S[unit])
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(f"parameter '{name}': cannot read time {value!r} (use epoch ms, ISO 8601 or now-6h)") from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
    return parsed


def parse_step_s(value: str | None, name: str = "step") -> float | None:
    """`10s`, `1m`, `15m`, `1h`, `30` (seconds), or Grafana's `${__interval_ms}` as `1000ms`."""
    if value is None or value == "" or value == "auto":
        return None
    if value == "raw":
        return 0.0
    match = _DURATION.match(value.strip())
    if not match:
        raise QueryError(f"parameter '{name}': cannot read duration {value!r} (e.g. 10s, 1m, 1h, raw)")
    amount, unit = match.groups()
    seconds = float(amount) * _UNIT_S[unit or "s"]
    if seconds < 0.001:
        raise QueryError(f"parameter '{name}' must be at least 1ms, got {value!r}")
    if seconds > MAX_STEP_S:
        raise QueryError(f"parameter '{name}' must be at most 3650d, got {value!r}")
    return seconds


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _in(column: str, values: list[str], params: list) -> str:
    params.extend(values)
    return f"{column} IN ({', '.join('?' for _ in values)})"


def _floor_to(ts: datetime, seconds: int) -> datetime:
    """`ts` floored to a multiple of `seconds` since the epoch (the rollups' bucket starts)."""
    epoch = datetime(1970, 1, 1)
    return epoch + timedelta(seconds=(ts - epoch) // timedelta(seconds=seconds) * seconds)


def pick_rollup(step_s: float) -> str | None:
    """The coarsest rollup whose bucket divides the step, or None for raw samples."""
    for name, seconds in sorted(ROLLUP_SECONDS.items(), key=lambda kv: -kv[1]):
        if step_s >= seconds and step_s % seconds == 0:
            return name
    return None


def _topology_where(rack: str | None, module: str | None, node: str | None, node_kind: str | None,
                    params: list, cdu: str | None = None, side: str | None = None) -> list[str]:
    """Conditions on topo_devices selecting the devices of racks / modules / power nodes (the meters
    on a node, e.g. node=xfmr-1) / power nodes of a kind (node_kind=transformer: every substation
    meter, not the feeder or busway meters) / CDUs (the CDU's own controller, whatever its device id)
    / a feed side (a | b: the PDUs and metered feeds of that side, whatever their ids)."""
    where = []
    if rack:
        where.append(_in("rack", _csv(rack), params))
    if module:
        where.append(_in("module", _csv(module), params))
    if cdu:
        where.append(_in("cdu", _csv(cdu), params))
    if side:
        where.append(_in("lower(side)", [v.lower() for v in _csv(side)], params))
    if node:
        where.append(_in("node", _csv(node), params))
    if node_kind:
        kinds = _csv(node_kind)
        params.extend(kinds)
        where.append(f"node IN (SELECT node FROM topo_power WHERE kind IN ({', '.join('?' for _ in kinds)}))")
    return where


def series(con: duckdb.DuckDBPyConnection, *, device: str | None = None, metric: str | None = None,
           rack: str | None = None, module: str | None = None, node: str | None = None,
           node_kind: str | None = None, cdu: str | None = None, side: str | None = None,
           start: datetime, end: datetime,
           step_s: float | None = None, max_points: int = 2000) -> list[dict]:
    """Time series over [start, end): average per step bucket, from the right rollup for the
    step (closed buckets) plus the raw tail not rolled up yet. step 0 = raw rows."""
    if end <= start:
        raise QueryError("parameter 'to' must be after 'from'")
    devices = _csv(device)
    metrics = _csv(metric)
    if rack or module or node or node_kind or cdu or side:
        params: list = []
        where = _topology_where(rack, module, node, node_kind, params, cdu, side)
        rack_devices = [r[0] for r in con.execute(f"SELECT device FROM topo_devices WHERE {' AND '.join(where)}", params).fetchall()]
        if not rack_devices:
            return []
        devices = [d for d in rack_devices if d in devices] if devices else rack_devices
        if not devices:
            return []
    if not devices and not metrics:
        raise QueryError("give at least one of 'device', 'metric', 'rack', 'module', 'cdu', 'side', 'node' or 'node_kind'")
    span_s = (end - start).total_seconds()
    if step_s is None:
        step_s = max(1.0, span_s / max_points)
        for nice in (1, 5, 10, 15, 30, 60, 300, 600, 900, 1800, 3600, 21600, 86400):
            if nice >= step_s:
                step_s = nice
                break
    filters, params = [], []
    if devices:
        filters.append(_in("device", devices, params))
    if metrics:
        filters.append(_in("metric", metrics, params))
    where = " AND ".join(filters)
    if step_s == 0:
        rows = con.execute(
            f"SELECT ts AS time, device, metric, value FROM samples WHERE ts >= ? AND ts < ? AND {where} "
            f"ORDER BY time, device, metric LIMIT {MAX_RAW_ROWS + 1}", [start, end, *params]).fetchall()
        result = SeriesRows({"time": t, "device": d, "metric": m, "value": v} for t, d, m, v in rows[:MAX_RAW_ROWS])
        result.truncated = len(rows) > MAX_RAW_ROWS
        return result
    if span_s / step_s > MAX_BUCKETS:
        raise QueryError(f"parameter 'step': {step_s:g} s over this range gives {span_s / step_s:,.0f} buckets per series "
                         f"(at most {MAX_BUCKETS:,}); use a larger step or a shorter range")
    step_us = int(step_s * 1_000_000)
    rollup = pick_rollup(step_s)
    mark = done_until(con).get(rollup) if rollup else None
    parts, all_params = [], []
    raw_ranges = [(start, end)]
    if rollup and mark is not None:
        # Closed rollup buckets lying wholly inside [start, end) come from the rollup; the edges
        # (before the first whole bucket, after the last one or the rollup's mark) from samples.
        bucket_s = ROLLUP_SECONDS[rollup]
        lo = _floor_to(start, bucket_s)
        if lo < start:
            lo += timedelta(seconds=bucket_s)
        hi = _floor_to(min(end, mark), bucket_s)
        if lo < hi:
            parts.append(f"""SELECT time_bucket(to_microseconds({step_us}), ts) AS t, device, metric,
                             sum(value_sum) AS s, sum(n_values) AS n
                             FROM {rollup} WHERE ts >= ? AND ts < ? AND {where} GROUP BY ALL""")
            all_params += [lo, hi, *params]
            raw_ranges = [(a, b) for a, b in ((start, lo), (hi, end)) if a < b]
    for raw_start, raw_end in raw_ranges:
        parts.append(f"""SELECT time_bucket(to_microseconds({step_us}), ts) AS t, device, metric,
                         sum(value) AS s, count(value) AS n
                         FROM samples WHERE ts >= ? AND ts < ? AND {where} GROUP BY ALL""")
        all_params += [raw_start, raw_end, *params]
    sql = (f"SELECT t AS time, device, metric, sum(s) / nullif(sum(n), 0) AS value FROM ({' UNION ALL '.join(parts)}) "
           f"GROUP BY ALL ORDER BY time, device, metric LIMIT {MAX_SERIES_ROWS + 1}")
    rows = con.execute(sql, all_params).fetchall()
    result = SeriesRows({"time": t, "device": d, "metric": m, "value": v} for t, d, m, v in rows[:MAX_SERIES_ROWS])
    result.truncated = len(rows) > MAX_SERIES_ROWS
    return result


def latest(con: duckdb.DuckDBPyConnection, *, device: str | None = None, metric: str | None = None,
           kind: str | None = None, node: str | None = None, node_kind: str | None = None) -> list[dict]:
    filters, params = ["TRUE"], []
    if node or node_kind:
        where = _topology_where(None, None, node, node_kind, params)
        filters.append(f"device IN (SELECT device FROM topo_devices WHERE {' AND '.join(where)})")
    if device:
        filters.append(_in("device", _csv(device), params))
    if metric:
        filters.append(_in("metric", _csv(metric), params))
    if kind:
        kinds = _csv(kind)
        params.extend(kinds)
        params.extend(f"{k}.%" for k in kinds)
        marks = ", ".join("?" for _ in kinds)
        likes = " OR ".join("metric LIKE ?" for _ in kinds)
        filters.append(f"(device IN (SELECT device FROM topo_devices WHERE kind IN ({marks})) OR {likes})")
    rows = con.execute(f"SELECT ts, device, metric, value, quality FROM latest_values WHERE {' AND '.join(filters)} "
                       f"ORDER BY device, metric", params).fetchall()
    return [{"time": t, "device": d, "metric": m, "value": v, "quality": q} for t, d, m, v, q in rows]


def naive_utc(table: pa.Table) -> pa.Table:
    """Drop the time zone of TIMESTAMPTZ columns (values stay UTC): converting zoned
    timestamps to Python needs pytz, which podwatch does not depend on."""
    for i, f in enumerate(table.schema):
        if pa.types.is_timestamp(f.type) and f.type.tz is not None:
            table = table.set_column(i, f.name, table.column(i).cast(pa.timestamp(f.type.unit)))
    return table


def fetch_rows(cur: duckdb.DuckDBPyConnection, max_rows: int | None = None) -> tuple[list[str], list[tuple]]:
    """(columns, rows) of the executed query on `cur`, at most `max_rows` (+1 to detect truncation)."""
    columns = [d[0] for d in cur.description]
    with warnings.catch_warnings():  # "extra copy" notice of DB-API arrow output: fine for API-sized results
        warnings.simplefilter("ignore", UserWarning)
        if max_rows is None:
            table = cur.to_arrow_table()
        else:
            reader = cur.to_arrow_reader(min(max_rows + 1, 100_000))
    if max_rows is not None:
        batches, n = [], 0
        for batch in reader:
            batches.append(batch)
            n += batch.num_rows
            if n > max_rows:
                break
        table = pa.Table.from_batches(batches, schema=reader.schema).slice(0, max_rows + 1)
    table = naive_utc(table)
    data = [_pylist(table.column(i)) for i in range(table.num_columns)]
    return columns, list(zip(*data)) if data else []


def _pylist(column: pa.ChunkedArray) -> list:
    """Python values of a column; a time Python cannot hold ('infinity', a year past 9999) as text."""
    try:
        return column.to_pylist()
    except (OverflowError, ValueError):
        return [_scalar_py(v) for v in column]


def _scalar_py(scalar: pa.Scalar):
    try:
        return scalar.as_py()
    except (OverflowError, ValueError):
        if pa.types.is_timestamp(scalar.type) or pa.types.is_date(scalar.type):
            raw = scalar.cast(pa.int64() if pa.types.is_timestamp(scalar.type) or pa.types.is_date64(scalar.type)
                              else pa.int32()).as_py()
            if raw in (2**63 - 1, 2**31 - 1):
                return "infinity"
            if raw in (-(2**63 - 1), -(2**31 - 1)):
                return "-infinity"
        return scalar.cast(pa.string()).as_py()


def _records(cur: duckdb.DuckDBPyConnection) -> list[dict]:
    columns, rows = fetch_rows(cur)
    return [dict(zip(columns, row)) for row in rows]


def topology(con: duckdb.DuckDBPyConnection, part: str | None = None) -> Any:
    tables = {"racks": "topo_racks", "devices": "topo_devices", "power": "topo_power", "cdus": "topo_cdus"}
    if part is not None:
        if part not in tables:
            raise QueryError(f"unknown topology part {part!r} (one of {', '.join(tables)})")
        return _records(con.execute(f"SELECT * FROM {tables[part]} ORDER BY 1"))
    return {name: _records(con.execute(f"SELECT * FROM {table} ORDER BY 1")) for name, table in tables.items()}


def _parse_json(text: str | None, fallback: Any) -> Any:
    if text is None:
        return fallback
    try:
        return json.loads(text)
    except ValueError:
        return text


ALERT_STATES = ("pending", "firing", "resolved")


def alerts(con: duckdb.DuckDBPyConnection, state: str | None = None, alert_id: str | None = None) -> list[dict]:
    filters, params = ["TRUE"], []
    if alert_id:  # notifications link to /api/alerts?alert_id=<id>
        filters.append(_in("alert_id", _csv(alert_id), params))
    if state:
        unknown = [s for s in _csv(state) if s not in ALERT_STATES]
        if unknown:
            raise QueryError(f"parameter 'state': unknown state {unknown[0]!r} (one of {', '.join(ALERT_STATES)})")
        filters.append(_in("state", _csv(state), params))
    cur = con.execute(f"SELECT started_at AS time, * FROM alerts WHERE {' AND '.join(filters)} ORDER BY updated_at DESC", params)
    rows = _records(cur)
    for row in rows:
        row["labels"] = _parse_json(row["labels"], {})
        row["annotations"] = _parse_json(row["annotations"], {})
    return rows


def risk(con: duckdb.DuckDBPyConnection, rack: str | None = None, start: datetime | None = None,
         end: datetime | None = None) -> list[dict]:
    if start is not None and end is not None and end <= start:
        raise QueryError("parameter 'to' must be after 'from'")
    filters, params = ["TRUE"], []
    if rack:
        filters.append(_in("rack", _csv(rack), params))
    where = " AND ".join(filters)
    if start is None and end is None:
        sql = (f"SELECT ts AS time, rack, probability, level, reasons, horizon_s, model_version FROM risk_scores "
               f"WHERE {where} QUALIFY row_number() OVER (PARTITION BY rack ORDER BY ts DESC, horizon_s) = 1 ORDER BY rack")
    else:
        if start is not None:
            filters.append("ts >= ?")
            params.append(start)
        if end is not None:
            filters.append("ts < ?")
            params.append(end)
        sql = (f"SELECT ts AS time, rack, probability, level, reasons, horizon_s, model_version FROM risk_scores "
               f"WHERE {' AND '.join(filters)} ORDER BY time, rack")
    rows = _records(con.execute(sql, params))
    for row in rows:
        row["reasons"] = _parse_json(row["reasons"], [])
    return rows


def headroom(con: duckdb.DuckDBPyConnection) -> list[dict]:
    return _records(con.execute(
        "SELECT f.generated_at AS time, f.*, coalesce(p.module, c.module) AS module FROM forecasts f "
        "LEFT JOIN topo_power p ON p.node = f.node LEFT JOIN topo_cdus c ON c.cdu = f.node "
        "QUALIFY row_number() OVER (PARTITION BY f.node, f.horizon ORDER BY f.generated_at DESC) = 1 "
        "ORDER BY f.node, f.horizon"))


def forecasts(con: duckdb.DuckDBPyConnection, node: str | None = None, horizon: str | None = None) -> list[dict]:
    filters, params = ["TRUE"], []
    if node:
        filters.append(_in("node", _csv(node), params))
    if horizon:
        filters.append(_in("horizon", _csv(horizon), params))
    return _records(con.execute(
        f"SELECT generated_at AS time, * FROM forecasts WHERE {' AND '.join(filters)} ORDER BY generated_at, node, horizon", params))


RACK_POWER_STALE_S = 300  # a rack's PDUs older than this (against its BMS figure) no longer count


def _rack_power_devices(con: duckdb.DuckDBPyConnection, rack: str | None,
                        module: str | None) -> tuple[dict[str, str | None], dict[str, tuple[str, str]], dict[str, str]]:
    """(rack -> module, PDU device -> (rack, side), BMS rack device -> rack) for the racks in scope."""
    filters, params = ["TRUE"], []
    if rack:
        filters.append(_in("rack", _csv(rack), params))
    if module:
        filters.append(_in("module", _csv(module), params))
    racks = dict(con.execute(f"SELECT rack, module FROM topo_racks WHERE {' AND '.join(filters)}", params).fetchall())
    if not racks:
        return {}, {}, {}
    params = list(racks)
    marks = ", ".join("?" for _ in racks)
    pdus, bms = {}, {}
    for device, kind, rack_id, side in con.execute(
            f"SELECT device, kind, rack, lower(coalesce(side, '')) FROM topo_devices WHERE rack IN ({marks})", params).fetchall():
        if kind == "pdu":
            pdus[device] = (rack_id, side)
        else:
            bms[device] = rack_id
    return racks, pdus, bms


def _rack_power_of(pdu_values: dict[str, float], pdu_sides: dict[str, set[str]], rack: str,
                   bms_value: float | None) -> tuple[float | None, str | None]:
    """One rack's power from its PDUs' values {side: kW} - a two-fed rack with one side silent
    counts twice that side (normal sharing is even, as capacity analytics assumes) - else its
    BMS figure. Returns (kW, source)."""
    if pdu_values:
        sides = pdu_sides.get(rack, set())
        if len(sides) >= 2 and len(pdu_values) == 1:
            return 2 * next(iter(pdu_values.values())), "pdu_one_side"
        return sum(pdu_values.values()), "pdu"
    if bms_value is not None:
        return bms_value, "bms"
    return None, None


def rack_power(con: duckdb.DuckDBPyConnection, *, rack: str | None = None, module: str | None = None,
               start: datetime, end: datetime, step_s: float | None = None) -> list[dict]:
    """Power of each rack per step: its A + B PDUs (`pdu.power_kw`) where they read, else the
    rack's own BMS figure (`rack.power_kw`) - so IT power exists on sites whose racks report only
    through a BMS, and is not counted twice where both report. Rows: time, rack, module, power_kw,
    source (pdu | pdu_one_side | bms)."""
    if step_s == 0:
        raise QueryError("parameter 'step': rack power is a per-step figure; give a step (e.g. 10s, 1m)")
    racks, pdus, bms = _rack_power_devices(con, rack, module)
    if not pdus and not bms:
        return []
    rows = series(con, device=",".join([*pdus, *bms]), metric="pdu.power_kw,rack.power_kw", start=start, end=end,
                  step_s=step_s)
    pdu_sides: dict[str, set[str]] = {}
    for rack_id, side in pdus.values():
        pdu_sides.setdefault(rack_id, set()).add(side)
    by_bucket: dict[tuple, tuple[dict[str, float], list]] = {}
    for row in rows:
        if row["value"] is None:
            continue
        if row["metric"] == "pdu.power_kw" and row["device"] in pdus:
            rack_id, side = pdus[row["device"]]
            side_values, _ = by_bucket.setdefault((row["time"], rack_id), ({}, []))
            side_values[side] = side_values.get(side, 0.0) + row["value"]
        elif row["metric"] == "rack.power_kw" and row["device"] in bms:
            by_bucket.setdefault((row["time"], bms[row["device"]]), ({}, []))[1].append(row["value"])
    result = SeriesRows()
    result.truncated = getattr(rows, "truncated", False)
    for (time, rack_id), (side_values, bms_values) in sorted(by_bucket.items()):
        power, source = _rack_power_of(side_values, pdu_sides, rack_id, sum(bms_values) if bms_values else None)
        if power is not None:
            result.append({"time": time, "rack": rack_id, "module": racks.get(rack_id), "power_kw": power,
                           "source": source})
    return result


def rack_power_latest(con: duckdb.DuckDBPyConnection, *, rack: str | None = None,
                      module: str | None = None) -> list[dict]:
    """The newest power of each rack, by the rule of `rack_power`; PDU values more than
    RACK_POWER_STALE_S older than the rack's BMS figure give way to it. Rows: time, rack,
    module, power_kw, source."""
    racks, pdus, bms = _rack_power_devices(con, rack, module)
    if not pdus and not bms:
        return []
    newest = latest(con, device=",".join([*pdus, *bms]), metric="pdu.power_kw,rack.power_kw")
    pdu_sides: dict[str, set[str]] = {}
    for rack_id, side in pdus.values():
        pdu_sides.setdefault(rack_id, set()).add(side)
    per_rack: dict[str, dict] = {}
    for row in newest:
        if row["value"] is None:
            continue
        if row["metric"] == "pdu.power_kw" and row["device"] in pdus:
            rack_id, side = pdus[row["device"]]
            entry = per_rack.setdefault(rack_id, {"pdu": {}, "bms": None})
            entry["pdu"][side] = (row["time"], entry["pdu"].get(side, (row["time"], 0.0))[1] + row["value"])
        elif row["metric"] == "rack.power_kw" and row["device"] in bms:
            per_rack.setdefault(bms[row["device"]], {"pdu": {}, "bms": None})["bms"] = (row["time"], row["value"])
    result = []
    for rack_id in sorted(per_rack):
        entry = per_rack[rack_id]
        bms_time, bms_value = entry["bms"] if entry["bms"] else (None, None)
        fresh = {side: (t, v) for side, (t, v) in entry["pdu"].items()
                 if bms_time is None or (bms_time - t).total_seconds() <= RACK_POWER_STALE_S}
        power, source = _rack_power_of({side: v for side, (_, v) in fresh.items()}, pdu_sides, rack_id, bms_value)
        if power is None:
            continue
        time = max(t for t, _ in fresh.values()) if source != "bms" else bms_time
        result.append({"time": time, "rack": rack_id, "module": racks.get(rack_id), "power_kw": power, "source": source})
    return result
