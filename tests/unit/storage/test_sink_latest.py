"""latest_values: each committed batch's newest row per series is kept until the periodic flush
upserts it; a NULL (bad) newest value stays NULL, never an older value with the newest time."""

from __future__ import annotations

import numpy as np
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from podwatch.samples import Quality, Reading
from podwatch.storage.db import Database
from podwatch.storage.decode import decode_messages, latest_rows_of_layout, select_readings
from podwatch.storage.sink import DuckDBSink, SinkSettings

T0 = 1_764_000_000_000


def _batch(*readings: Reading):
    batch = decode_messages([orjson.dumps(r.to_envelope()) for r in readings])
    return batch, np.ones(batch.n_readings, dtype=bool)


def test_newest_value_per_series_survives_batches_and_a_null_newest_value(tmp_path):
    db = Database(tmp_path / "l.duckdb")
    try:
        sink = DuckDBSink(db, SinkSettings(kafka="127.0.0.1:1"))
        cur = sink._write_cursor = db.cursor()
        sink._write_transaction(*_batch(Reading("s", "pdu-1", 1, T0, {"p_kw": 1.0, "q_kw": 5.0}),
                                       Reading("s", "pdu-1", 2, T0 + 1000, {"p_kw": 2.0})), [], {0: 2})
        # the newest p_kw is a bad point (NULL); the newest q_kw is still the first reading's
        sink._write_transaction(*_batch(Reading("s", "pdu-1", 3, T0 + 2000, {"p_kw": None}, Quality.GOOD,
                                               {"p_kw": Quality.BAD})), [], {0: 3})
        assert db.query("SELECT count(*) FROM latest_values") == [(0,)]  # not flushed yet
        sink._flush_latest(cur)
        got = db.query("SELECT metric, epoch_ms(ts), value, quality FROM latest_values ORDER BY metric")
        assert got == [("p_kw", T0 + 2000, None, 2), ("q_kw", T0, 5.0, 0)]
        assert sink._latest_pending is None
        # an older batch arriving late never overwrites a newer latest value
        sink._write_transaction(*_batch(Reading("s", "pdu-1", 0, T0 - 5000, {"q_kw": 9.0})), [], {0: 4})
        sink._flush_latest(cur)
        assert db.query("SELECT value FROM latest_values WHERE metric = 'q_kw'") == [(5.0,)]
        assert np.isclose(db.query("SELECT sum(value) FROM samples WHERE metric = 'p_kw'")[0][0], 3.0)
    finally:
        db.close()


def test_refresh_from_samples_keeps_a_null_newest_value(tmp_path):
    db = Database(tmp_path / "r.duckdb")
    try:
        sink = DuckDBSink(db, SinkSettings(kafka="127.0.0.1:1"))
        cur = sink._write_cursor = db.cursor()
        sink._write_transaction(*_batch(Reading("s", "pdu-1", 1, T0, {"p_kw": 1.0}),
                                       Reading("s", "pdu-1", 2, T0 + 1000, {"p_kw": None}, Quality.GOOD,
                                               {"p_kw": Quality.BAD})), [("pdu-1", 2, T0 + 1000)], {0: 2})
        sink._refresh_latest_from_samples(cur)  # what start() does after a crash
        assert db.query("SELECT epoch_ms(ts), value, quality FROM latest_values") == [(T0 + 1000, None, 2)]
    finally:
        db.close()


def _latest_by_group_by(batch, keep) -> set:
    rows = select_readings(batch, keep)
    newest = rows.group_by(["device", "metric"]).last()
    return {(r["device"], r["metric"], r["ts"], r["value"], r["quality"]) for r in newest.iter_rows(named=True)}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 2), st.booleans()), min_size=1,
                max_size=30),
       st.booleans())
def test_newest_rows_of_the_layout_equal_a_group_by(readings, uniform):
    """`latest_rows_of_layout` (newest reading per device, when every device's readings carry the
    same metric names) picks exactly the rows a group-by over all rows would; otherwise it
    declines (None). Readings are kept or dropped (dedup) at random."""
    names = [("a_kw", "b_kw"), ("a_kw",), ("b_kw", "c_kw", "a_kw")]
    messages = []
    for i, (device, step, key_set, _) in enumerate(readings):
        metrics = names[0 if uniform else key_set]
        messages.append(orjson.dumps(Reading("s", f"d{device}", i, T0 + 1000 * step,
                                             {m: float(i + j) for j, m in enumerate(metrics)}).to_envelope()))
    batch = decode_messages(messages)
    keep = np.asarray([k for *_, k in readings], dtype=bool)
    picked = latest_rows_of_layout(batch, keep)
    if picked is None:
        assert not uniform
        return
    rows = batch.rows
    got = {(rows["device"][i], rows["metric"][i], rows["ts"][i], rows["value"][i], rows["quality"][i])
           for i in picked.tolist()}
    assert got == _latest_by_group_by(batch, keep)
