"""Rollups wait for the partitions still being caught up (no recompute churn while catching up)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from aiokafka import TopicPartition

from podwatch.storage.db import Database
from podwatch.storage.fetch import _newest_per_partition
from podwatch.storage.sink import DuckDBSink, SinkSettings


def test_newest_reading_per_partition_counts_accepted_messages_only():
    parts = [(TopicPartition("t", 4), [SimpleNamespace()] * 3), (TopicPartition("t", 1), [SimpleNamespace()] * 2)]
    # messages 0-2 came from partition 4, 3-4 from partition 1; message 2 was rejected
    assert _newest_per_partition(parts, np.array([0, 1, 3, 4]), [50, 40, 10, 30]) == {4: 50, 1: 30}
    assert _newest_per_partition(parts, np.array([0]), [7]) == {4: 7}
    assert _newest_per_partition(parts, np.array([], dtype=np.int64), []) == {}


def test_skew_is_how_far_lagging_partitions_are_behind_the_newest(tmp_path):
    db = Database(tmp_path / "s.duckdb")
    try:
        sink = DuckDBSink(db, SinkSettings(kafka="127.0.0.1:1"))
        assert sink._partition_skew_s() == 0.0
        sink._partition_newest_ms = {0: 1_000_000, 1: 700_000, 2: 900_000}
        sink.stats.lag = {0: 0, 1: 0, 2: 0}
        assert sink._partition_skew_s() == 0.0  # all caught up: quiet devices do not hold rollups back
        sink.stats.lag = {0: 0, 1: 12, 2: 3}
        assert sink._partition_skew_s() == 300.0  # partition 1 is 300 s behind partition 0
        sink.stats.lag = {0: 5, 1: 0, 2: 0}
        assert sink._partition_skew_s() == 0.0  # the lagging one is the newest
    finally:
        db.close()


def test_partitions_no_longer_assigned_are_forgotten(tmp_path):
    db = Database(tmp_path / "a.duckdb")
    try:
        sink = DuckDBSink(db, SinkSettings(kafka="127.0.0.1:1"))
        sink._partition_newest_ms = {0: 1_000_000, 1: 700_000}
        sink.stats.lag = {0: 0, 1: 9}  # partition 1's last lag, before a rebalance moved it away
        sink._keep_partition_state({0})  # what _seek_assigned does with a new assignment
        assert sink._partition_newest_ms == {0: 1_000_000}
        assert sink._partition_skew_s() == 0.0
    finally:
        db.close()
