"""Fixtures of the stream integration tests: unique topic sets on the session Tansu broker."""

from __future__ import annotations

import uuid

import pytest

from podwatch.stream.topics import ensure_topics


@pytest.fixture
async def topics(tansu_broker) -> dict[str, str]:
    """Unique telemetry/alerts/deadletter topics (6/1/1 partitions) on the session broker."""
    tag = uuid.uuid4().hex[:8]
    names = {"telemetry": f"t.{tag}.telemetry", "alerts": f"t.{tag}.alerts", "deadletter": f"t.{tag}.deadletter"}
    await ensure_topics(tansu_broker, topics={names["telemetry"]: 6, names["alerts"]: 1, names["deadletter"]: 1})
    return names
