"""`Service`: ingest + API in one process, and the extension points other stages use."""

from __future__ import annotations

import uuid

import httpx
import polars as pl
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from podwatch.storage.service import Service, ServiceSettings
from tests.conftest import wait_until
from tests.integration.storage.helpers import create_topics, envelope_bytes, produce, reading

pytestmark = pytest.mark.integration


@pytest.mark.timeout(60)
async def test_service_ingests_serves_and_runs_extensions(tansu_broker, tmp_path):
    topic, dl_topic = f"t.svc.{uuid.uuid4().hex[:8]}", f"t.svc.dl.{uuid.uuid4().hex[:8]}"
    await create_topics(tansu_broker, (topic, 2), (dl_topic, 1))
    service = Service(ServiceSettings(db=str(tmp_path / "svc.duckdb"), kafka=tansu_broker, port=0, token="t",
                                      group_id=None, topic=topic, dead_letter_topic=dl_topic))
    seen: list[int] = []
    periodic_runs: list[int] = []

    async def on_batch(rows: pl.DataFrame) -> None:  # an async listener, like the streaming checks
        seen.append(rows.height)

    async def count_samples(svc: Service) -> None:
        periodic_runs.append(await svc.db.run(lambda cur: cur.execute("SELECT count(*) FROM samples").fetchone()[0]))

    async def capacity(request: Request) -> JSONResponse:
        return JSONResponse({"extra": True})

    service.add_batch_listener(on_batch)
    service.add_periodic(count_samples, every_s=0.2)
    service.add_route("/api/extra", capacity)
    stop_hook_saw: list[int] = []

    async def last_write(svc: Service) -> None:  # runs after the sink stopped, before the file closes
        stop_hook_saw.append(await svc.db.run(lambda cur: cur.execute("SELECT count(*) FROM samples").fetchone()[0]))

    service.add_on_stop(last_write)
    await service.start()
    try:
        messages = [(f"pdu-{d:03d}".encode(), envelope_bytes(reading(d, seq))) for seq in range(50) for d in range(4)]
        await produce(tansu_broker, topic, messages + [(b"x", b"not json")])
        await wait_until(lambda: sum(seen) == 1000, timeout=20, what="listener saw every row")
        await wait_until(lambda: periodic_runs and periodic_runs[-1] == 1000, timeout=10, what="periodic task")
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
            assert (await client.get("/api/extra")).json() == {"extra": True}
            await wait_until(lambda: service.sink.stats.dead_letters == 1 and len(service.sink.stats.lag) == 2,
                             timeout=10, what="dead letter and lag")
            pipeline = (await client.get("/api/pipeline")).json()[0]
            assert pipeline["running"] is True and pipeline["points_total"] == 1000
            assert pipeline["dead_letters"] == 1 and pipeline["lag_messages"] == 0
            assert set(pipeline["lag_by_partition"]) == {"0", "1"}
            metrics = (await client.get("/metrics")).text
            assert 'podwatch_ingest_lag_messages{partition="0"} 0.0' in metrics
            assert "podwatch_ingest_points_total 1000.0" in metrics
            assert "podwatch_ingest_dead_letters_total 1.0" in metrics
            assert "podwatch_ingest_batch_latency_seconds_bucket" in metrics
            assert 'podwatch_component_received_total{component="duckdb_sink"' in metrics
            async def latest_rows():  # latest_values is flushed about every second
                return (await client.get("/api/latest", params={"device": "pdu-002"})).json()

            latest = await wait_until(latest_rows, timeout=10, what="latest values flushed")
            assert len(latest) == 5 and {r["value"] for r in latest} == {2049.0 + k / 10 for k in range(5)}
            assert (await client.get("/healthz")).json()["ok"] is True
    finally:
        await service.stop()
        await service.stop()  # idempotent
    assert service.sink.running is False
    assert stop_hook_saw == [1000]


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_healthz_fails_while_kafka_is_silent_and_recovers(tmp_path):
    """A caught-up sink whose broker stops answering (SIGSTOP: sockets open, nothing answers) kept its
    last lag of 0 and a green /healthz; it now says Kafka has not answered, and recovers with it."""
    from podwatch import procs

    with procs.tansu() as broker:
        topic, dl_topic = f"t.silent.{uuid.uuid4().hex[:8]}", f"t.silent.dl.{uuid.uuid4().hex[:8]}"
        await create_topics(broker.address, (topic, 1), (dl_topic, 1))
        service = Service(ServiceSettings(db=str(tmp_path / "silent.duckdb"), kafka=broker.address, port=0, token="t",
                                          group_id=None, topic=topic, dead_letter_topic=dl_topic))
        await service.start()
        service.sink.settings.stuck_after_s = 3.0
        try:
            await produce(broker.address, topic, [(b"pdu-000", envelope_bytes(reading(0, seq))) for seq in range(20)])
            async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
                async def health() -> dict:
                    return (await client.get("/healthz")).json()

                async def failing() -> dict | None:
                    body = await health()
                    return None if body["ok"] else body

                async def healthy() -> bool:
                    return (await health())["ok"]

                await wait_until(lambda: service.sink.stats.points == 100, 20, what="the readings ingested")
                await wait_until(lambda: service.sink.stats.kafka_answered_ms is not None, 10, what="a fetch answer")
                assert await healthy()
                broker.pause()
                try:
                    silent = await wait_until(failing, 30, what="/healthz to fail while Kafka is silent")
                    assert any("no answer from Kafka" in p for p in silent["problems"]), silent
                    assert service.sink.stats.total_lag == 0  # the lag alone looked healthy
                finally:
                    broker.resume()
                await wait_until(healthy, 30, what="/healthz green again once Kafka answers")
        finally:
            await service.stop()
