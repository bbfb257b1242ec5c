"""Small parts of the collectors: sequence numbers, error classes, MQTT topic routes, payload checks."""

import time

import pytest

from podwatch.collectors.modbus import SequenceSource, classify_exception_code
from podwatch.collectors.mqtt import build_route
from podwatch.collectors.profiles import MqttProfile
from podwatch.errors import ConfigError


def test_sequences_count_per_device_from_a_time_base():
    seqs = SequenceSource(start=500)
    assert [seqs.next("a"), seqs.next("a"), seqs.next("b"), seqs.next("a")] == [500, 501, 500, 502]


def test_a_restarted_collector_never_reuses_a_sequence_number():
    first = SequenceSource()
    issued = [first.next("pdu-1") for _ in range(1000)]  # far more than a real device sends in 2 ms
    while time.time_ns() // 1000 <= first.start + len(issued):  # the restart comes later in wall-clock time
        pass
    second = SequenceSource()
    assert second.next("pdu-1") > max(issued)
    assert abs(second.start - time.time_ns() // 1000) < 1_000_000  # microseconds since the epoch


@pytest.mark.parametrize("code,kind", [(1, "illegal"), (2, "illegal"), (3, "illegal"), (4, "device_failure"),
                                       (5, "busy"), (6, "busy"), (10, "gateway"), (11, "gateway"), (99, "device_failure")])
def test_exception_codes_are_classified(code, kind):
    assert classify_exception_code(code) == kind


def mqtt_profile(topic: str, fmt: str = "bms-json") -> MqttProfile:
    return MqttProfile.model_validate({"id": "p", "kind": "rack", "vendor": "v", "model": "m", "format": fmt,
                                       "topic": topic, "points": [{"metric": "rack.power_kw", "point": "P"}]})


def test_tag_path_must_be_the_last_level():
    with pytest.raises(ConfigError, match="tag_path"):
        build_route(mqtt_profile("x/{tag_path}/{point}"), "s1")


def test_unknown_placeholder_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown placeholder"):
        build_route(mqtt_profile("x/{rack}/{point}"), "s1")


def test_site_placeholder_and_literal_levels():
    route = build_route(mqtt_profile("vendor/{site}/{device}/data", "generic-json"), "dc-7")
    assert route.subscription == "vendor/dc-7/+/data"
    assert route.pattern.match("vendor/dc-7/rs.1/data").group("device") == "rs.1"
    assert route.pattern.match("vendor/dc-7/rs.1/data/extra") is None
