"""The HTTP API of `podwatch serve` (Starlette on uvicorn); reference with examples: docs/api.md.

Every data endpoint answers a JSON array of flat rows with a `time` column (ISO 8601, UTC,
`Z`), which Grafana's Infinity datasource reads without transformations; `?format=csv` gives
the same rows as CSV. Time parameters `from`/`to` take epoch ms (Grafana's ${__from}), ISO
8601 or `now-6h`. Queries run on their own DuckDB cursor in a worker thread.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Callable

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.schemas import SchemaGenerator

from podwatch.health import PrometheusHealthCollector
from podwatch.storage import queries
from podwatch.storage.sink import LATENCY_BUCKETS_S
from podwatch.storage.sqlguard import SqlRejected, SqlTimeout, run_guarded

log = logging.getLogger(__name__)

SCHEMAS = SchemaGenerator({"openapi": "3.0.0", "info": {"title": "podwatch API", "version": "1"}})


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return float(obj)
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    if isinstance(obj, date):
        return obj.isoformat()
    return str(obj)


def _dumps(data: Any) -> bytes:
    return orjson.dumps(data, default=_default, option=orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_SERIALIZE_NUMPY)


def _cell(value: Any) -> Any:
    if isinstance(value, datetime):
        return orjson.loads(_dumps(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=_default)
    return value


def rows_response(request: Request, rows: list[dict], headers: dict | None = None) -> Response:
    fmt = request.query_params.get("format", "json")
    if fmt not in ("json", "csv"):
        return _error(400, f"parameter 'format' must be json or csv, got {fmt!r}")
    if fmt == "csv":
        out = io.StringIO()
        columns = list(rows[0]) if rows else []
        writer = csv.writer(out)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
        return Response(out.getvalue(), media_type="text/csv", headers=headers)
    return Response(_dumps(rows), media_type="application/json", headers=headers)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class _SinkCollector:
    """Prometheus view of the sink: ingest rate, lag per partition, batch latency, dead letters."""

    def __init__(self, service) -> None:
        self._service = service

    def collect(self):
        service = self._service
        db = service.db
        size = GaugeMetricFamily("podwatch_duckdb_file_bytes", "DuckDB file size (with WAL)")
        size.add_metric([], db.file_size_bytes() if db else 0)
        yield size
        sink = service.sink
        if sink is None:
            return
        st = sink.stats
        points_rate, messages_rate = st.rates()
        for name, doc, value in (
            ("podwatch_ingest_points", "Sample points written to DuckDB", st.points),
            ("podwatch_ingest_messages", "Kafka messages consumed", st.messages),
            ("podwatch_ingest_dead_letters", "Messages sent to the dead-letter topic", st.dead_letters),
            ("podwatch_ingest_duplicates", "Readings dropped as duplicates (device, seq)", st.duplicates + st.too_old),
            ("podwatch_ingest_topic_resets", "Stored offsets found beyond the partition end", st.topic_resets),
        ):
            fam = CounterMetricFamily(name, doc)
            fam.add_metric([], value)
            yield fam
        for name, doc, value in (("podwatch_ingest_points_per_second", "Ingest rate, points/s (10 s window)", points_rate),
                                 ("podwatch_ingest_messages_per_second", "Ingest rate, messages/s", messages_rate)):
            fam = GaugeMetricFamily(name, doc)
            fam.add_metric([], value)
            yield fam
        lag = GaugeMetricFamily("podwatch_ingest_lag_messages", "Consumer lag from the high watermark", labels=["partition"])
        for partition, value in sorted(st.lag.items()):
            lag.add_metric([str(partition)], value)
        yield lag
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, LATENCY_BUCKETS_S), "+Inf"], st.latency_bucket_counts):
            cumulative += count
            buckets.append((bound, cumulative))
        hist = HistogramMetricFamily("podwatch_ingest_batch_latency_seconds", "Fetch-to-commit latency of a batch")
        hist.add_metric([], buckets, st.latency_sum_s)
        yield hist


def create_app(service, extra_routes: list[Route] | None = None) -> Starlette:
    """The Starlette app of `service` (a podwatch.storage.service.Service)."""
    settings = service.settings
    registry = CollectorRegistry()
    registry.register(_SinkCollector(service))
    registry.register(PrometheusHealthCollector())

    async def run(fn: Callable):
        return await service.db.run(fn)

    def time_range(request: Request, default_from: str = "now-1h"):
        now = queries.utcnow()
        start = queries.parse_time(request.query_params.get("from"), "from", now=now) or queries.parse_time(default_from, "from", now=now)
        end = queries.parse_time(request.query_params.get("to"), "to", default=now, now=now)
        return start, end

    async def guarded(request: Request, fn: Callable) -> Response:
        try:
            return await fn()
        except queries.QueryError as exc:
            return _error(400, str(exc))

    async def series(request: Request) -> Response:
        """
        summary: Time series of device/metric/rack/module, aggregated per step
        description: Picks raw samples or the rollup that fits the step; closed rollup buckets plus the raw tail.
        parameters:
          - {name: device, in: query, schema: {type: string}, description: "device id(s), comma-separated"}
          - {name: metric, in: query, schema: {type: string}, description: "metric name(s), e.g. pdu.power_kw"}
          - {name: rack, in: query, schema: {type: string}}
          - {name: module, in: query, schema: {type: string}}
          - {name: cdu, in: query, schema: {type: string}, description: "CDU id(s): the CDUs' own devices"}
          - {name: side, in: query, schema: {type: string}, description: "a | b: PDUs and metered feeds of that side"}
          - {name: node, in: query, schema: {type: string}, description: "power node id(s): the meters on those nodes"}
          - {name: node_kind, in: query, schema: {type: string}, description: "transformer | feeder | busway: the meters on nodes of that kind"}
          - {name: from, in: query, schema: {type: string}, description: "epoch ms, ISO 8601 or now-6h (default now-1h)"}
          - {name: to, in: query, schema: {type: string}, description: "default now"}
          - {name: step, in: query, schema: {type: string}, description: "10s, 1m, 1h, raw; default: about 2000 points"}
          - {name: format, in: query, schema: {type: string, enum: [json, csv]}}
        responses:
          200: {description: "[{time, device, metric, value}]"}
          400: {description: "bad parameter"}
        """
        async def go():
            q = request.query_params
            start, end = time_range(request)
            step_s = queries.parse_step_s(q.get("step"))
            rows = await run(lambda cur: queries.series(cur, device=q.get("device"), metric=q.get("metric"), rack=q.get("rack"),
                                                         module=q.get("module"), node=q.get("node"), node_kind=q.get("node_kind"),
                                                         cdu=q.get("cdu"), side=q.get("side"),
                                                         start=start, end=end, step_s=step_s))
            truncated = getattr(rows, "truncated", False)
            return rows_response(request, rows, {"X-Podwatch-Truncated": "true" if truncated else "false"})
        return await guarded(request, go)

    async def latest(request: Request) -> Response:
        """
        summary: Newest value of every series
        parameters:
          - {name: device, in: query, schema: {type: string}}
          - {name: metric, in: query, schema: {type: string}}
          - {name: kind, in: query, schema: {type: string}, description: "pdu | meter | cdu | rack"}
          - {name: node, in: query, schema: {type: string}, description: "power node id(s): the meters on those nodes"}
          - {name: node_kind, in: query, schema: {type: string}, description: "transformer | feeder | busway: the meters on nodes of that kind"}
        responses:
          200: {description: "[{time, device, metric, value, quality}]"}
        """
        q = request.query_params
        rows = await run(lambda cur: queries.latest(cur, device=q.get("device"), metric=q.get("metric"), kind=q.get("kind"),
                                                    node=q.get("node"), node_kind=q.get("node_kind")))
        return rows_response(request, rows)

    async def rack_power(request: Request) -> Response:
        """
        summary: Power of each rack per step (IT power), from its PDUs or else its BMS
        description: "A rack's A + B PDUs (pdu.power_kw) where they read - a two-fed rack with one silent side counts that side twice - else the rack's own BMS figure (rack.power_kw): IT power on sites whose racks report only through a BMS, never counted twice where both report. latest=true: the newest value per rack."
        parameters:
          - {name: rack, in: query, schema: {type: string}, description: "rack id(s), comma-separated"}
          - {name: module, in: query, schema: {type: string}}
          - {name: from, in: query, schema: {type: string}, description: "epoch ms, ISO 8601 or now-6h (default now-1h)"}
          - {name: to, in: query, schema: {type: string}, description: "default now"}
          - {name: step, in: query, schema: {type: string}, description: "10s, 1m, 1h; default: about 2000 points"}
          - {name: latest, in: query, schema: {type: boolean}, description: "newest value per rack instead of a range"}
          - {name: format, in: query, schema: {type: string, enum: [json, csv]}}
        responses:
          200: {description: "[{time, rack, module, power_kw, source}] (source: pdu | pdu_one_side | bms)"}
          400: {description: "bad parameter"}
        """
        async def go():
            q = request.query_params
            if q.get("latest", "").lower() in ("1", "true", "yes"):
                rows = await run(lambda cur: queries.rack_power_latest(cur, rack=q.get("rack"), module=q.get("module")))
                return rows_response(request, rows)
            start, end = time_range(request)
            step_s = queries.parse_step_s(q.get("step"))
            rows = await run(lambda cur: queries.rack_power(cur, rack=q.get("rack"), module=q.get("module"),
                                                             start=start, end=end, step_s=step_s))
            truncated = getattr(rows, "truncated", False)
            return rows_response(request, rows, {"X-Podwatch-Truncated": "true" if truncated else "false"})
        return await guarded(request, go)

    async def topology(request: Request) -> Response:
        """
        summary: Site topology (racks, devices, power nodes, CDUs), or one part of it
        responses:
          200: {description: "{racks: [...], devices: [...], power: [...], cdus: [...]} or rows of one part"}
        """
        part = request.path_params.get("part")

        async def go():
            data = await run(lambda cur: queries.topology(cur, part))
            return rows_response(request, data) if part else Response(_dumps(data), media_type="application/json")
        return await guarded(request, go)

    async def alerts(request: Request) -> Response:
        """
        summary: Rows of the alerts table, labels and annotations parsed
        parameters:
          - {name: state, in: query, schema: {type: string}, description: "pending | firing | resolved (comma-separated)"}
          - {name: alert_id, in: query, schema: {type: string}, description: "alert id(s), comma-separated (the link in notifications)"}
        responses:
          200: {description: "[{time, alert_id, rule, target, severity, state, labels, annotations, ...}]"}
        """
        async def go():
            q = request.query_params
            rows = await run(lambda cur: queries.alerts(cur, q.get("state"), q.get("alert_id")))
            return rows_response(request, rows)
        return await guarded(request, go)

    async def risk(request: Request) -> Response:
        """
        summary: Thermal-risk scores; latest per rack without a range
        parameters:
          - {name: rack, in: query, schema: {type: string}}
          - {name: from, in: query, schema: {type: string}}
          - {name: to, in: query, schema: {type: string}}
        responses:
          200: {description: "[{time, rack, probability, level, reasons, horizon_s, model_version}]"}
        """
        async def go():
            q = request.query_params
            start = queries.parse_time(q.get("from"), "from")
            end = queries.parse_time(q.get("to"), "to")
            rows = await run(lambda cur: queries.risk(cur, q.get("rack"), start, end))
            return rows_response(request, rows)
        return await guarded(request, go)

    async def headroom(request: Request) -> Response:
        """
        summary: Latest forecast row per power node and horizon (usable, p99, headroom, stranded kW)
        responses:
          200: {description: "[{time, node, node_kind, horizon, usable_kw, p99_kw, headroom_kw, stranded_kw, ...}]"}
        """
        return rows_response(request, await run(queries.headroom))

    async def forecasts(request: Request) -> Response:
        """
        summary: Forecast history
        parameters:
          - {name: node, in: query, schema: {type: string}}
          - {name: horizon, in: query, schema: {type: string}, description: "24h | 7d"}
        responses:
          200: {description: "[{time, node, horizon, p50_kw, p95_kw, p99_kw, ...}]"}
        """
        q = request.query_params
        return rows_response(request, await run(lambda cur: queries.forecasts(cur, q.get("node"), q.get("horizon"))))

    async def pipeline(request: Request) -> Response:
        """
        summary: The ingest pipeline's own figures (one row)
        responses:
          200: {description: "[{time, running, points_per_s, messages_per_s, lag_messages, lag_by_partition, dead_letters, duplicates, batch_latency_s, db_bytes}]"}
        """
        sink = service.sink
        row: dict[str, Any] = {"time": queries.utcnow(), "running": bool(sink and sink.running),
                               "db_bytes": service.db.file_size_bytes()}
        if sink is not None:
            st = sink.stats
            points_rate, messages_rate = st.rates()
            row.update(points_per_s=points_rate, messages_per_s=messages_rate, lag_messages=st.total_lag,
                       lag_by_partition={str(p): v for p, v in sorted(st.lag.items())}, points_total=st.points,
                       messages_total=st.messages, dead_letters=st.dead_letters, duplicates=st.duplicates + st.too_old,
                       batches=st.batches, batch_latency_s=st.last_batch_latency_s,
                       batch_latency_avg_s=st.latency_sum_s / st.batches if st.batches else 0.0,
                       topic_resets=st.topic_resets, listener_errors=st.listener_errors)
        return rows_response(request, [row])

    async def sql(request: Request) -> Response:
        """
        summary: Guarded read-only SQL (one SELECT/WITH statement; bearer token)
        description: Anything else (INSERT, COPY, ATTACH, PRAGMA, SET, read_csv(), files, several statements) is rejected and never executed.
        requestBody:
          content:
            application/json:
              schema: {type: object, properties: {sql: {type: string}}}
        parameters:
          - {name: q, in: query, schema: {type: string}, description: "the query, for GET"}
        responses:
          200: {description: "[{column: value, ...}] (header X-Podwatch-Truncated: true when the row cap was hit)"}
          400: {description: "not exactly one statement, or unparsable"}
          401: {description: "missing or wrong bearer token"}
          403: {description: "not a read-only query over this database"}
          408: {description: "cancelled at the time limit"}
        """
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not _same(auth[7:].strip(), service.token):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        if request.method == "POST":
            try:
                body = await request.json()
                text = body["sql"]
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                return _error(400, 'body must be JSON {"sql": "SELECT ..."}')
        else:
            text = request.query_params.get("q", "")
        try:
            result = await run(lambda cur: run_guarded(cur, text, settings.sql_timeout_s, settings.sql_max_rows))
        except SqlRejected as exc:
            return _error(exc.status, str(exc))
        except SqlTimeout as exc:
            return _error(408, str(exc))
        headers = {"X-Podwatch-Truncated": "true" if result.truncated else "false",
                   "X-Podwatch-Columns": ",".join(result.columns)}
        return rows_response(request, result.records(), headers)

    async def metrics(request: Request) -> Response:
        """
        summary: Prometheus metrics of the pipeline (text format)
        responses:
          200: {description: "Prometheus text exposition"}
        """
        body = generate_latest(registry)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def healthz(request: Request) -> Response:
        """
        summary: Health; 503 when ingest is stuck or lag grows without bound
        responses:
          200: {description: '{"ok": true}'}
          503: {description: '{"ok": false, "problems": [...]}'}
        """
        problems = service.sink.health_problems() if service.sink is not None else []
        if not service.started:
            problems.insert(0, "service is starting")
        return JSONResponse({"ok": not problems, "problems": problems}, status_code=503 if problems else 200)

    async def openapi(request: Request) -> Response:
        return JSONResponse(SCHEMAS.get_schema(routes=request.app.routes))

    routes = [
        Route("/api/series", series),
        Route("/api/latest", latest),
        Route("/api/rack_power", rack_power),
        Route("/api/topology", topology),
        Route("/api/topology/{part}", topology),
        Route("/api/alerts", alerts),
        Route("/api/risk", risk),
        Route("/api/headroom", headroom),
        Route("/api/forecasts", forecasts),
        Route("/api/pipeline", pipeline),
        Route("/api/sql", sql, methods=["GET", "POST"]),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
        Route("/openapi.json", openapi, include_in_schema=False),
        *(extra_routes or []),
    ]
    return Starlette(routes=routes)


def _same(given: str, expected: str) -> bool:
    import hmac

    return hmac.compare_digest(given.encode(), expected.encode())

