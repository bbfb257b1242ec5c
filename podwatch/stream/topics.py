"""Topic names and partition counts of the Kafka contract, and `ensure_topics` which creates them.

- `podwatch.telemetry.v1` — one message per device reading, keyed by device id (6 partitions by
  default: order holds per device because a key always maps to the same partition).
- `podwatch.alerts.v1` — alert lifecycle events, keyed by alert id (1 partition: one total order of
  transitions, and the volume is tiny).
- `podwatch.deadletter.v1` — what could not be decoded or delivered, with the reason (1 partition).

The version suffix is part of the name: an incompatible envelope change gets a new topic.
"""

from __future__ import annotations

import asyncio
import logging

from podwatch.errors import PodwatchError
from podwatch.logs import fields

log = logging.getLogger(__name__)

TELEMETRY_TOPIC = "podwatch.telemetry.v1"
ALERTS_TOPIC = "podwatch.alerts.v1"
DEADLETTER_TOPIC = "podwatch.deadletter.v1"
ALL_TOPICS = (TELEMETRY_TOPIC, ALERTS_TOPIC, DEADLETTER_TOPIC)

DEFAULT_TELEMETRY_PARTITIONS = 6
ALERTS_PARTITIONS = 1
DEADLETTER_PARTITIONS = 1

TOPIC_ALREADY_EXISTS = 36  # Kafka error code; create_topics reports it in the response, no exception


def topic_partitions(telemetry_partitions: int = DEFAULT_TELEMETRY_PARTITIONS) -> dict[str, int]:
    """Partition count of each podwatch topic."""
    return {TELEMETRY_TOPIC: telemetry_partitions, ALERTS_TOPIC: ALERTS_PARTITIONS,
            DEADLETTER_TOPIC: DEADLETTER_PARTITIONS}


async def ensure_topics(bootstrap: str, partitions: int = DEFAULT_TELEMETRY_PARTITIONS, *,
                        replication_factor: int = 1, topics: dict[str, int] | None = None,
                        settings=None, timeout_s: float = 15.0) -> dict[str, str]:
    """Create the podwatch topics that do not exist yet; return {topic: "created" | "exists"}.

    `partitions` is the telemetry topic's partition count; `topics` overrides the whole map
    (tests use unique names). `settings` (a `KafkaSettings`) passes SASL/TLS options through.
    Raises PodwatchError naming the broker when it cannot be reached within `timeout_s`.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    wanted = topics if topics is not None else topic_partitions(partitions)
    kwargs = settings.admin_kwargs() if settings is not None else {}
    kwargs["bootstrap_servers"] = bootstrap
    kwargs.setdefault("request_timeout_ms", int(timeout_s * 1000))
    admin = AIOKafkaAdminClient(**kwargs)
    try:
        try:
            await asyncio.wait_for(admin.start(), timeout_s)
        except (asyncio.TimeoutError, Exception) as exc:
            raise PodwatchError(f"cannot reach Kafka at {bootstrap} to create topics: {exc or type(exc).__name__}") from exc
        new = [NewTopic(name, count, replication_factor) for name, count in wanted.items()]
        response = await asyncio.wait_for(admin.create_topics(new), timeout_s)
        result: dict[str, str] = {}
        for topic_error in response.topic_errors:
            name, code = topic_error[0], topic_error[1]
            if code == 0:
                result[name] = "created"
            elif code == TOPIC_ALREADY_EXISTS:
                result[name] = "exists"
            else:
                message = topic_error[2] if len(topic_error) > 2 else ""
                raise PodwatchError(f"creating topic {name} on {bootstrap} failed: error code {code} {message or ''}".strip())
        log.info("topics ensured", extra=fields(bootstrap=bootstrap, **{k.replace(".", "_"): v for k, v in result.items()}))
        return result
    finally:
        try:
            await asyncio.wait_for(admin.close(), 5)
        except Exception:  # closing a client that never connected must not hide the real error
            pass
