"""`podwatch serve`: the one process that owns the DuckDB file — ingest plus HTTP API.

`Service` composes the Database, the DuckDB sink and the Starlette app on uvicorn, and is the
extension point of the later stages:

    service = Service(ServiceSettings(db="site.duckdb", kafka="127.0.0.1:9092", token="..."))
    service.add_batch_listener(checks.on_batch)         # fn(rows: pl.DataFrame), sync or async
    service.add_periodic(forecaster.run_once, every_s=300)   # coro_fn(service)
    service.add_route("/api/capacity", capacity_endpoint)    # Starlette endpoint(request)
    service.add_on_stop(outbox.flush)                        # coro_fn(service), before the file closes
    async with service:            # start(): open file, sink, API; stop(): idempotent
        await service.wait()       # until stop() or a signal
    # DuckDB: `await service.db.run(lambda cur: cur.execute(...).fetchall())` (a cursor per call,
    # in a worker thread) — the only way anything in the process should touch the file.

Routes and listeners must be added before `start()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any, Awaitable, Callable

import uvicorn
from pydantic import BaseModel, ConfigDict, Field
from starlette.routing import Route

from podwatch.logs import fields
from podwatch.storage.db import Database, remove_owner, write_owner
from podwatch.storage.rollups import StorageSettings
from podwatch.storage.sink import DEADLETTER_TOPIC, TELEMETRY_TOPIC, BatchListener, DuckDBSink, SinkSettings

log = logging.getLogger(__name__)

PeriodicFn = Callable[["Service"], Awaitable[Any]]


class ServiceSettings(BaseModel):
    """Settings of `podwatch serve`."""

    model_config = ConfigDict(extra="forbid")

    db: str = Field(description="DuckDB file (created if missing)")
    kafka: str | None = Field(None, description="Kafka bootstrap servers; None: API only, no ingest")
    site: str | None = Field(None, description="Site file; loads the topology tables")
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535, description="0: pick a free port")
    token: str | None = Field(None, description="Bearer token of /api/sql; None: a random one, written to <db>.serve.json")
    sql_timeout_s: float = Field(10.0, gt=0)
    sql_max_rows: int = Field(10_000, gt=0)
    group_id: str | None = Field("podwatch-sink", description="Consumer group; None: assign every partition directly")
    topic: str = TELEMETRY_TOPIC
    dead_letter_topic: str = DEADLETTER_TOPIC
    storage: StorageSettings = Field(default_factory=StorageSettings)
    decode_process: bool = Field(True, description="Consume and decode in a second process (see SinkSettings)")


class Service:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.token = settings.token or secrets.token_urlsafe(24)
        self.db: Database | None = None
        self.sink: DuckDBSink | None = None
        self._listeners: list[BatchListener] = []
        self._periodic: list[tuple[PeriodicFn, float]] = []
        self._on_stop: list[PeriodicFn] = []
        self._extra_routes: list[Route] = []
        self._tasks: list[asyncio.Task] = []
        self._server: uvicorn.Server | None = None
        self._stopped = asyncio.Event()
        self._started = False
        self._stopping = False
        self._stop_done = asyncio.Event()
        self.port: int | None = None

    # ------------------------------------------------------------------ extension points
    def add_batch_listener(self, fn: BatchListener) -> None:
        """fn(rows: polars.DataFrame[ts, device, metric, value, quality]) after each committed batch."""
        self._listeners.append(fn)
        if self.sink is not None:
            self.sink.add_batch_listener(fn)

    def add_periodic(self, coro_fn: PeriodicFn, every_s: float) -> None:
        """Run `await coro_fn(service)` every `every_s` seconds; failures are logged, not fatal."""
        self._periodic.append((coro_fn, every_s))
        if self._started:
            self._tasks.append(asyncio.create_task(self._every(coro_fn, every_s)))

    def add_on_stop(self, coro_fn: PeriodicFn) -> None:
        """`await coro_fn(service)` during stop(), after the API, the sink and the periodic tasks
        stopped and before the DuckDB file is closed (last writes, outbox flushes)."""
        self._on_stop.append(coro_fn)

    def add_route(self, path: str, endpoint: Callable, methods: list[str] | None = None, name: str | None = None) -> None:
        """A Starlette route on the API (before `start()`)."""
        self._extra_routes.append(Route(path, endpoint, methods=methods or ["GET"], name=name))

    @property
    def started(self) -> bool:
        """True once start() finished (API up, owner file written, periodic tasks running)."""
        return self._started and not self._stopping

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> "Service":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        from podwatch.procs import free_port
        from podwatch.storage.api import create_app

        s = self.settings
        self.db = Database(s.db)
        if s.site:
            from podwatch.storage.topology import load_topology_file

            load_topology_file(self.db.connection, s.site)
        if s.kafka:
            self.sink = DuckDBSink(self.db, SinkSettings(kafka=s.kafka, group_id=s.group_id, topic=s.topic,
                                                        dead_letter_topic=s.dead_letter_topic, storage=s.storage,
                                                        decode_process=s.decode_process))
            for fn in self._listeners:
                self.sink.add_batch_listener(fn)
            try:
                await self.sink.start()
            except BaseException:
                await self.sink.stop()
                self.db.close()
                raise
            self._tasks.append(asyncio.create_task(self._run_sink()))
        self.port = s.port or free_port(s.host)
        app = create_app(self, self._extra_routes)
        config = uvicorn.Config(app, host=s.host, port=self.port, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # the CLI owns signals
        self._tasks.append(asyncio.create_task(self._server.serve()))
        while not self._server.started:
            if self._tasks[-1].done():
                self._tasks[-1].result()
                raise RuntimeError("HTTP server stopped at start")
            await asyncio.sleep(0.02)
        for coro_fn, every_s in self._periodic:
            self._tasks.append(asyncio.create_task(self._every(coro_fn, every_s)))
        write_owner(s.db, self.url, self.token)
        self._started = True
        log.info("podwatch service started", extra=fields(db=s.db, api=self.url, kafka=s.kafka))

    async def _run_sink(self) -> None:
        try:
            await self.sink.run()
        except Exception:
            log.exception("the DuckDB sink failed; /healthz reports it; restart the service to recover")

    async def _every(self, coro_fn: PeriodicFn, every_s: float) -> None:
        name = getattr(coro_fn, "__name__", repr(coro_fn))
        while not self._stopped.is_set():
            try:
                await coro_fn(self)
            except Exception:
                log.exception("periodic task failed", extra=fields(task=name))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), every_s)

    async def wait(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        """Stop the API, the sink and periodic tasks; close the file (idempotent)."""
        if self._stopping:  # a second caller waits for the first to finish
            await self._stop_done.wait()
            return
        self._stopping = True
        self._stopped.set()
        try:
            if self._server is not None:
                self._server.should_exit = True
            if self.sink is not None:
                await self.sink.stop()
            for task in self._tasks:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 10)
            for coro_fn in self._on_stop:
                try:
                    await coro_fn(self)
                except Exception:
                    log.exception("stop hook failed", extra=fields(hook=getattr(coro_fn, "__name__", repr(coro_fn))))
            if self.db is not None:
                remove_owner(self.settings.db)
                self.db.close()
        finally:
            self._stop_done.set()
        log.info("podwatch service stopped")
