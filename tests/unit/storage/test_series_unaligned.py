"""/api/series from rollups must average exactly the samples in [from, to) per step bucket, also when
`from`/`to` are not on a rollup boundary (Grafana's ${__from} is any millisecond): the part of the
range before the first closed rollup bucket used to vanish (a 15-min bucket dropped, a 2-h bucket
averaged over its tail only) and a rollup bucket reaching past `to` counted samples after it."""

from __future__ import annotations

from datetime import datetime, timedelta

import duckdb
import pytest

from podwatch.storage.ids import insert_named_samples
from podwatch.storage.queries import series
from podwatch.storage.rollups import advance_rollups, done_until
from podwatch.storage.schema import ensure_schema

T0 = datetime(2026, 3, 1, 10, 0)


@pytest.fixture(scope="module")
def con(tmp_path_factory):
    con = duckdb.connect(str(tmp_path_factory.mktemp("unaligned") / "u.duckdb"))
    ensure_schema(con)
    # 3 h of 10-s samples whose value is the minute of the day: every bucket's average differs
    insert_named_samples(con, """
        SELECT ?::TIMESTAMP + to_seconds(i * 10) AS ts, 'pdu-1' AS device, 'pdu.power_kw' AS metric,
               (i // 6)::DOUBLE AS value, 0 AS quality, i AS seq
        FROM range(1080) r(i)""", [T0])
    con.execute("INSERT INTO dedup_state SELECT device, max(seq), max(ts) FROM readings GROUP BY device")
    while advance_rollups(con, 120):
        pass
    assert done_until(con)["rollup_1h"] == T0 + timedelta(hours=2)  # the last hour stays raw
    yield con
    con.close()


def _raw(con, start, end, step_s):
    return dict(con.execute(
        f"SELECT time_bucket(to_microseconds({int(step_s * 1e6)}), ts), avg(value) FROM samples "
        "WHERE device = 'pdu-1' AND ts >= ? AND ts < ? GROUP BY 1", [start, end]).fetchall())


@pytest.mark.parametrize("start, end, step_s", [
    (T0 + timedelta(minutes=48), T0 + timedelta(hours=2, minutes=50), 900),      # unaligned from, 15-min rollup
    (T0 + timedelta(minutes=48), T0 + timedelta(hours=2, minutes=50), 3600),     # 1-h rollup
    (T0 + timedelta(minutes=48), T0 + timedelta(hours=2, minutes=50), 7200),     # 2-h step from the 1-h rollup
    (T0 + timedelta(minutes=7, seconds=30), T0 + timedelta(hours=1, minutes=22, seconds=10), 60),  # 1-min rollup
    (T0, T0 + timedelta(hours=1, minutes=7), 900),                                # unaligned to: bucket past `to`
])
def test_rollup_series_equals_the_raw_average_over_the_range(con, start, end, step_s):
    got = {r["time"]: r["value"] for r in series(con, device="pdu-1", metric="pdu.power_kw",
                                                   start=start, end=end, step_s=step_s)}
    want = _raw(con, start, end, step_s)
    assert set(got) == set(want)
    for t, value in want.items():
        assert got[t] == pytest.approx(value), t


def test_a_step_giving_more_buckets_than_the_raw_cap_is_refused(con):
    from podwatch.storage.queries import QueryError

    # 10 years in 1-ms buckets would return every stored reading as its own bucket, uncapped
    with pytest.raises(QueryError, match="parameter 'step'"):
        series(con, device="pdu-1", start=T0 - timedelta(days=3650), end=T0 + timedelta(hours=3), step_s=0.001)
    assert series(con, device="pdu-1", start=T0, end=T0 + timedelta(hours=3), step_s=10)  # 1,080 buckets: fine
