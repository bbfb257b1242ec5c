"""Receivers against real servers on loopback: the signed webhook, e-mail through aiosmtpd, and
no loss while a receiver is down (refused connections, then 503, across an engine restart):
everything is delivered after recovery, in order, each once."""

from __future__ import annotations

import asyncio
import email
from datetime import UTC, datetime, timedelta
from email import policy

import duckdb
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from podwatch import procs
from podwatch.analytics.alerting import Observation, build_runtime, load_rules
from podwatch.analytics.alerting.receivers import SIGNATURE_HEADER, verify_signature
from podwatch.analytics.alerting.settings import settings_from_dict
from tests.conftest import wait_until
from tests.integration.alerting.conftest import WebhookSink

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

RULES = """
rules:
  - {id: pump_redundancy_lost, for: 0s, clear_for: 0s}
"""
T0 = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)
SECRET = "s3cret-for-tests"


def flaps(n_targets: int) -> list[Observation]:
    """Each target fires then resolves: 2 notifications per target, interleaved over targets."""
    out = []
    for i in range(n_targets):
        out.append(Observation("pump_redundancy_lost", f"cdu-{i}", True, T0 + timedelta(seconds=2 * i), 1.0, {}, [f"pump {i} down"]))
    for i in range(n_targets):
        out.append(Observation("pump_redundancy_lost", f"cdu-{i}", False, T0 + timedelta(seconds=100 + i), 0.0))
    return out


async def test_webhook_signature_verifies(webhook_sink, tmp_path):
    settings = settings_from_dict({"receivers": [{"type": "webhook", "name": "hook", "url": webhook_sink.url, "secret": SECRET}]})
    con = duckdb.connect(str(tmp_path / "a.duckdb"))
    runtime = build_runtime(con, settings, rules=load_rules(text=RULES))
    try:
        events = await runtime.observe(flaps(1)[:1])
        got = await wait_until(webhook_sink.snapshot, timeout=10, what="webhook delivery")
        received = got[0]
        assert received.headers["content-type"] == "application/json"
        assert verify_signature(SECRET.encode(), received.body, received.headers[SIGNATURE_HEADER.lower()])
        assert not verify_signature(b"wrong", received.body, received.headers[SIGNATURE_HEADER.lower()])
        assert not verify_signature(SECRET.encode(), received.body + b" ", received.headers[SIGNATURE_HEADER.lower()])
        body = received.json()
        assert body == next(e for e in events if e["state"] == "firing")
        assert body["reasons"] == ["pump 0 down"] and received.headers["x-podwatch-delivery"] == "hook-1"
    finally:
        await runtime.aclose()
        con.close()


async def test_receiver_down_then_back_gets_everything_in_order_once(tmp_path):
    port = procs.free_port()
    sink = WebhookSink(port)  # not started: connections are refused
    db = str(tmp_path / "a.duckdb")
    settings = settings_from_dict({"receivers": [{"type": "webhook", "name": "hook", "url": sink.url, "secret": SECRET,
                                                  "timeout": "2s"}],
                                   "retry": {"initial_backoff": "20ms", "max_backoff": "200ms"}})
    con = duckdb.connect(db)
    runtime = build_runtime(con, settings, rules=load_rules(text=RULES))
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.dispatcher.run(stop))
    try:
        events = await runtime.observe(flaps(4)[:6])
        health = runtime.dispatcher.health["hook"]
        await wait_until(lambda: health.counters["retries"] >= 3, timeout=10, what="retries while the receiver is down")
        # "Process restart" while the receiver is still down: the outbox is in the DuckDB file.
        stop.set()
        await task
        await runtime.aclose()
        con.close()
        con = duckdb.connect(db)
        runtime = build_runtime(con, settings, rules=load_rules(text=RULES))
        events += await runtime.observe(flaps(4)[6:])
        expected = [e for e in events if e["state"] in ("firing", "resolved")]
        assert len(expected) == 8
        assert runtime.dispatcher.pending_count("hook") == 8
        # The receiver comes back answering 503 for a while: still retried, nothing acknowledged.
        sink.status = 503
        sink.start()
        stop = asyncio.Event()
        task = asyncio.create_task(runtime.dispatcher.run(stop))
        retries = runtime.dispatcher.health["hook"].counters["retries"]
        await wait_until(lambda: runtime.dispatcher.health["hook"].counters["retries"] >= retries + 2, timeout=10,
                         what="retries on 503")
        sink.status = 200
        await wait_until(lambda: runtime.dispatcher.pending_count() == 0, timeout=10, what="delivery after recovery")
        await runtime.deliver()  # one more pass must not resend anything
        got = sink.snapshot()
        assert [r.json() for r in got] == expected  # all, in order, once
        assert [r.headers["x-podwatch-delivery"] for r in got] == [f"hook-{i}" for i in range(1, 9)]
        assert all(verify_signature(SECRET.encode(), r.body, r.headers["x-podwatch-signature"]) for r in got)
        statuses = con.execute("SELECT status, count(*) FROM alert_outbox GROUP BY ALL").fetchall()
        assert statuses == [("delivered", 8)]
    finally:
        stop.set()
        await task
        await runtime.aclose()
        con.close()
        sink.stop()


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.refuse: set[str] = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content, policy=policy.default))
        return "250 Message accepted for delivery"


def _authenticator(server, session, envelope, mechanism, auth_data):
    return AuthResult(success=auth_data.login == b"podwatch" and auth_data.password == b"pw")


@pytest.fixture
def smtp_server():
    mailbox = _Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=procs.free_port(), authenticator=_authenticator,
                            auth_require_tls=False)
    controller.start()
    yield controller, mailbox
    controller.stop()


async def test_email_reaches_smtp_server_with_summary_and_reasons(smtp_server, tmp_path):
    controller, mailbox = smtp_server
    settings = settings_from_dict({"receivers": [
        {"type": "email", "name": "mail", "host": "127.0.0.1", "port": controller.port, "security": "none",
         "username": "podwatch", "password": "pw", "sender": "podwatch@site.test", "to": ["facilities@site.test"]}]})
    con = duckdb.connect(str(tmp_path / "a.duckdb"))
    runtime = build_runtime(con, settings, rules=load_rules(text=RULES))
    try:
        await runtime.observe(flaps(1))
        await wait_until(lambda: len(mailbox.messages) >= 2, timeout=10, what="two e-mails (firing, resolved)")
        firing, resolved = mailbox.messages
        assert firing["Subject"] == "[podwatch] [FIRING] critical: CDU cdu-0: pump redundancy lost"
        assert firing["To"] == "facilities@site.test"
        body = firing.get_content()
        assert "pump 0 down" in body and "What to do:" in body and "Restore or replace the failed pump" in body
        assert resolved["Subject"].startswith("[podwatch] [RESOLVED]")
    finally:
        await runtime.aclose()
        con.close()


async def test_email_refused_recipient_is_dead_not_blocking(smtp_server, tmp_path):
    controller, mailbox = smtp_server
    mailbox.refuse.add("nobody@site.test")
    settings = settings_from_dict({"receivers": [
        {"type": "email", "name": "bad", "host": "127.0.0.1", "port": controller.port, "security": "none",
         "sender": "podwatch@site.test", "to": ["nobody@site.test"]},
        {"type": "email", "name": "good", "host": "127.0.0.1", "port": controller.port, "security": "none",
         "username": "podwatch", "password": "pw", "sender": "podwatch@site.test", "to": ["x@site.test"]}]})
    con = duckdb.connect(str(tmp_path / "a.duckdb"))
    runtime = build_runtime(con, settings, rules=load_rules(text=RULES))
    try:
        await runtime.observe(flaps(1))
        await runtime.deliver()
        rows = con.execute("SELECT receiver, seq, status, last_error FROM alert_outbox ORDER BY receiver, seq").fetchall()
        assert [(r[0], r[1], r[2]) for r in rows] == [("bad", 1, "dead"), ("bad", 2, "dead"),
                                                      ("good", 1, "delivered"), ("good", 2, "delivered")]
        assert "550" in rows[0][3]
        assert len(mailbox.messages) == 2
        assert runtime.dispatcher.health["bad"].counters["errors"] == 2
    finally:
        await runtime.aclose()
        con.close()
    # The dead events are visible to operators, not dropped silently.
    from typer.testing import CliRunner

    from podwatch.cli import app

    result = CliRunner().invoke(app, ["alerts", "outbox", "--db", str(tmp_path / "a.duckdb"), "--dead"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "bad: 0 pending, 0 delivered, 2 dead"
    assert lines[1] == "good: 0 pending, 2 delivered, 0 dead"
    assert lines[2].startswith("dead bad#1 ") and "550" in lines[2]


@pytest.fixture
def tls_smtp_server(tmp_path):
    """aiosmtpd requiring STARTTLS (and TLS before AUTH), with a self-signed certificate for 127.0.0.1."""
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    mailbox = _Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=procs.free_port(), authenticator=_authenticator,
                            tls_context=context, require_starttls=True, auth_require_tls=True)
    controller.start()
    yield controller, mailbox, cert
    controller.stop()


async def test_email_starttls_with_auth(tls_smtp_server, tmp_path):
    controller, mailbox, cert = tls_smtp_server
    common = {"type": "email", "host": "127.0.0.1", "port": controller.port, "security": "starttls",
              "username": "podwatch", "password": "pw", "sender": "podwatch@site.test", "to": ["facilities@site.test"]}
    settings = settings_from_dict({"receivers": [{**common, "name": "trusted", "tls_ca_file": str(cert)},
                                                 {**common, "name": "untrusted"}]})
    con = duckdb.connect(str(tmp_path / "a.duckdb"))
    runtime = build_runtime(con, settings, rules=load_rules(text=RULES))
    try:
        await runtime.observe(flaps(1)[:1])
        await runtime.deliver()
        await wait_until(lambda: len(mailbox.messages) >= 1, timeout=10, what="e-mail over STARTTLS")
        assert mailbox.messages[0]["Subject"].startswith("[podwatch] [FIRING] critical:")
        rows = dict(con.execute("SELECT receiver, status FROM alert_outbox").fetchall())
        assert rows == {"trusted": "delivered", "untrusted": "dead"}
        error = con.execute("SELECT last_error FROM alert_outbox WHERE receiver = 'untrusted'").fetchone()[0]
        assert "certificate not trusted" in error
    finally:
        await runtime.aclose()
        con.close()
