"""Dedup by (device, seq) and the API's time/step parameters."""

from __future__ import annotations

from datetime import datetime

import pytest

from podwatch.storage.dedup import SeqDeduper
from podwatch.storage.queries import QueryError, parse_step_s, parse_time, pick_rollup


def test_duplicates_dropped_out_of_order_accepted():
    d = SeqDeduper(window=8)
    first = d.check(["a", "a", "b", "a"], [1, 2, 1, 2], [10, 20, 10, 20])
    assert first.keep.tolist() == [True, True, True, False] and first.duplicates == 1
    # 4 arrives after 5 (a retry overtaken), 5 again is a duplicate
    second = d.check(["a", "a", "a"], [5, 4, 5], [50, 40, 50])
    assert second.keep.tolist() == [True, True, False]


@pytest.mark.parametrize("top", [2**63 - 2, 2**63, 2**64 - 4])
def test_sequences_across_the_whole_uint64_range(top):
    # The envelope allows seq up to 2^64 - 1; an int64 ring used to overflow on seq >= 2^63 and
    # stop the sink on a valid message (which it re-read and crashed on again after restart).
    d = SeqDeduper(window=8)
    seqs = [top, top + 1, top + 2, top + 3]
    first = d.check(["a"] * 4, seqs, [10, 20, 30, 40])
    assert first.keep.tolist() == [True] * 4
    again = d.check(["a", "a"], [top + 1, top + 3], [20, 40])
    assert again.keep.tolist() == [False, False] and again.duplicates == 2


def test_seq_zero_on_a_fresh_ring_slot_is_not_mistaken_for_a_stored_reading():
    d = SeqDeduper(window=4)
    d.check(["a"], [3], [30])
    out = d.check(["a"], [0], [5])  # slot 0 was never written: no restart, just an older reading
    assert out.keep.tolist() == [True] and out.resets == 0


def test_counter_restart_is_accepted_and_too_old_is_dropped():
    d = SeqDeduper(window=4)
    d.check(["a"] * 10, list(range(10)), [t * 10 for t in range(10)])
    restarted = d.check(["a"], [0], [1000])  # far below, newer time: the producer restarted
    assert restarted.keep.tolist() == [True] and restarted.resets == 1
    d2 = SeqDeduper(window=4)
    d2.check(["a"] * 10, list(range(10)), [t * 10 for t in range(10)])
    old = d2.check(["a"], [2], [20])  # beyond the window, older time: a very late duplicate
    assert old.keep.tolist() == [False] and old.too_old == 1
    reused = d2.check(["a"], [9], [5000])  # same seq, different reading: restarted counter
    assert reused.keep.tolist() == [True] and reused.resets == 1


NOW = datetime(2026, 1, 1, 12, 0, 0)


@pytest.mark.parametrize("text, expected", [
    ("1767225600000", datetime(2026, 1, 1)),          # Grafana ${__from}: epoch ms
    ("1767225600", datetime(2026, 1, 1)),             # epoch seconds
    ("2026-01-01T10:00:00Z", datetime(2026, 1, 1, 10)),
    ("2026-01-01T12:00:00+02:00", datetime(2026, 1, 1, 10)),
    ("2026-01-01 10:00:00", datetime(2026, 1, 1, 10)),
    ("now", NOW),
    ("now-6h", datetime(2026, 1, 1, 6)),
    ("now-30m", datetime(2026, 1, 1, 11, 30)),
    ("now-1d", datetime(2025, 12, 31, 12)),
])
def test_time_parameters(text, expected):
    assert parse_time(text, "from", now=NOW) == expected


def test_bad_time_and_step_name_the_parameter():
    with pytest.raises(QueryError, match="'from'"):
        parse_time("last tuesday", "from", now=NOW)
    with pytest.raises(QueryError, match="'step'"):
        parse_step_s("fast")


@pytest.mark.parametrize("text, seconds, rollup", [
    ("10s", 10, None), ("1m", 60, "rollup_1m"), ("90s", 90, None), ("5m", 300, "rollup_1m"),
    ("15m", 900, "rollup_15m"), ("30m", 1800, "rollup_15m"), ("1h", 3600, "rollup_1h"), ("1d", 86400, "rollup_1h"),
    ("60000ms", 60, "rollup_1m"),
])
def test_step_picks_the_coarsest_fitting_rollup(text, seconds, rollup):
    assert parse_step_s(text) == seconds
    assert pick_rollup(seconds) == rollup


@pytest.mark.parametrize("name, text", [
    ("to", "99999999999999999999"),          # epoch ms past year 9999
    ("from", "-99999999999999999"),
    ("from", "now-100000000y"),
    ("from", "0001-01-01T00:00:00+01:00"),   # converting the offset leaves datetime's range
])
def test_times_out_of_range_are_a_query_error_naming_the_parameter(name, text):
    with pytest.raises(QueryError, match=f"parameter '{name}'"):
        parse_time(text, name, now=NOW)


def test_steps_out_of_range_are_a_query_error_and_the_longest_step_runs(tmp_path):
    import duckdb

    from podwatch.storage.queries import series
    from podwatch.storage.schema import ensure_schema

    with pytest.raises(QueryError, match="parameter 'step'"):
        parse_step_s("99999999999999999999d")
    con = duckdb.connect(str(tmp_path / "s.duckdb"))
    ensure_schema(con)
    longest = parse_step_s("3650d")
    assert series(con, device="pdu-1", start=datetime(2000, 1, 1), end=datetime(2026, 1, 1), step_s=longest) == []
