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


@pytest.mark.parametrize("good", ["127.0.0.1:9092", "kafka-1.example:9093,kafka-2.example:9093", "[::1]:9092",
                                  "broker", "b_1:1"])
def test_bootstrap_lists_that_are_accepted(good):
    assert KafkaSettings(bootstrap_servers=good).bootstrap_servers == good


@pytest.mark.parametrize("bad, message", [
    ("a:b:c", "is not host:port"),
    ("127.0.0.1:0", "port '0'"),
    ("127.0.0.1:70000", "port '70000'"),
    ("127.0.0.1:", "port ''"),
    ("host:9092,,other:9092", "is not host:port"),
    ("", "empty"),
    ("http://kafka:9092", "is not host:port"),
])
def test_a_malformed_bootstrap_list_is_a_config_error_naming_the_entry(bad, message):
    from podwatch.errors import ConfigError
    from podwatch.stream.config import load_kafka_settings

    with pytest.raises(ConfigError) as info:
        load_kafka_settings(bootstrap_servers=bad)
    assert "bootstrap_servers" in str(info.value) and message in str(info.value)


@pytest.mark.parametrize("command", [
    ["collect", "--site", "examples/sites/demo.yaml"], ["ingest", "--db", "{tmp}/x.duckdb"],
    ["serve", "--db", "{tmp}/x.duckdb"], ["topics", "create"], ["topics", "list"], ["tail"], ["demo", "--no-ui"],
])
def test_every_kafka_option_rejects_a_malformed_address_before_starting(command, tmp_path):
    from pathlib import Path

    from typer.testing import CliRunner

    from podwatch.cli import app

    root = Path(__file__).parents[3]
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    args = [str(root / a) if a.startswith("examples/") else a for a in args]
    result = CliRunner().invoke(app, [*args, "--kafka", "a:b:c"])
    assert result.exit_code == 2, result.output
    assert "'a:b:c' is not host:port" in result.output
    assert not (tmp_path / "x.duckdb").exists()
