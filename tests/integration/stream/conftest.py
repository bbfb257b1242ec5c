"""Fixtures of the stream integration tests: unique topic sets on the session Tansu broker."""

from __future__ import annotations

import uuid

import pytest

from podwatch.stream.config import KafkaSettings
from podwatch.stream.topics import ensure_topics


@pytest.fixture
async def topics(tansu_broker) -> dict[str, str]:
    """Unique telemetry/alerts/deadletter topics (6/1/1 partitions) on the session broker."""
    tag = uuid.uuid4().hex[:8]
    names = {"telemetry": f"t.{tag}.telemetry", "alerts": f"t.{tag}.alerts", "deadletter": f"t.{tag}.deadletter"}
    await ensure_topics(tansu_broker, topics={names["telemetry"]: 6, names["alerts"]: 1, names["deadletter"]: 1})
    return names


def fast_settings(bootstrap: str, **overrides) -> KafkaSettings:
    """Short bounds so that outages are detected and retried quickly in tests."""
    values = dict(bootstrap_servers=bootstrap, delivery_timeout_s=2.0, request_timeout_ms=3000,
                  retry_backoff_min_s=0.1, retry_backoff_max_s=1.0, stop_drain_timeout_s=3.0)
    values.update(overrides)
    return KafkaSettings(**values)
