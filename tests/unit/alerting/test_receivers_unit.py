"""Receiver pieces without a network: Alertmanager payloads, filtering, backoff, signatures, e-mail text."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest

from podwatch.analytics.alerting.outbox import backoff_s
from podwatch.analytics.alerting.receivers import (
    AlertmanagerReceiver,
    PublishReceiver,
    WebhookReceiver,
    format_email,
    sign_body,
    verify_signature,
)
from podwatch.analytics.alerting.settings import (
    AlertmanagerReceiverSettings,
    EmailReceiverSettings,
    WebhookReceiverSettings,
)

NOW = datetime(2026, 11, 22, 4, 0, tzinfo=UTC)


def event(state="firing", severity="critical", fired=True, **kw):
    ev = {"alert_id": "abc", "rule": "r", "target": "t", "state": state, "severity": severity,
          "labels": {"alertname": "r", "severity": severity, "target": "t", "empty": ""},
          "annotations": {"summary": "S", "reasons": "a; b"}, "value": 41.25, "reasons": ["a", "b"],
          "startsAt": (NOW - timedelta(minutes=5)).isoformat(), "endsAt": None,
          "firedAt": (NOW - timedelta(minutes=3)).isoformat() if fired else None, "ts": NOW.isoformat()}
    ev.update(kw)
    return ev


def am(**kw):
    return AlertmanagerReceiver(AlertmanagerReceiverSettings(type="alertmanager", name="am", url="http://am:9093/", **kw),
                                generator_url="http://api:8080/")


def test_alertmanager_firing_payload():
    out = am(resend_interval="1m").to_alertmanager(event(), NOW)
    assert out["labels"] == {"alertname": "r", "severity": "critical", "target": "t"}  # empty labels dropped
    assert out["annotations"] == {"summary": "S", "reasons": "a; b", "value": "41.25"}
    assert out["startsAt"] == (NOW - timedelta(minutes=5)).isoformat()
    assert out["endsAt"] == (NOW + timedelta(minutes=4)).isoformat()  # 4 x resend_interval
    assert out["generatorURL"] == "http://api:8080/api/alerts?alert_id=abc"


@pytest.mark.parametrize(("ends", "expected"), [
    (NOW - timedelta(seconds=10), NOW - timedelta(seconds=10)),  # resolve time in the past: kept
    (NOW + timedelta(hours=1), NOW),                              # accelerated sample clock ahead: clamped to now
    (None, NOW),
])
def test_alertmanager_resolved_ends_at(ends, expected):
    out = am().to_alertmanager(event("resolved", endsAt=None if ends is None else ends.isoformat()), NOW)
    assert out["endsAt"] == expected.isoformat()


@pytest.mark.parametrize(("ev", "states", "min_severity", "wanted"), [
    (event("firing"), ["firing", "resolved"], "info", True),
    (event("pending", fired=False), ["firing", "resolved"], "info", False),
    (event("pending", fired=False), ["pending", "firing", "resolved"], "info", True),
    (event("resolved", fired=False), ["firing", "resolved"], "info", False),  # never fired: nobody was told
    (event("resolved"), ["firing", "resolved"], "info", True),
    (event("firing", severity="warning"), ["firing", "resolved"], "critical", False),
    (event("firing", severity="critical"), ["firing"], "warning", True),
])
def test_receiver_filter(ev, states, min_severity, wanted):
    hook = WebhookReceiver(WebhookReceiverSettings(type="webhook", name="h", url="http://x/", states=states,
                                                   min_severity=min_severity))
    assert hook.wants(ev) is wanted


def test_alertmanager_never_takes_pending():
    receiver = am(states=["pending", "firing", "resolved"])
    assert not receiver.wants(event("pending", fired=False))


def test_publish_receiver_takes_everything():
    async def publish(e):
        return None
    assert PublishReceiver(publish).wants(event("pending", fired=False))


def test_signature_is_hmac_sha256_of_body():
    body = b'{"a":1}'
    expected = hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert sign_body(b"k", body) == f"sha256={expected}"
    assert verify_signature(b"k", body, f"sha256={expected}")
    assert not verify_signature(b"k", body, "")


@pytest.mark.parametrize("attempts", [1, 2, 5, 20])
def test_backoff_is_jittered_and_capped(attempts):
    values = {round(backoff_s(attempts, 0.5, 10.0), 6) for _ in range(50)}
    ceiling = min(10.0, 0.5 * 2 ** (attempts - 1))
    assert all(ceiling * 0.5 <= v <= ceiling for v in values)
    assert len(values) > 1  # jittered


def test_email_text():
    settings = EmailReceiverSettings(type="email", name="m", host="h", sender="p@x", to=["a@x", "b@x"])
    msg = format_email(event(annotations={"summary": "CDU hot", "runbook": "check pumps", "description": "D"}), settings)
    assert msg["Subject"] == "[podwatch] [FIRING] critical: CDU hot"
    assert msg["To"] == "a@x, b@x"
    body = msg.get_content()
    assert "Reasons:\n  - a\n  - b" in body and "What to do:\n  check pumps" in body and "Alert id: abc" in body


def test_secret_env_must_exist(monkeypatch):
    from podwatch.errors import ConfigError

    monkeypatch.delenv("PW_HOOK_SECRET", raising=False)
    with pytest.raises(ConfigError, match="PW_HOOK_SECRET is not set"):
        WebhookReceiver(WebhookReceiverSettings(type="webhook", name="h", url="http://x/", secret_env="PW_HOOK_SECRET"))
