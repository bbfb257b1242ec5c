"""Shared fixtures: free ports, condition waits, and real servers on 127.0.0.1.

Servers are started per session (tansu, mosquitto) and stopped by PID at the end. A test that
needs a clean broker state creates its own topics with unique names instead of restarting.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from podwatch import procs


@pytest.fixture
def free_port() -> int:
    return procs.free_port()


@pytest.fixture(scope="session")
def tansu_broker():
    """A real Tansu Kafka-protocol broker; yields 'host:port'."""
    with procs.tansu() as broker:
        yield broker.address


@pytest.fixture(scope="session")
def mosquitto_broker(tmp_path_factory):
    """A real mosquitto broker; yields (host, port)."""
    with procs.mosquitto(workdir=tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker.host, broker.port


@pytest.fixture
def unique_topic() -> str:
    return f"test.{uuid.uuid4().hex[:10]}"


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Async: poll `predicate()` (sync or async) until truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(interval)
