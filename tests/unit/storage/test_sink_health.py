"""/healthz logic of the sink: stuck ingest and unbounded lag growth."""

from __future__ import annotations

import time

from podwatch.storage.db import Database
from podwatch.storage.sink import DuckDBSink, SinkSettings, SinkStats


def test_stuck_and_growing_lag_are_reported(tmp_path):
    db = Database(tmp_path / "h.duckdb")
    try:
        sink = DuckDBSink(db, SinkSettings(kafka="127.0.0.1:1", stuck_after_s=30, lag_limit_messages=1000))
        assert sink.health_problems() == ["sink is not running"]
        sink._running = True
        assert sink.health_problems() == []
        sink.stats.lag = {0: 5000}
        sink.stats.last_commit_monotonic = time.monotonic() - 60
        problems = sink.health_problems()
        assert any("ingest stuck: lag 5000" in p for p in problems)
        sink.stats.last_commit_monotonic = time.monotonic()
        now = time.monotonic()
        for i, lag in enumerate([2000, 3000, 4000, 4500, 5000]):
            sink.stats._lag_window.append((now - 50 + i * 10, lag))
        assert any("keeps growing" in p for p in sink.health_problems())
    finally:
        db.close()


def test_rates_and_latency_histogram():
    stats = SinkStats()
    for seconds in (0.004, 0.02, 0.2, 30.0):
        stats.observe_latency(seconds)
    assert sum(stats.latency_bucket_counts) == 4 and stats.latency_bucket_counts[-1] == 1
    stats._rate_window.append((time.monotonic() - 2, 0, 0))
    stats.points, stats.messages = 2000, 100
    points_s, messages_s = stats.rates()
    assert 900 < points_s < 1100 and 45 < messages_s < 55


async def test_unreachable_broker_is_a_clear_error_after_retries(tmp_path, free_port):
    import pytest

    from podwatch.errors import PodwatchError

    db = Database(tmp_path / "k.duckdb")
    sink = DuckDBSink(db, SinkSettings(kafka=f"127.0.0.1:{free_port}", connect_timeout_s=1.0))
    try:
        with pytest.raises(PodwatchError, match=f"cannot reach Kafka at 127.0.0.1:{free_port}"):
            await sink.start()
    finally:
        await sink.stop()
        db.close()


async def test_start_raises_the_gc_threshold_and_never_lowers_it(tmp_path, free_port):
    import gc

    import pytest

    from podwatch.errors import PodwatchError

    saved = gc.get_threshold()
    db = Database(tmp_path / "g.duckdb")
    try:
        for configured, before, after in ((50_000, 700, 50_000), (None, 700, 700), (50_000, 80_000, 80_000)):
            gc.set_threshold(before, saved[1], saved[2])
            sink = DuckDBSink(db, SinkSettings(kafka=f"127.0.0.1:{free_port}", connect_timeout_s=0.2,
                                               gc_gen0_threshold=configured))
            with pytest.raises(PodwatchError):  # no broker: start fails after setting the threshold
                await sink.start()
            await sink.stop()
            assert gc.get_threshold() == (after, saved[1], saved[2])
    finally:
        gc.set_threshold(*saved)
        db.close()


def test_sink_settings_reject_a_malformed_bootstrap_list():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="'a:b:c' is not host:port"):
        SinkSettings(kafka="a:b:c")
