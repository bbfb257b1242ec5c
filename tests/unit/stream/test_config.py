"""KafkaSettings: validation messages and what is passed through to aiokafka."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from podwatch.stream.config import KafkaSettings


def test_defaults_suit_tansu():
    kw = KafkaSettings(bootstrap_servers="127.0.0.1:9092").producer_kwargs()
    assert kw["acks"] == "all" and kw["enable_idempotence"] is False and kw["compression_type"] == "zstd"
    assert kw["security_protocol"] == "PLAINTEXT" and "sasl_mechanism" not in kw


def test_sasl_settings_pass_through():
    s = KafkaSettings(bootstrap_servers="kafka:9093", security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                      sasl_plain_username="podwatch", sasl_plain_password="secret", enable_idempotence=True)
    kw = s.producer_kwargs()
    assert (kw["sasl_mechanism"], kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("SCRAM-SHA-512", "podwatch", "secret")
    assert kw["enable_idempotence"] is True
    assert s.consumer_kwargs()["sasl_plain_username"] == "podwatch"
    assert "secret" not in repr(s)  # never logged


def test_tls_builds_an_ssl_context(tmp_path):
    import ssl

    s = KafkaSettings(bootstrap_servers="kafka:9093", security_protocol="SSL")
    assert isinstance(s.producer_kwargs()["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize("kwargs, message", [
    ({"security_protocol": "SASL_SSL"}, "needs sasl_mechanism"),
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}, "needs sasl_plain_username"),
    ({"ssl_certfile": "/tmp/c.pem"}, "ssl_certfile and ssl_keyfile go together"),
    ({"retry_backoff_min_s": 5, "retry_backoff_max_s": 1}, "retry_backoff_max_s"),
    ({"spool_segment_bytes": 10, "spool_max_bytes": 5}, "spool_segment_bytes"),
    ({"compression_type": "brotli"}, "compression_type"),
    ({"acks": "some"}, "acks"),
    ({"linger_msec": 5}, "linger_msec"),  # extra="forbid": a typo is an error, not ignored
])
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValidationError) as info:
        KafkaSettings(**kwargs)
    assert message in str(info.value)


def test_load_from_file_with_overrides(tmp_path):
    from podwatch.stream.config import load_kafka_settings

    path = tmp_path / "kafka.yaml"
    path.write_text("security_protocol: SASL_SSL\nsasl_mechanism: PLAIN\nsasl_plain_username: pw\n"
                    "sasl_plain_password: s3cret\nenable_idempotence: true\n")
    s = load_kafka_settings(path, bootstrap_servers="kafka:9093", client_id=None)
    assert (s.bootstrap_servers, s.client_id, s.enable_idempotence) == ("kafka:9093", "podwatch", True)


def test_load_reports_every_bad_field(tmp_path):
    from podwatch.errors import ConfigError
    from podwatch.stream.config import load_kafka_settings

    path = tmp_path / "kafka.yaml"
    path.write_text("linger_ms: -1\ncompression: zstd\nsecurity_protocol: SASL_SSL\n")
    with pytest.raises(ConfigError) as info:
        load_kafka_settings(path)
    text = "\n".join(info.value.errors)
    assert "linger_ms" in text and "compression" in text
    path.write_text("security_protocol: SASL_SSL\nssl_certfile: /c.pem\n")
    with pytest.raises(ConfigError) as info:
        load_kafka_settings(path)
    assert len(info.value.errors) == 2  # both cross-field problems, one line each
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_kafka_settings(path)
