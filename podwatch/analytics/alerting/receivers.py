"""Alert receivers: Alertmanager API v2, a signed generic webhook, e-mail over SMTP, and the
Kafka publisher (`podwatch.alerts.v1`) wrapped as a receiver so it gets the outbox too.

A receiver is small (Telegraf-style): `send(entries)` delivers a batch of outbox entries in
order and returns only when the other side acknowledged them, or raises `DeliveryError`
(`retriable` = a later attempt may work: connection refused, timeout, HTTP 5xx/429/408, SMTP
4xx; not retriable: HTTP 4xx, SMTP 5xx). Retries, backoff and ordering live once in
`outbox.OutboxDispatcher`. `periodic()` is called after each delivery pass when the receiver's
queue is empty (Alertmanager uses it to resend firing alerts). `aclose()` is idempotent.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import smtplib
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import TYPE_CHECKING

import httpx

from podwatch.analytics.alerting.model import parse_iso
from podwatch.analytics.alerting.outbox import DeliveryError, OutboxEntry
from podwatch.analytics.alerting.rules import CASCADE_LABEL, CAUSE_LABEL
from podwatch.analytics.alerting.settings import (
    SEVERITY_RANK,
    AlertingSettings,
    AlertmanagerReceiverSettings,
    EmailReceiverSettings,
    WebhookReceiverSettings,
)

if TYPE_CHECKING:
    import duckdb

SIGNATURE_HEADER = "X-Podwatch-Signature"
DELIVERY_HEADER = "X-Podwatch-Delivery"
RETRIABLE_HTTP = {408, 425, 429}


def sign_body(secret: bytes, body: bytes) -> str:
    """`sha256=<hex HMAC-SHA256 of body>`: the webhook signature header value."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, header_value: str) -> bool:
    """Constant-time check of a webhook signature (for receivers written in Python)."""
    return hmac.compare_digest(sign_body(secret, body), header_value or "")


class Receiver:
    name: str
    max_batch: int = 1
    # Whether the receiver also gets `update` events: a firing alert whose annotations changed
    # without a transition (cause attribution). Only receivers that keep state by alert take them.
    takes_updates: bool = False
    # Skip symptom alerts that fired with a probable cause (settings `skip_explained`).
    skip_explained: bool = False
    states: frozenset[str] = frozenset({"firing", "resolved"})
    min_severity: str = "info"

    def wants(self, event: dict) -> bool:
        """Only alerts that fired reach people; `pending` only if configured."""
        if event["state"] not in self.states:
            return False
        if event["state"] == "resolved" and not event.get("firedAt"):
            return False  # a pending alert that cleared before its hold time: nobody was told
        labels = event.get("labels", {})
        if self.skip_explained and labels.get(CAUSE_LABEL) and labels.get(CASCADE_LABEL) == "symptom":
            return False  # the CDU alert that explains it names this rack
        return SEVERITY_RANK.get(event.get("severity", "info"), 0) >= SEVERITY_RANK[self.min_severity]

    async def send(self, entries: Sequence[OutboxEntry]) -> None:
        raise NotImplementedError

    async def send_test(self, event: dict) -> None:
        await self.send([OutboxEntry(self.name, 0, event["alert_id"], event)])

    async def periodic(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _http_error(exc: Exception, what: str) -> DeliveryError:
    return DeliveryError(f"{what}: {type(exc).__name__}: {exc}", retriable=True)


def _check_status(resp: httpx.Response, what: str) -> None:
    if 200 <= resp.status_code < 300:
        return
    retriable = resp.status_code >= 500 or resp.status_code in RETRIABLE_HTTP
    raise DeliveryError(f"{what}: HTTP {resp.status_code} {resp.text[:200]!r}", retriable=retriable)


class _HttpReceiver(Receiver):
    def __init__(self, timeout_s: float) -> None:
        self._client: httpx.AsyncClient | None = None
        self._timeout_s = timeout_s

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout_s)
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


class AlertmanagerReceiver(_HttpReceiver):
    """POSTs alerts to Alertmanager's API v2. Alertmanager keeps state by label set, so a batch
    is collapsed to the newest event per alert. Firing alerts get `endsAt = now + 4 x
    resend_interval` and are resent every `resend_interval` (from the `alerts` table when a
    connection is given), as Prometheus does, so Alertmanager neither forgets them nor resolves
    them on its own while podwatch is alive; resolved alerts get `endsAt` = resolve time, never
    later than now (Alertmanager compares endsAt with its wall clock)."""

    max_batch = 64
    takes_updates = True  # the same labels again: Alertmanager just updates the annotations

    def __init__(self, settings: AlertmanagerReceiverSettings, generator_url: str = "",
                 con: "duckdb.DuckDBPyConnection | None" = None) -> None:
        super().__init__(settings.timeout_s)
        self.settings = settings
        self.name = settings.name
        self.states = frozenset(settings.states) - {"pending"}
        self.min_severity = settings.min_severity
        self.generator_url = generator_url.rstrip("/")
        self._con = con
        self._last_resend = time.monotonic()
        self.resends = 0

    def to_alertmanager(self, event: dict, now: datetime | None = None) -> dict:
        now = now or datetime.now(UTC)
        labels = {k: str(v) for k, v in event["labels"].items() if v not in (None, "")}
        annotations = {k: str(v) for k, v in event.get("annotations", {}).items() if v not in (None, "")}
        if event.get("value") is not None:
            annotations.setdefault("value", f"{event['value']:g}")
        starts = parse_iso(event["startsAt"]) or now
        if event["state"] == "resolved":
            ends = min(parse_iso(event.get("endsAt")) or now, now)
        else:
            ends = now + timedelta(seconds=4 * self.settings.resend_interval_s)
        starts = min(starts, ends)
        return {"labels": labels, "annotations": annotations, "startsAt": starts.isoformat(), "endsAt": ends.isoformat(),
                "generatorURL": f"{self.generator_url}/api/alerts?alert_id={event['alert_id']}"}

    async def post(self, alerts: list[dict]) -> None:
        url = f"{self.settings.url}/api/v2/alerts"
        try:
            resp = await self.client.post(url, json=alerts)
        except httpx.HTTPError as exc:
            raise _http_error(exc, f"POST {url}") from None
        _check_status(resp, f"POST {url}")

    async def send(self, entries: Sequence[OutboxEntry]) -> None:
        newest: dict[str, dict] = {}
        for entry in entries:
            newest.pop(entry.alert_id, None)
            newest[entry.alert_id] = entry.event
        now = datetime.now(UTC)
        await self.post([self.to_alertmanager(e, now) for e in newest.values()])

    async def periodic(self) -> None:
        if self._con is None or time.monotonic() - self._last_resend < self.settings.resend_interval_s:
            return
        from podwatch.analytics.alerting.store import firing_events

        events = [e for e in firing_events(self._con) if self.wants(e)]
        self._last_resend = time.monotonic()
        if events:
            now = datetime.now(UTC)
            await self.post([self.to_alertmanager(e, now) for e in events])
            self.resends += 1


class WebhookReceiver(_HttpReceiver):
    """One POST per event: body = the alert event JSON, `X-Podwatch-Signature: sha256=<hex>`
    (HMAC-SHA256 of the exact body bytes with the configured secret), `X-Podwatch-Delivery:
    <receiver>-<seq>` (idempotency key: the same value on a repeated delivery)."""

    def __init__(self, settings: WebhookReceiverSettings) -> None:
        super().__init__(settings.timeout_s)
        self.settings = settings
        self.name = settings.name
        self.states = frozenset(settings.states)
        self.min_severity = settings.min_severity
        self.skip_explained = settings.skip_explained
        self._secret = settings.secret_bytes()

    async def send(self, entries: Sequence[OutboxEntry]) -> None:
        for entry in entries:
            body = json.dumps(entry.event, separators=(",", ":"), ensure_ascii=False).encode()
            headers = {"Content-Type": "application/json", DELIVERY_HEADER: f"{self.name}-{entry.seq}",
                       **self.settings.headers}
            if self._secret is not None:
                headers[SIGNATURE_HEADER] = sign_body(self._secret, body)
            try:
                resp = await self.client.post(self.settings.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                raise _http_error(exc, f"POST {self.settings.url}") from None
            _check_status(resp, f"POST {self.settings.url}")


def format_email(event: dict, settings: EmailReceiverSettings) -> EmailMessage:
    ann = event.get("annotations", {})
    state = event["state"].upper()
    msg = EmailMessage()
    msg["From"] = settings.sender
    msg["To"] = ", ".join(settings.to)
    msg["Subject"] = f"{settings.subject_prefix} [{state}] {event['severity']}: {ann.get('summary') or event['rule']}"
    msg["X-Podwatch-Alert-Id"] = event["alert_id"]
    lines = [f"{state}: {ann.get('summary', event['rule'])}", ""]
    if ann.get("description"):
        lines += [ann["description"], ""]
    if event.get("reasons"):
        lines += ["Reasons:", *[f"  - {r}" for r in event["reasons"]], ""]
    # Cause attribution (engine.py): a rack alert's probable cause, a CDU alert's racks.
    for key, title in (("probable_cause", "Probable cause"), ("affected_racks", "Affected racks"),
                       ("racks", "Cooling loop")):
        if ann.get(key):
            lines += [f"{title}:", f"  {ann[key]}", ""]
    if ann.get("runbook"):
        lines += ["What to do:", f"  {ann['runbook']}", ""]
    lines += [f"Rule:     {event['rule']}", f"Target:   {event['target']}", f"Severity: {event['severity']}",
              f"Value:    {event.get('value')}", f"Started:  {event.get('startsAt')}"]
    if event.get("endsAt"):
        lines.append(f"Resolved: {event['endsAt']}")
    if event.get("flapping"):
        lines.append("Flapping: yes (resolves only once stably clear)")
    lines += ["Labels:   " + ", ".join(f"{k}={v}" for k, v in sorted(event.get("labels", {}).items())),
              f"Alert id: {event['alert_id']}"]
    msg.set_content("\n".join(lines) + "\n")
    return msg


class EmailReceiver(Receiver):
    """One e-mail per event over SMTP (stdlib smtplib, run in a worker thread)."""

    def __init__(self, settings: EmailReceiverSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.states = frozenset(settings.states)
        self.min_severity = settings.min_severity
        self.skip_explained = settings.skip_explained
        self._password = settings.password_value()

    def _tls_context(self) -> ssl.SSLContext:
        s = self.settings
        context = ssl.create_default_context(cafile=str(s.tls_ca_file) if s.tls_ca_file else None)
        if not s.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _send_sync(self, messages: list[EmailMessage]) -> None:
        s = self.settings
        try:
            if s.security == "ssl":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout_s, context=self._tls_context())
            else:
                smtp = smtplib.SMTP(s.host, s.port, timeout=s.timeout_s)
            with smtp:
                if s.security == "starttls":
                    smtp.starttls(context=self._tls_context())
                if s.username:
                    smtp.login(s.username, self._password or "")
                for message in messages:
                    smtp.send_message(message)
        except smtplib.SMTPNotSupportedError as exc:
            raise DeliveryError(f"SMTP {s.host}:{s.port}: {exc} (check `security`)", retriable=False) from None
        except smtplib.SMTPAuthenticationError as exc:
            raise DeliveryError(f"SMTP {s.host}:{s.port}: authentication failed: {exc.smtp_code} {exc.smtp_error!r}",
                                retriable=False) from None
        except smtplib.SMTPRecipientsRefused as exc:
            codes = {r: c for r, (c, _) in exc.recipients.items()}
            raise DeliveryError(f"SMTP {s.host}:{s.port}: recipients refused {codes}",
                                retriable=all(400 <= c < 500 for c in codes.values())) from None
        except smtplib.SMTPResponseException as exc:
            raise DeliveryError(f"SMTP {s.host}:{s.port}: {exc.smtp_code} {exc.smtp_error!r}",
                                retriable=400 <= exc.smtp_code < 500) from None
        except ssl.SSLCertVerificationError as exc:
            raise DeliveryError(f"SMTP {s.host}:{s.port}: TLS certificate not trusted: {exc.verify_message} "
                                "(set tls_ca_file)", retriable=False) from None
        except (smtplib.SMTPException, OSError) as exc:  # connection refused/reset, timeout, disconnect
            raise DeliveryError(f"SMTP {s.host}:{s.port}: {type(exc).__name__}: {exc}", retriable=True) from None

    async def send(self, entries: Sequence[OutboxEntry]) -> None:
        messages = [format_email(e.event, self.settings) for e in entries]
        await asyncio.to_thread(self._send_sync, messages)


class PublishReceiver(Receiver):
    """Wraps the injected Kafka publisher (`publish(event) -> Awaitable[None | bool]`, e.g. the
    stream stage's `TelemetryProducer.send_alert_event`, which returns once the event is acked or
    spooled, and False if it dropped it) so alert events reach `podwatch.alerts.v1` through the outbox:
    every transition (pending included), in order, retried while Kafka is unreachable."""

    def __init__(self, publish: Callable[[dict], Awaitable[object]], name: str = "kafka") -> None:
        self.name = name
        self.states = frozenset({"pending", "firing", "resolved"})
        self._publish = publish

    def wants(self, event: dict) -> bool:
        return True

    async def send(self, entries: Sequence[OutboxEntry]) -> None:
        for entry in entries:
            try:
                result = await self._publish(entry.event)
            except Exception as exc:
                # Errors that know carry `retriable`; a bad event (ValueError, e.g. the stream's
                # EnvelopeError) never gets better; anything else may be an outage.
                retriable = getattr(exc, "retriable", None)
                if retriable is None:
                    retriable = not isinstance(exc, (ValueError, TypeError))
                raise DeliveryError(f"publish to podwatch.alerts.v1: {type(exc).__name__}: {exc}",
                                    retriable=bool(retriable)) from None
            if result is False:  # TelemetryProducer.send_alert_event: dropped for good (counted there)
                raise DeliveryError("publish to podwatch.alerts.v1: the producer dropped the event "
                                    "(see the kafka_producer health counters)", retriable=False)


def build_receivers(settings: AlertingSettings, con: "duckdb.DuckDBPyConnection | None" = None) -> list[Receiver]:
    out: list[Receiver] = []
    for rs in settings.receivers:
        if isinstance(rs, AlertmanagerReceiverSettings):
            out.append(AlertmanagerReceiver(rs, settings.generator_url, con))
        elif isinstance(rs, WebhookReceiverSettings):
            out.append(WebhookReceiver(rs))
        else:
            out.append(EmailReceiver(rs))
    return out
