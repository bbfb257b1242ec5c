"""Decoding telemetry envelopes into long rows; every rejection names its reason."""

from __future__ import annotations

import json

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podwatch.samples import Quality, Reading
from podwatch.storage.decode import _decode_bulk, _decode_checked, decode_messages, select_readings
from podwatch.storage.ids import reading_rows_table


def env(device="pdu-1", seq=1, ts=1_764_000_000_000, **overrides) -> bytes:
    """A valid v1 envelope with fields replaced by `overrides` (bypassing Reading's own checks)."""
    r = Reading("s1", device, seq, ts, {"pdu.power_kw": 10.5, "pdu.l1.voltage_v": 230.0})
    return orjson.dumps(r.to_envelope() | overrides)


def test_rows_are_long_sorted_by_device_then_time_with_qualities():
    messages = [
        env("pdu-b", 1, 2_000_000_000_000),
        orjson.dumps(Reading("s1", "pdu-a", 7, 2_000_000_000_500, {"pdu.power_kw": None, "pdu.l1.current_a": 3},
                             Quality.GOOD, {"pdu.power_kw": Quality.BAD}).to_envelope()),
        env("pdu-a", 6, 2_000_000_000_000, quality="stale"),
    ]
    batch = decode_messages(messages)
    assert not batch.rejected and batch.sites == {"s1"}
    rows = batch.rows.to_dicts()
    assert [(r["device"], r["seq"], r["metric"]) for r in rows] == [
        ("pdu-a", 6, "pdu.power_kw"), ("pdu-a", 6, "pdu.l1.voltage_v"),
        ("pdu-a", 7, "pdu.power_kw"), ("pdu-a", 7, "pdu.l1.current_a"),
        ("pdu-b", 1, "pdu.power_kw"), ("pdu-b", 1, "pdu.l1.voltage_v")]
    assert [r["quality"] for r in rows] == [1, 1, 2, 0, 0, 0]
    assert rows[2]["value"] is None and rows[3]["value"] == 3.0
    assert str(batch.rows["ts"].dtype) == "Datetime(time_unit='ms', time_zone=None)"
    keep = np.array([True, False, True])  # readings in input order: pdu-b/1, pdu-a/7, pdu-a/6
    assert [(r["device"], r["seq"]) for r in select_readings(batch, keep).to_dicts()] == [
        ("pdu-a", 6), ("pdu-a", 6), ("pdu-b", 1), ("pdu-b", 1)]


BAD_MESSAGES = [
    (b"\x00\x01garbage", "not valid JSON"),
    (env()[:20], "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (None, "tombstone"),
    (env(v=2), "schema version 2 is newer"),
    (env(v=0), "unsupported schema version 0"),
    (env(v="1"), "field 'v' must be an integer"),
    (env(device=""), "'device'"),
    (env(seq=-3), "'seq'"),
    (env(seq=1.5), "'seq'"),
    (env(ts="yesterday"), "'ts'"),
    (env(ts=5), "'ts'"),
    (env(points=[1]), "'points'"),
    (env(quality="meh"), "'quality'"),
    (env(pq={"pdu.power_kw": "meh"}), "pq['pdu.power_kw'] must be one of"),
    (env(points={"pdu.power_kw": "high"}), "point 'pdu.power_kw' has value 'high'"),
    (env(points={"pdu.power_kw": False}), "point 'pdu.power_kw' has value False"),
    (env(site=""), "'site'"),
    (env(quality=None), "'quality'"),
]


@pytest.mark.parametrize("raw, reason", BAD_MESSAGES)
def test_bad_messages_are_rejected_with_a_reason_and_the_rest_decode(raw, reason):
    batch = decode_messages([env("pdu-1", 1), raw, env("pdu-2", 1)])
    assert [r.index for r in batch.rejected] == [1]
    assert reason in batch.rejected[0].reason
    assert batch.rows.height == 4 and set(batch.rows["device"]) == {"pdu-1", "pdu-2"}
    assert list(batch.msg_index) == [0, 2]


def test_empty_points_and_empty_batch():
    batch = decode_messages([env(points={})])
    assert batch.rows.height == 0 and batch.n_readings == 1
    assert decode_messages([]).rows.height == 0


def test_non_finite_values_are_rejected():
    batch = decode_messages([b'{"v":1,"site":"s","device":"d","seq":1,"ts":1764000000000,"points":{"a_kw":1e999}}'])
    assert batch.rows.height == 0 and "infinity" in batch.rejected[0].reason
    assert orjson.loads(env(points={"a_kw": None}))["points"] == {"a_kw": None}


def test_booleans_are_rejected_like_the_stream_contract_says():
    batch = decode_messages([env(points={"cdu.pump1.running": True, "cdu.flow_lpm": 3.0}), env(device="truey")])
    assert [r.index for r in batch.rejected] == [0] and "True" in batch.rejected[0].reason
    assert batch.rows.height == 2
    # False comes out of polars as 0.0, next to a true 0 and 1 of other messages
    batch = decode_messages([env(points={"cdu.leak_state": 0, "cdu.flow_lpm": 1.0}),
                             env(seq=2, points={"cdu.leak_state": False}), env(seq=3)])
    assert [r.index for r in batch.rejected] == [1] and "False" in batch.rejected[0].reason
    assert batch.rows.height == 4

def test_metric_name_cache_is_bounded_between_batches(monkeypatch):
    from podwatch.storage import decode

    monkeypatch.setattr(decode, "MAX_METRIC_NAMES", 3)
    for i in range(4):
        batch = decode_messages([env(points={f"m{i}_{k}_kw": float(k) for k in range(4)}), env(seq=2)])
        metrics = batch.rows["metric"].cast(str).to_list()
        assert set(metrics) == {f"m{i}_{k}_kw" for k in range(4)} | {"pdu.power_kw", "pdu.l1.voltage_v"}


def test_float32_values_are_stored_as_their_shortest_decimal_without_loss():
    import numpy as np

    from podwatch.storage.decode import shortest_float32_decimals

    rng = np.random.default_rng(3)
    f32 = (rng.random(10_000) * 1e4 - 5e3).astype(np.float32)
    doubles = f32.astype(np.float64)                       # what a float32 register decodes to
    short = shortest_float32_decimals(doubles)
    assert (short.astype(np.float32) == f32).all()           # the device's value is unchanged
    assert np.mean([len(repr(v)) for v in short]) < np.mean([len(repr(v)) for v in doubles]) - 4
    genuine = np.array([230.1, 0.1 + 0.2, 1234567.891, 0.0, np.nan])
    kept = shortest_float32_decimals(genuine)
    assert kept[:4].tolist() == genuine[:4].tolist() and np.isnan(kept[4])  # float64 values left alone
    batch = decode_messages([env(points={"a_kw": float(np.float32(19.87181)), "b_kw": None, "c_kw": 2})])
    assert batch.rows["value"].to_list() == [19.87181, None, 2.0]


def _same_batch(a, b) -> None:
    as_text = [pl.col("device").cast(pl.String), pl.col("metric").cast(pl.String)]
    assert a.rows.with_columns(as_text).equals(b.rows.with_columns(as_text))
    assert (list(a.devices), list(a.seqs), list(a.ts_ms)) == (list(b.devices), list(b.seqs), list(b.ts_ms))
    assert list(a.msg_index) == list(b.msg_index) and list(a.row_reading) == list(b.row_reading)
    assert list(a.point_counts) == list(b.point_counts) and a.sites == b.sites
    assert [(r.index, r.reason) for r in a.rejected] == [(r.index, r.reason) for r in b.rejected]


def test_bulk_path_decodes_exactly_like_the_checked_path():
    messages = [env("pdu-b", seq, 2_000_000_000_000 + seq) for seq in range(100)] + [
        orjson.dumps(Reading("s1", "pdu-a", 7, 2_000_000_000_500, {"pdu.power_kw": None, "pdu.l1.current_a": 3},
                             Quality.STALE, {"pdu.power_kw": Quality.BAD}).to_envelope()),
        env("truey", 1, points={"cdu.flow_lpm": 3, "cdu.supply_temp_c": 18.25}),  # 'true' in a name is fine
        env("pdu-c", 1, points={}),
        env("pdu-a", 6, 2_000_000_000_000, quality="stale", extra_field="ignored"),
    ]
    bulk = _decode_bulk(messages)
    assert bulk is not None  # nothing here needs the checked path
    _same_batch(bulk, _decode_checked(messages))
    assert bulk.rows.filter(pl.col("device") == "pdu-a")["quality"].to_list() == [1, 1, 2, 1]


@pytest.mark.parametrize("raw, reason", BAD_MESSAGES + [(env(points={"a_kw": True}), "True")])
def test_any_bad_message_sends_the_whole_batch_to_the_checked_path(raw, reason):
    assert _decode_bulk([env("pdu-1", 1), raw, env("pdu-2", 1)]) is None
    assert reason in decode_messages([env("pdu-1", 1), raw, env("pdu-2", 1)]).rejected[0].reason


_VALID = {
    "v": [1], "site": ["s1", "s2"], "device": ["pdu-1", "pdu-2", "cdu-1"], "seq": [0, 1, 2, 2**64 - 1],
    "ts": [946_684_800_000, 1_764_000_000_000, 4_102_444_799_999], "quality": ["good", "stale", "bad"],
    "points": [{"a_kw": 1.5, "b_c": None}, {"b_c": 2, "a_kw": -0.1}, {}, {"a_kw": 1e300}],
    "pq": [None, None, {"a_kw": "bad"}, {"zz_kw": "stale"}],  # None: no pq field
}
_INVALID = {
    "v": [2, 0, "1", True, 1.0, None],
    "site": ["", 3, None, ["s"]],
    "device": ["", 5, {"d": 1}, None],
    "seq": [-1, 2**64, 1.5, True, "1", None],
    "ts": [5, 4_102_444_800_000, 1.7e12, False, None],
    "quality": ["meh", None, 1, "GOOD"],
    "points": [{"a_kw": "x"}, {"a_kw": False}, {"a_kw": [1]}, [1], None],
    "pq": [{"a_kw": "meh"}, {"b_c": 1}, [], "bad"],
}
_message = st.tuples(
    st.fixed_dictionaries({name: st.sampled_from(options) for name, options in _VALID.items()}),
    st.sampled_from([None] * 12 + list(_INVALID)),  # the field to break, mostly none
    st.booleans(),  # break it by dropping it (else by a wrong value)
    st.integers(0, 5),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_message, min_size=1, max_size=8))
def test_decode_never_accepts_what_the_envelope_validator_rejects(drawn):
    messages = []
    for body, broken, drop, pick in drawn:
        body = {k: v for k, v in body.items() if not (k == "pq" and v is None)}
        if broken is not None:
            if drop:
                body.pop(broken, None)
            else:
                body[broken] = _INVALID[broken][pick % len(_INVALID[broken])]
        messages.append(json.dumps(body).encode())  # json: orjson cannot write 2**64
    _same_batch(decode_messages(messages), _decode_checked(messages))


def test_reading_rows_one_per_reading_with_point_counts_in_time_order():
    """The sink stores seq once per reading: one `reading_rows` row per kept reading with its
    number of points (two readings of a device at the same ts stay apart by seq), in time order."""
    messages = [
        env("pdu-b", 1, 2_000_000_000_000),
        orjson.dumps(Reading("s1", "pdu-a", 7, 2_000_000_001_000, {"x_kw": 1.0, "y_kw": 2.0, "z_kw": None}).to_envelope()),
        env("pdu-a", 6, 2_000_000_000_000),
        env("pdu-a", 9, 2_000_000_000_000),  # a restarted counter at an equal timestamp
    ]
    batch = decode_messages(messages)
    device_ids = np.where(np.asarray(batch.devices) == "pdu-a", 3, 8).astype(np.uint32)
    table = reading_rows_table(np.asarray(batch.ts_ms, dtype=np.int64), device_ids,
                               np.asarray(batch.seqs, dtype=np.uint64), batch.point_counts)
    got = list(zip(table["device_id"].to_pylist(), table["seq"].to_pylist(), table["n_points"].to_pylist(),
                   table["ts"].cast(pa.int64()).to_pylist()))
    assert got == [(3, 6, 2, 2_000_000_000_000), (3, 9, 2, 2_000_000_000_000), (8, 1, 2, 2_000_000_000_000),
                   (3, 7, 3, 2_000_000_001_000)]
    assert sum(table["n_points"].to_pylist()) == batch.rows.height
    empty = np.empty(0, np.int64)
    assert reading_rows_table(empty, empty.astype(np.uint32), empty.astype(np.uint64), empty).num_rows == 0