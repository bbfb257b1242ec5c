"""Kafka client settings (`KafkaSettings`): what podwatch passes to aiokafka, plus the producer's
own delivery bounds and spool budget.

Defaults suit the local Tansu broker. For Apache Kafka / Redpanda turn `enable_idempotence` on:
the broker then drops producer retries itself. Tansu (the development broker) refuses aiokafka's
idempotent producer (aiokafka sends InitProducerId v0, Tansu needs v3+), so it is off by default
and correctness never depends on it: the sink drops duplicates by (device, seq).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?)$")


def bootstrap_problem(value: str) -> str | None:
    """Why `value` is not a bootstrap list `host[:port][,host[:port]...]` (IPv6 in brackets),
    or None. Checked up front: a malformed address would otherwise only show as a producer that
    spools forever or a consumer that never connects."""
    if not value.strip():
        return "empty; expected host:port[,host:port]"
    for entry in (e.strip() for e in value.split(",")):
        host, sep, port = entry.rpartition(":") if not entry.endswith("]") else (entry, "", "")
        if not sep:
            host, port = entry, "9092"
        if not _HOST.match(host or ""):
            return f"{entry!r} is not host:port (IPv6 addresses go in brackets: [::1]:9092)"
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            return f"{entry!r}: port {port!r} is not a number in 1..65535"
    return None


def _check_bootstrap(value: str) -> str:
    problem = bootstrap_problem(value)
    if problem:
        raise ValueError(problem)
    return value


BootstrapServers = Annotated[str, AfterValidator(_check_bootstrap)]


class KafkaSettings(BaseModel):
    """Connection, producer and spool settings of the Kafka stream."""

    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: BootstrapServers = Field("127.0.0.1:9092", description="host:port[,host:port] of the brokers")
    client_id: str = Field("podwatch", description="Client id shown in broker logs and quotas")
    acks: Literal["all", 1, 0] = Field("all", description="'all': a send is acked once every in-sync replica has it")
    enable_idempotence: bool = Field(
        False, description="Broker-side dedup of producer retries. Turn on for Apache Kafka / Redpanda; "
                           "Tansu refuses aiokafka's InitProducerId v0, so it is off by default")
    compression_type: Literal["zstd", "lz4", "gzip", "snappy"] | None = Field(
        "zstd", description="Batch compression (zstd: best ratio at nearly no throughput cost)")
    linger_ms: int = Field(5, ge=0, description="How long a batch waits for more records")
    max_batch_size: int = Field(262_144, gt=0, description="Bytes per partition batch")
    max_request_size: int = Field(1_048_576, gt=0, description="Largest produce request / record in bytes")
    request_timeout_ms: int = Field(10_000, gt=0, description="aiokafka request timeout, also the lifetime of a "
                                                              "queued batch before aiokafka fails it")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = Field(None, repr=False)
    ssl_cafile: Path | None = Field(None, description="CA bundle that signed the brokers' certificates")
    ssl_certfile: Path | None = Field(None, description="Client certificate (mutual TLS)")
    ssl_keyfile: Path | None = Field(None, description="Key of the client certificate")

    # podwatch's own delivery bounds (aiokafka's send_and_wait can block through an outage)
    delivery_timeout_s: float = Field(5.0, gt=0, description="A send not acked within this is treated as an "
                                                             "outage: the reading goes to the spool")
    retry_backoff_min_s: float = Field(0.2, gt=0, description="First delay before the spool drainer retries")
    retry_backoff_max_s: float = Field(10.0, gt=0, description="Longest delay between drain retries")
    drain_batch_records: int = Field(5_000, gt=0, description="Spooled records sent per drain round")
    stop_drain_timeout_s: float = Field(5.0, ge=0, description="How long stop() keeps draining the spool to a "
                                                               "reachable broker before leaving the rest on disk")
    spool_max_bytes: int = Field(256 * 1024 * 1024, gt=0, description="Disk budget of the spool; new records "
                                                                      "are refused (counted as dropped) beyond it")
    spool_segment_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Size at which a spool segment file rolls")
    spool_fsync: bool = Field(True, description="fsync spooled records before send() returns (group commit)")
    health_log_interval_s: float = Field(60.0, ge=0, description="Log the producer's health counters this often "
                                                                 "(0: never)")

    @model_validator(mode="after")
    def _check(self) -> "KafkaSettings":
        errors = []
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism is None:
            errors.append(f"security_protocol {self.security_protocol} needs sasl_mechanism")
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and (
                not self.sasl_plain_username or self.sasl_plain_password is None):
            errors.append(f"sasl_mechanism {self.sasl_mechanism} needs sasl_plain_username and sasl_plain_password")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            errors.append("ssl_certfile and ssl_keyfile go together")
        if self.retry_backoff_max_s < self.retry_backoff_min_s:
            errors.append(f"retry_backoff_max_s {self.retry_backoff_max_s} < retry_backoff_min_s {self.retry_backoff_min_s}")
        if self.spool_segment_bytes > self.spool_max_bytes:
            errors.append(f"spool_segment_bytes {self.spool_segment_bytes} > spool_max_bytes {self.spool_max_bytes}")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def _security_kwargs(self) -> dict:
        kw: dict = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            kw["sasl_mechanism"] = self.sasl_mechanism
            if self.sasl_plain_username is not None:
                kw["sasl_plain_username"] = self.sasl_plain_username
                kw["sasl_plain_password"] = self.sasl_plain_password
        if self.security_protocol in ("SSL", "SASL_SSL"):
            from aiokafka.helpers import create_ssl_context

            kw["ssl_context"] = create_ssl_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None,
                certfile=str(self.ssl_certfile) if self.ssl_certfile else None,
                keyfile=str(self.ssl_keyfile) if self.ssl_keyfile else None,
            )
        return kw

    def producer_kwargs(self) -> dict:
        """Keyword arguments of `aiokafka.AIOKafkaProducer`."""
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "acks": self.acks,
            "enable_idempotence": self.enable_idempotence,
            "compression_type": self.compression_type,
            "linger_ms": self.linger_ms,
            "max_batch_size": self.max_batch_size,
            "max_request_size": self.max_request_size,
            "request_timeout_ms": self.request_timeout_ms,
            **self._security_kwargs(),
        }

    def consumer_kwargs(self) -> dict:
        """Keyword arguments of `aiokafka.AIOKafkaConsumer` (connection and security only)."""
        return {"bootstrap_servers": self.bootstrap_servers, "client_id": self.client_id,
                "request_timeout_ms": max(self.request_timeout_ms, 10_000), **self._security_kwargs()}

    def admin_kwargs(self) -> dict:
        """Keyword arguments of `aiokafka.admin.AIOKafkaAdminClient`."""
        return {"bootstrap_servers": self.bootstrap_servers, "client_id": self.client_id,
                "request_timeout_ms": self.request_timeout_ms, **self._security_kwargs()}


def load_kafka_settings(path: str | Path | None = None, **overrides) -> KafkaSettings:
    """KafkaSettings from an optional YAML/JSON file (a mapping of the fields above, e.g. SASL/TLS
    for Apache Kafka), with `overrides` (e.g. bootstrap_servers from `--kafka`) on top. `None`
    overrides are ignored. Raises ConfigError listing every bad field with its name."""
    import yaml
    from pydantic import ValidationError

    from podwatch.errors import ConfigError

    source = str(path) if path is not None else "Kafka settings"
    values: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError(source, [f"not valid YAML/JSON: {exc}"]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(source, [f"expected a mapping of Kafka settings, got {type(loaded).__name__}"])
        values.update(loaded or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return KafkaSettings(**values)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            errors.extend(f"{where}: {m}" if where else m for m in message.split("; "))
        raise ConfigError(source, errors) from None


def kafka_option_callback(value: str | None) -> str | None:
    """typer callback of every `--kafka` option: a malformed bootstrap list is a usage error
    (exit 2, naming the entry) before anything starts."""
    if value is None:
        return None
    problem = bootstrap_problem(value)
    if problem:
        import typer

        raise typer.BadParameter(problem)
    return value
