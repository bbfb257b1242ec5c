"""Envelope encode/decode: the strict decoder's table of bad inputs, and the JSON Schema agreeing
with it on good and bad envelopes."""

from __future__ import annotations

import base64

import jsonschema
import orjson
import pytest

from podwatch.samples import Quality, Reading
from podwatch.stream.envelope import (
    MAX_DEAD_LETTER_PAYLOAD_BYTES,
    EnvelopeError,
    dead_letter,
    decode_envelope,
    decode_reading,
    encode_alert_event,
    encode_reading,
    load_schema,
    reading_key,
)

GOOD = {"v": 1, "site": "demo", "device": "pdu-m1-r01-a", "seq": 4211, "ts": 1732240000123, "quality": "good",
        "points": {"pdu.power_kw": 66.1, "pdu.l1.voltage_v": 239.8, "pdu.l2.current_a": None},
        "pq": {"pdu.l2.current_a": "bad"}}
VALIDATOR = jsonschema.Draft202012Validator(load_schema("telemetry"))


def with_(**changes) -> bytes:
    env = {**GOOD, **changes}
    return orjson.dumps({k: v for k, v in env.items() if v is not DROP})


DROP = object()
GOOD_BYTES = orjson.dumps(GOOD)

BAD = [
    ("garbage bytes", b"\x00\xff\xfe garbage", "not valid JSON"),
    ("empty value", b"", "empty"),
    ("null payload", None, "no value"),
    ("truncated JSON", GOOD_BYTES[:-7], "not valid JSON"),
    ("JSON array", b"[1, 2]", "not a JSON array"),
    ("NaN literal", GOOD_BYTES.replace(b"66.1", b"NaN"), "not valid JSON"),
    ("Infinity literal", GOOD_BYTES.replace(b"66.1", b"Infinity"), "not valid JSON"),
    ("overflowing number", GOOD_BYTES.replace(b"66.1", b"1e999"), "not valid JSON"),
    ("missing version", with_(v=DROP), "missing field 'v'"),
    ("version as string", with_(v="1"), "'v' must be an integer"),
    ("old version", with_(v=0), "unsupported schema version 0"),
    ("future version", with_(v=2), "schema version 2 is newer"),
    ("missing device", with_(device=DROP), "missing field 'device'"),
    ("missing seq", with_(seq=DROP), "missing field 'seq'"),
    ("missing points", with_(points=DROP), "missing field 'points'"),
    ("missing quality", with_(quality=DROP), "missing field 'quality'"),
    ("empty device", with_(device=""), "'device' must be a non-empty string"),
    ("device as number", with_(device=7), "'device' must be a non-empty string"),
    ("negative seq", with_(seq=-1), "'seq' must be an integer"),
    ("seq as float", with_(seq=1.5), "'seq' must be an integer"),
    ("seq as bool", with_(seq=True), "'seq' must be an integer"),
    ("ts as string", with_(ts="2026-11-22T03:00:00Z"), "'ts' must be integer milliseconds"),
    ("ts in seconds", with_(ts=1732240000), "outside 2000-01-01..2100-01-01"),
    ("unknown quality", with_(quality="ok"), "'quality' must be one of"),
    ("points as list", with_(points=[1.0]), "'points' must be an object"),
    ("point as string", with_(points={"pdu.power_kw": "66.1"}), "point 'pdu.power_kw' must be a number"),
    ("point as bool", with_(points={"pdu.power_kw": True}), "point 'pdu.power_kw' must be a number"),
    ("pq as string", with_(pq="bad"), "'pq' must be an object"),
    ("pq unknown quality", with_(pq={"pdu.power_kw": "meh"}), "pq['pdu.power_kw'] must be one of"),
]


@pytest.mark.parametrize("data, reason", [(d, r) for _, d, r in BAD], ids=[name for name, _, _ in BAD])
def test_decode_rejects_with_a_reason(data, reason):
    with pytest.raises(EnvelopeError) as info:
        decode_envelope(data)
    assert reason in info.value.reason
    assert "\n" not in info.value.reason  # one line: it goes into a dead letter and a log line


@pytest.mark.parametrize("data", [d for _, d, _ in BAD if d], ids=[n for n, d, _ in BAD if d])
def test_schema_rejects_what_the_decoder_rejects(data):
    try:
        env = orjson.loads(data)
    except orjson.JSONDecodeError:
        return  # not JSON at all: nothing for the schema to judge
    assert not VALIDATOR.is_valid(env)


def test_good_envelope_passes_both():
    assert decode_envelope(GOOD_BYTES) == GOOD
    VALIDATOR.validate(GOOD)
    # additive fields are ignored by v1 consumers
    assert decode_envelope(with_(firmware="1.2"))["device"] == "pdu-m1-r01-a"
    assert decode_envelope(with_(points={"a.count": 3}))["points"] == {"a.count": 3}


def test_encode_round_trip_and_key():
    reading = Reading("demo", "cdu-01", 12, 1732240000123, {"cdu.flow_lpm": 120.5, "cdu.supply_temp_c": float("nan")},
                      Quality.GOOD, {"cdu.supply_temp_c": Quality.BAD})
    data = encode_reading(reading)
    VALIDATOR.validate(orjson.loads(data))
    back = decode_reading(data)
    assert back.points == {"cdu.flow_lpm": 120.5, "cdu.supply_temp_c": None}
    assert (back.device, back.seq, back.ts_ms, back.point_quality) == ("cdu-01", 12, 1732240000123,
                                                                         {"cdu.supply_temp_c": Quality.BAD})
    assert reading_key(reading) == b"cdu-01"


def test_dead_letter_shape_and_truncation():
    schema = jsonschema.Draft202012Validator(load_schema("deadletter"))
    small = dead_letter(b"{bad", "payload is not JSON", "mqtt_collector", topic="podwatch/demo/x", ts_ms=1)
    schema.validate(small)
    assert base64.b64decode(small["payload_b64"]) == b"{bad"
    assert "payload_truncated" not in small and small["payload_bytes"] == 4
    blob = b"x" * (1024 * 1024)
    big = dead_letter(blob, "too large", "mqtt_collector", partition=2, offset=9, device="cdu-01")
    schema.validate(big)
    assert big["payload_truncated"] is True and big["payload_bytes"] == len(blob)
    assert len(base64.b64decode(big["payload_b64"])) == MAX_DEAD_LETTER_PAYLOAD_BYTES
    assert big["meta"] == {"device": "cdu-01"}


def test_alert_event_needs_its_identity():
    key, value = encode_alert_event({"alert_id": "a1", "rule": "r", "state": "firing", "ts": "2026-11-22T03:00:00+00:00"})
    assert key == b"a1" and orjson.loads(value)["v"] == 1
    jsonschema.Draft202012Validator(load_schema("alert")).validate(orjson.loads(value))
    with pytest.raises(EnvelopeError, match="alert_id"):
        encode_alert_event({"rule": "r", "state": "firing", "ts": "x"})
