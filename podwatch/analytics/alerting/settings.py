"""Alerting settings: the rules file, the receivers and the delivery policy (YAML, validated).

    rules_file: /etc/podwatch/site-rules.yaml      # optional; merged over the shipped defaults
    generator_url: http://podwatch.example:8080    # link back to the HTTP API in notifications
    retry: {initial_backoff: 500ms, max_backoff: 1m}
    receivers:
      - {type: alertmanager, name: am, url: http://127.0.0.1:9093, resend_interval: 1m}
      - {type: webhook, name: ops-hook, url: https://hooks.example/podwatch, secret_env: PODWATCH_HOOK_SECRET}
      - {type: email, name: facilities-mail, host: smtp.example, port: 587, security: starttls,
         username: podwatch, password_env: PODWATCH_SMTP_PASSWORD, sender: podwatch@example, to: [facilities@example]}

Receiver names must be unique: they key the outbox queues (`alert_outbox.receiver`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from podwatch.analytics.alerting.rules import _pydantic_errors, parse_duration_s
from podwatch.errors import ConfigError

EventState = Literal["pending", "firing", "resolved"]
Severity = Literal["info", "warning", "critical"]
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _dur(v: Any) -> float:
    return parse_duration_s(v)


class _ReceiverBase(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Unique receiver name (keys its outbox queue)")
    states: list[EventState] = Field(["firing", "resolved"], description="Which transitions this receiver gets")
    min_severity: Severity = Field("info", description="Skip alerts below this severity")
    timeout_s: float = Field(5.0, alias="timeout", gt=0, description="Per-request timeout")

    @field_validator("timeout_s", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> float:
        return _dur(v)


class AlertmanagerReceiverSettings(_ReceiverBase):
    """Prometheus Alertmanager, API v2 (`POST {url}/api/v2/alerts`)."""

    type: Literal["alertmanager"]
    url: str = Field(description="Alertmanager base URL, e.g. http://127.0.0.1:9093")
    resend_interval_s: float = Field(60.0, alias="resend_interval", gt=0,
                                     description="Resend firing alerts this often; endsAt = now + 4 x this (as Prometheus does)")

    @field_validator("resend_interval_s", mode="before")
    @classmethod
    def _resend(cls, v: Any) -> float:
        return _dur(v)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v.rstrip("/")


class WebhookReceiverSettings(_ReceiverBase):
    """A generic webhook: one POST per event, JSON body, `X-Podwatch-Signature: sha256=<hex>`."""

    type: Literal["webhook"]
    url: str
    secret: str | None = Field(None, description="HMAC-SHA256 key for the signature header")
    secret_env: str | None = Field(None, description="Environment variable holding the secret (preferred over `secret`)")
    headers: dict[str, str] = Field(default_factory=dict)
    skip_explained: bool = Field(
        False, description="Skip rack (symptom) alerts that fired with a probable cause on their CDU (label "
                           "probable_cause): the CDU alert lists their racks. Their firing and resolved events are "
                           "skipped alike (the label is fixed once an alert fires)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL, got {v!r}")
        return v

    def secret_bytes(self) -> bytes | None:
        if self.secret_env:
            value = os.environ.get(self.secret_env)
            if value is None:
                raise ConfigError(f"receiver {self.name}", [f"secret_env: environment variable {self.secret_env} is not set"])
            return value.encode()
        return self.secret.encode() if self.secret is not None else None


class EmailReceiverSettings(_ReceiverBase):
    """E-mail over SMTP (stdlib smtplib in a worker thread)."""

    type: Literal["email"]
    host: str
    port: int = Field(587, ge=1, le=65535)
    security: Literal["none", "starttls", "ssl"] = Field("starttls", description="none | starttls | ssl (SMTPS)")
    username: str | None = None
    password: str | None = None
    password_env: str | None = None
    sender: str = Field(description="From address")
    to: list[str] = Field(min_length=1, description="Recipient addresses")
    subject_prefix: str = "[podwatch]"
    tls_ca_file: Path | None = Field(None, description="CA bundle to verify the server's certificate (e.g. an internal CA)")
    tls_verify: bool = Field(True, description="Verify the server certificate and host name (turn off only for tests)")
    skip_explained: bool = Field(
        False, description="Skip rack (symptom) alerts that fired with a probable cause on their CDU (label "
                           "probable_cause): the CDU alert lists their racks. Their firing and resolved events are "
                           "skipped alike (the label is fixed once an alert fires)")

    @model_validator(mode="after")
    def _auth(self) -> "EmailReceiverSettings":
        if (self.password is not None or self.password_env) and not self.username:
            raise ValueError("password given without username")
        return self

    def password_value(self) -> str | None:
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"receiver {self.name}", [f"password_env: environment variable {self.password_env} is not set"])
            return value
        return self.password


ReceiverSettings = Annotated[
    AlertmanagerReceiverSettings | WebhookReceiverSettings | EmailReceiverSettings, Field(discriminator="type")]


class RetrySettings(_Model):
    initial_backoff_s: float = Field(0.5, alias="initial_backoff", gt=0)
    max_backoff_s: float = Field(60.0, alias="max_backoff", gt=0)

    @field_validator("initial_backoff_s", "max_backoff_s", mode="before")
    @classmethod
    def _d(cls, v: Any) -> float:
        return _dur(v)


class AlertingSettings(_Model):
    enabled: bool = True
    rules_file: Path | None = Field(None, description="Site rules merged over the shipped defaults by id")
    receivers: list[ReceiverSettings] = Field(default_factory=list)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    delivery_interval_s: float = Field(0.5, alias="delivery_interval", gt=0, description="Outbox delivery pass period")
    outbox_retention_s: float = Field(7 * 86400.0, alias="outbox_retention", gt=0, description="Keep delivered outbox rows this long")
    generator_url: str = Field("http://127.0.0.1:8080", description="Base URL of the podwatch HTTP API, linked from notifications")
    publish_to_kafka: bool = Field(True, description="Publish every transition to podwatch.alerts.v1 when a publisher is given")

    @field_validator("delivery_interval_s", "outbox_retention_s", mode="before")
    @classmethod
    def _d(cls, v: Any) -> float:
        return _dur(v)

    @model_validator(mode="after")
    def _unique(self) -> "AlertingSettings":
        names = [r.name for r in self.receivers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"receiver names must be unique: {', '.join(dupes)}")
        if "kafka" in names:
            raise ValueError("receiver name 'kafka' is reserved for the podwatch.alerts.v1 publisher")
        return self


def load_settings(path: str | Path) -> AlertingSettings:
    """Read alerting settings from YAML; `alerting:` may wrap them. Relative rules_file is
    resolved against the settings file's folder. Raises ConfigError with every field path."""
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from None
    return settings_from_dict(data or {}, source, base=Path(path).parent)


def _receiver_name_errors(receivers: Any, prefix: str) -> list[str]:
    """Duplicate / reserved receiver names, each at its `receivers[i].name`."""
    errors: list[str] = []
    first: dict[str, int] = {}
    for i, r in enumerate(receivers if isinstance(receivers, list) else []):
        name = r.get("name") if isinstance(r, dict) else None
        if not isinstance(name, str):
            continue
        where = f"{prefix}receivers[{i}].name"
        if name == "kafka":
            errors.append(f"{where}: 'kafka' is reserved for the podwatch.alerts.v1 publisher; choose another name")
        elif name in first:
            errors.append(f"{where}: '{name}' is used by receivers[{first[name]}] too; receiver names must be unique")
        first.setdefault(name, i)
    return errors


def _settings_errors(exc: ValidationError, prefix: str) -> list[str]:
    """pydantic errors with the YAML path: the receiver's union tag (`receivers[0].webhook.url`) left out."""
    tags = {"alertmanager", "webhook", "email"}
    errors = []
    for err in exc.errors():
        loc = err["loc"]
        if len(loc) > 2 and loc[0] == "receivers" and isinstance(loc[1], int) and loc[2] in tags:
            err = {**err, "loc": loc[:2] + loc[3:]}
        errors.append(err)

    return _pydantic_errors(_ErrorList(errors), prefix.rstrip("."))


class _ErrorList:
    """Duck-types ValidationError.errors() for `_pydantic_errors`."""

    def __init__(self, errors: list[dict]) -> None:
        self._errors = errors

    def errors(self) -> list[dict]:
        return self._errors


def settings_from_dict(data: Any, source: str = "<alerting settings>", base: Path | None = None) -> AlertingSettings:
    prefix = ""
    if isinstance(data, dict) and set(data) == {"alerting"}:
        data, prefix = data["alerting"], "alerting."
    if not isinstance(data, dict):
        raise ConfigError(source, [f"{prefix.rstrip('.') or '<root>'}: expected a mapping of alerting settings"])
    name_errors = _receiver_name_errors(data.get("receivers"), prefix)
    try:
        settings = AlertingSettings.model_validate(data)
    except ValidationError as exc:
        errors = _settings_errors(exc, prefix)
        if name_errors:  # reported with their paths instead of the model-level message
            errors = [e for e in errors if not e.startswith(("<root>: receiver name", f"{prefix.rstrip('.')}: receiver name"))]
        raise ConfigError(source, errors + name_errors) from None
    if settings.rules_file is not None and base is not None and not settings.rules_file.is_absolute():
        settings.rules_file = base / settings.rules_file
    return settings


def settings_for(alertmanager_url: str | None = None, *, rules_file: str | Path | None = None,
                 generator_url: str | None = None, config_file: str | Path | None = None) -> AlertingSettings:
    """Settings for `podwatch serve` flags: a settings file if given, else defaults; an
    `--alertmanager URL` adds (or replaces the URL of) an Alertmanager receiver named `alertmanager`."""
    settings = load_settings(config_file) if config_file is not None else AlertingSettings()
    updates: dict[str, Any] = {}
    if rules_file is not None:
        updates["rules_file"] = Path(rules_file)
    if generator_url is not None:
        updates["generator_url"] = generator_url
    if alertmanager_url is not None:
        receivers = [r for r in settings.receivers if r.name != "alertmanager"]
        try:
            receivers.append(AlertmanagerReceiverSettings(type="alertmanager", name="alertmanager", url=alertmanager_url))
        except ValidationError as exc:
            raise ConfigError("--alertmanager", _pydantic_errors(exc, "alertmanager")) from None
        updates["receivers"] = receivers
    return settings.model_copy(update=updates)
