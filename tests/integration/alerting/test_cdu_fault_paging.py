"""One CDU fault, one page — against the real thing: podwatch's engine and outbox post to a real
Alertmanager (Debian package) whose notifications go to a webhook sink (the pager) and to aiosmtpd
(the facilities mailbox).

The fault: cdu-m1 loses pump redundancy (critical) and four of its racks raise three alerts each
(flow per kW low, ΔT high: warning; thermal risk: critical); meanwhile a rack on cdu-m2 has low
flow on its own. The same alerts go through three Alertmanager configurations:

- `per_alert` — one group per alert (group_by alertname, target): the N pages of the issue;
- `docs_before` — the sample formerly in docs/alerts.md (group_by alertname, site, module, one
  inhibit rule pump_redundancy_lost -> flow_per_kw_low);
- `shipped` — examples/alertmanager/alertmanager.yml as shipped (routes, inhibit rules, templates),
  only its receivers pointed at the test servers and its timings shrunk.

Each run waits on conditions (notifications seen, Alertmanager's own view of inhibited alerts),
then resolves the racks and then the CDU and waits for the all-clear of every group that paged,
so the firing notifications counted are all there will be.

Also with the shipped configuration: the simulator's pump failure (physics, checks, default hold
times) pages once; a rack alert that outlasts its CDU fault notifies on its own, saying so.
"""

from __future__ import annotations

import contextlib
import email
import re
import threading
from datetime import UTC, datetime, timedelta
from email import policy
from pathlib import Path

import duckdb
import httpx
import pytest
import yaml
from aiosmtpd.controller import Controller

from podwatch import procs
from podwatch.analytics.alerting import AlertState, Observation, build_runtime, load_rules
from podwatch.analytics.alerting.settings import settings_from_dict
from podwatch.site import load_site
from tests.conftest import wait_until
from tests.integration.alerting.conftest import WebhookSink, pump_failure_history, replay

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "examples/alertmanager/alertmanager.yml"
# group_wait: Alertmanager routes an alert to its group and feeds its inhibitor in separate
# goroutines; at 100 ms a loaded 2-core machine sometimes flushed the racks' group before the
# inhibitor had the CDU alert of the same POST (or a group before all its alerts were routed).
FAST = {"group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"}
HOLD_OFF = """
rules:
  - {id: pump_redundancy_lost, for: 0s, clear_for: 0s}
  - {id: flow_per_kw_low, for: 0s, clear_for: 0s}
  - {id: delta_t_high, for: 0s, clear_for: 0s}
  - {id: thermal_risk_high, for: 0s, clear_for: 0s}
"""
FAULTY_RACKS = ["m1-r01", "m1-r02", "m1-r03", "m1-r04"]
RACK_RULES = {"flow_per_kw_low": ("flow_per_kw_low", 0.6, "flow 0.60 L/min/kW (design 1.20) at 80 kW"),
              "delta_t_high": ("delta_t_high", 16.0, "ΔT 16.0 K (design 10.0 K at 80 kW)"),
              "thermal_risk_high": ("thermal_risk", 0.9, "return 52.1 °C rising +4.0 K/min")}
PUMP_REASON = "1 of 3 pumps running, 2 needed for full flow, 0 standby left (N+1); pump(s) 2, 3 down"


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self._lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        with self._lock:
            self.messages.append(email.message_from_bytes(envelope.content, policy=policy.default))
        return "250 Message accepted for delivery"

    def snapshot(self) -> list[email.message.EmailMessage]:
        with self._lock:
            return list(self.messages)


@pytest.fixture
def mail_server():
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=procs.free_port())
    controller.start()
    yield controller, mailbox
    controller.stop()


def _shrink(route: dict) -> None:
    for key in FAST:
        if key in route:
            route[key] = FAST[key]
    for child in route.get("routes", []):
        _shrink(child)


def shipped_config(pager_url: str, smtp_port: int) -> dict:
    config = yaml.safe_load(SHIPPED.read_text())
    config["global"].update(smtp_smarthost=f"127.0.0.1:{smtp_port}", smtp_require_tls=False)
    for key in ("smtp_auth_username", "smtp_auth_password_file"):
        config["global"].pop(key)
    _shrink(config["route"])
    receivers = {r["name"]: r for r in config["receivers"]}
    assert set(receivers) == {"facilities-mail", "facilities-pager"}
    receivers["facilities-pager"]["webhook_configs"][0]["url"] = pager_url
    return config


def before_config(group_by: list[str], inhibit: list[dict], pager_url: str, smtp_port: int) -> dict:
    return {
        "global": {"smtp_smarthost": f"127.0.0.1:{smtp_port}", "smtp_from": "alertmanager@example", "smtp_require_tls": False},
        "route": {"receiver": "facilities-mail", "group_by": group_by, **FAST,
                  "routes": [{"matchers": ['severity="critical"'], "receiver": "facilities-pager"}]},
        "receivers": [
            {"name": "facilities-mail", "email_configs": [{"to": "facilities@example", "send_resolved": True}]},
            {"name": "facilities-pager", "webhook_configs": [{"url": pager_url, "send_resolved": True}]}],
        "inhibit_rules": inhibit,
    }


CONFIGS = {
    "per_alert": lambda url, port: before_config(["alertname", "target"], [], url, port),
    "docs_before": lambda url, port: before_config(
        ["alertname", "site", "module"],
        [{"source_matchers": ['alertname="pump_redundancy_lost"'], "target_matchers": ['alertname="flow_per_kw_low"'],
          "equal": ["site", "module"]}], url, port),
    "shipped": shipped_config,
}
# Firing notifications (pages to the pager webhook, mails) for the cdu-m1 fault, and for the cdu-m2 rack.
EXPECTED = {
    "per_alert": {"cdu-m1 pages": 5, "cdu-m1 mails": 8, "cdu-m2 notifications": 1},
    "docs_before": {"cdu-m1 pages": 2, "cdu-m1 mails": 1, "cdu-m2 notifications": 1},
    "shipped": {"cdu-m1 pages": 1, "cdu-m1 mails": 0, "cdu-m2 notifications": 1},
}


def fault(now: datetime, active: bool) -> tuple[list[Observation], list[Observation]]:
    """(rack observations, CDU observation) of the fault, all active or all clear."""
    racks = [Observation(check, rack, active, now, value, reasons=[reason])
             for rack in FAULTY_RACKS for check, value, reason in RACK_RULES.values()]
    racks.append(Observation("flow_per_kw_low", "m2-r01", active, now, 0.6, reasons=["flow 0.60 L/min/kW (design 1.20) at 80 kW"]))
    return racks, [Observation("pump_redundancy_lost", "cdu-m1", active, now, 1.0, reasons=[PUMP_REASON])]


def pages(sink: WebhookSink, status: str) -> list[dict]:
    return sink.am_notifications(status)


def alerts_in(notifications: list[dict]) -> list[dict]:
    return [a for n in notifications for a in n["alerts"]]


# "[FIRING] cdu-m2 demo: Rack ..." (shipped template), "[FIRING:4] delta_t_high m1 demo (...)" (default).
SUBJECT = re.compile(r"^\[(?P<status>FIRING|RESOLVED)(?::\d+)?\] (?P<group>.+?)(?:: | \(|$)")


def mails(mailbox: Mailbox, status: str) -> list[email.message.EmailMessage]:
    return [m for m in mailbox.snapshot() if SUBJECT.match(m["Subject"])["status"] == status.upper()]


def mail_group(message) -> str:
    return SUBJECT.match(message["Subject"])["group"]


def body(message) -> str:
    part = message.get_body(preferencelist=("plain", "html"))  # Alertmanager's default mail is HTML
    return "" if part is None else part.get_content()


def mentions(message, text: str) -> bool:
    return text in message["Subject"] or text in body(message)


@contextlib.asynccontextmanager
async def paging_stack(make_config, smtp_port: int, rules, site, tmp_path: Path):
    """Alertmanager with the configuration `make_config(pager_url, smtp_port)` (pager = a webhook
    sink), and a podwatch alerting runtime posting to it. Yields (Alertmanager URL, runtime, sink)."""
    sink = WebhookSink(procs.free_port()).start()
    config_path = tmp_path / "alertmanager.yml"
    config_path.write_text(yaml.safe_dump(make_config(sink.url, smtp_port), sort_keys=False))
    con = duckdb.connect(str(tmp_path / "site.duckdb"))
    try:
        with procs.alertmanager(config_path, workdir=tmp_path) as am:
            am_url = f"http://{am.address}"
            settings = settings_from_dict({"receivers": [{"type": "alertmanager", "name": "am", "url": am_url}]})
            runtime = build_runtime(con, settings, rules=rules, site=site)
            try:
                yield am_url, runtime, sink
            finally:
                await runtime.aclose()
    finally:
        sink.stop()
        con.close()


@pytest.mark.parametrize("config_name", list(CONFIGS))
async def test_one_cdu_fault_pages_once_with_its_cause(config_name, mail_server, tmp_path):
    controller, mailbox = mail_server
    site = load_site(ROOT / "examples/sites/demo.yaml")
    async with paging_stack(CONFIGS[config_name], controller.port, load_rules(text=HOLD_OFF), site, tmp_path) as stack:
        am_url, runtime, sink = stack
        await run_fault(config_name, runtime, am_url, sink, mailbox)


async def run_fault(config_name: str, runtime, am_url: str, sink: WebhookSink, mailbox: Mailbox) -> None:
    now = datetime.now(UTC)
    racks, cdu = fault(now, True)
    # As the analytics checks emit them: racks first, the CDU after, in one batch.
    events = await runtime.observe(racks + cdu)
    assert sum(e["state"] == "firing" for e in events) == 1 + len(racks)

    # Every alert is at Alertmanager with podwatch's attribution.
    def at_am():
        listed = httpx.get(f"{am_url}/api/v2/alerts").json()
        return listed if len(listed) == 1 + len(racks) else None
    listed = await wait_until(at_am, timeout=10, what="all alerts at Alertmanager")
    by_key = {(a["labels"]["alertname"], a["labels"]["target"]): a for a in listed}
    cdu_alert = by_key[("pump_redundancy_lost", "cdu-m1")]
    assert cdu_alert["labels"]["cascade"] == "cause"
    for rack in FAULTY_RACKS:
        assert f"{rack} (delta_t_high, flow_per_kw_low, thermal_risk_high)" in cdu_alert["annotations"]["affected_racks"]
        rack_alert = by_key[("flow_per_kw_low", rack)]
        assert rack_alert["labels"]["probable_cause"] == "cdu-m1:pump_redundancy_lost"
        assert rack_alert["annotations"]["probable_cause"].startswith("Probably caused by CDU cdu-m1: pump redundancy lost")
    assert "probable_cause" not in by_key[("flow_per_kw_low", "m2-r01")]["labels"]

    expected = EXPECTED[config_name]
    m1_rack_keys = {(r, t) for (r, t) in by_key if t in FAULTY_RACKS}
    if config_name == "shipped":
        # Alertmanager's own view: every rack alert of cdu-m1 inhibited by the CDU alert.
        def inhibited():
            listed = httpx.get(f"{am_url}/api/v2/alerts", params={"filter": 'cdu="cdu-m1"'}).json()
            muted = {(a["labels"]["alertname"], a["labels"]["target"]) for a in listed
                     if a["status"]["state"] == "suppressed" and a["status"]["inhibitedBy"] == [cdu_alert["fingerprint"]]}
            return muted == m1_rack_keys
        await wait_until(inhibited, timeout=10, what="cdu-m1's rack alerts inhibited by pump_redundancy_lost")

    # Wait for what this configuration notifies: the pages and mails of cdu-m1, the cdu-m2 rack.
    def m1_pages():
        return [n for n in pages(sink, "firing") if any(a["labels"]["cdu"] == "cdu-m1" for a in n["alerts"])]

    def m1_mails():
        return [m for m in mails(mailbox, "firing") if mentions(m, "cdu-m1") or any(mentions(m, r) for r in FAULTY_RACKS)]

    def m2_notes():
        return ([n for n in pages(sink, "firing") if any(a["labels"]["cdu"] == "cdu-m2" for a in n["alerts"])]
                + [m for m in mails(mailbox, "firing") if mentions(m, "m2-r01")])

    await wait_until(lambda: len(m1_pages()) >= expected["cdu-m1 pages"] and len(m1_mails()) >= expected["cdu-m1 mails"]
                     and len(m2_notes()) >= expected["cdu-m2 notifications"], timeout=15,
                     what=f"{expected} with the {config_name} configuration")

    # All clear: the racks first, then the CDU; every group that notified sends its resolved
    # notification, after any firing one of the same group (Alertmanager sends a group's
    # notifications one at a time), so the firing notifications are complete once those arrived.
    later = now + timedelta(seconds=1)
    racks_clear, cdu_clear = fault(later, False)
    await runtime.observe(racks_clear)
    await wait_until(lambda: len(httpx.get(f"{am_url}/api/v2/alerts").json()) == 1, timeout=10,
                     what="only the CDU alert still active at Alertmanager")
    await runtime.observe(cdu_clear)
    page_groups = {n["groupKey"] for n in pages(sink, "firing")}
    mail_groups = {mail_group(m) for m in mails(mailbox, "firing")}
    await wait_until(lambda: {n["groupKey"] for n in pages(sink, "resolved")} >= page_groups
                     and {mail_group(m) for m in mails(mailbox, "resolved")} >= mail_groups, timeout=15,
                     what="the all-clear of every group that notified")

    counted = {"cdu-m1 pages": len(m1_pages()), "cdu-m1 mails": len(m1_mails()), "cdu-m2 notifications": len(m2_notes())}
    print(f"{config_name}: {counted} for 1 CDU alert + {len(m1_rack_keys)} rack alerts on cdu-m1, 1 rack alert on cdu-m2")
    assert counted == expected
    if config_name == "shipped":
        (page,) = m1_pages()
        assert page["groupLabels"] == {"site": "demo", "cdu": "cdu-m1"}
        (paged,) = page["alerts"]
        assert paged["labels"]["alertname"] == "pump_redundancy_lost"
        assert PUMP_REASON in paged["annotations"]["reasons"]
        assert "4 of 8 rack(s) on cdu-m1 alerting: m1-r01" in paged["annotations"]["affected_racks"]
        (m2_mail,) = m2_notes()
        assert m2_mail["Subject"].startswith("[FIRING] cdu-m2 demo: Rack m2-r01: coolant flow per kW low")
        text = body(m2_mail)
        assert "Reasons: flow 0.60 L/min/kW (design 1.20) at 80 kW" in text and "Cause:" not in text
        # One all-clear page for the loop. (The racks that resolved while muted are dropped from the
        # group at its next flush, so whether the all-clear lists them depends on timing.)
        (resolved,) = [n for n in pages(sink, "resolved") if n["groupKey"] == page["groupKey"]]
        assert "cdu-m1" in {a["labels"]["target"] for a in resolved["alerts"]}


@pytest.mark.slow
async def test_simulated_pump_failure_pages_once_with_the_shipped_config(mail_server, tmp_path):
    """The simulator's physics through the analytics checks and the default rules (real hold
    times): both duty pumps of cdu-m1 trip at 60 s with no standby; 3 minutes later every alert
    podwatch raised on cdu-m1's racks is inhibited by pump_redundancy_lost and the pager got one
    page for the loop."""
    controller, mailbox = mail_server
    site, samples, _ = pump_failure_history(tmp_path, duration_s=240, cleared_after_s=None)
    async with paging_stack(shipped_config, controller.port, load_rules(), site, tmp_path) as (am_url, runtime, sink):
        await replay(runtime, site, samples)
        firing = [a for a in runtime.engine.active() if a.state is AlertState.FIRING]
        (pump,) = [a for a in firing if a.labels.get("cascade") == "cause"]
        assert (pump.rule.id, pump.target) == ("pump_redundancy_lost", "cdu-m1")
        racks = {(a.rule.id, a.target) for a in firing if a.labels.get("cascade") == "symptom"}
        assert {a.labels["cdu"] for a in firing if (a.rule.id, a.target) in racks} == {"cdu-m1"}
        assert len({t for _, t in racks}) == 8, racks  # every rack of the loop alerts
        attributed = [a for a in firing if a.labels.get("probable_cause") == "cdu-m1:pump_redundancy_lost"]
        assert len(attributed) == len(racks)  # all fired after the pump alert, so all carry the label

        def inhibited():
            listed = httpx.get(f"{am_url}/api/v2/alerts", params={"filter": 'cdu="cdu-m1"'}).json()
            pump_fp = [a["fingerprint"] for a in listed if a["labels"]["alertname"] == "pump_redundancy_lost"]
            muted = {(a["labels"]["alertname"], a["labels"]["target"]) for a in listed
                     if a["status"]["state"] == "suppressed" and a["status"]["inhibitedBy"] == pump_fp}
            return muted == racks
        await wait_until(inhibited, timeout=15, what="every rack alert of cdu-m1 inhibited by the pump alert")
        page = await wait_until(lambda: pages(sink, "firing"), timeout=15, what="the page for cdu-m1")
        print(f"simulated pump failure: {1 + len(racks)} alerts firing on cdu-m1 (1 CDU + {len(racks)} rack); "
              f"pages {len(pages(sink, 'firing'))}, mails {len(mailbox.snapshot())}")
        assert [a["labels"]["alertname"] for a in alerts_in(page)] == ["pump_redundancy_lost"]
        assert page[0]["groupLabels"] == {"site": "demo", "cdu": "cdu-m1"}
        assert mails(mailbox, "firing") == []
        # The pump alert at Alertmanager lists the racks (annotation updates after the page).
        listed = httpx.get(f"{am_url}/api/v2/alerts", params={"filter": 'alertname="pump_redundancy_lost"'}).json()
        assert listed[0]["annotations"]["affected_racks"].startswith("8 of 8 rack(s) on cdu-m1 alerting: m1-r01 (")
        assert listed[0]["annotations"]["racks"].startswith("cdu-m1 cools 8 rack(s): m1-r01, m1-r02")


async def test_a_rack_alert_that_outlasts_its_cdu_fault_notifies_on_its_own(mail_server, tmp_path):
    """The pump is back but m1-r01 still has low flow (its own valve?) and m1-r02 is still at
    thermal risk: no longer inhibited, they notify, saying the cause they fired with has resolved."""
    controller, mailbox = mail_server
    site = load_site(ROOT / "examples/sites/demo.yaml")
    async with paging_stack(shipped_config, controller.port, load_rules(text=HOLD_OFF), site, tmp_path) as stack:
        am_url, runtime, sink = stack
        now = datetime.now(UTC)
        flow_check, flow_value, flow_reason = RACK_RULES["flow_per_kw_low"]
        risk_check, risk_value, risk_reason = RACK_RULES["thermal_risk_high"]
        await runtime.observe([Observation("pump_redundancy_lost", "cdu-m1", True, now, 1.0, reasons=[PUMP_REASON]),
                               Observation(flow_check, "m1-r01", True, now, flow_value, reasons=[flow_reason]),
                               Observation(risk_check, "m1-r02", True, now, risk_value, reasons=[risk_reason])])
        first = await wait_until(lambda: pages(sink, "firing"), timeout=10, what="the page for cdu-m1")
        assert [a["labels"]["alertname"] for a in alerts_in(first)] == ["pump_redundancy_lost"]

        await runtime.observe([Observation("pump_redundancy_lost", "cdu-m1", False, now + timedelta(seconds=30), 3.0)])
        rack_page = await wait_until(
            lambda: [n for n in pages(sink, "firing") if any(a["labels"]["target"] == "m1-r02" for a in n["alerts"])],
            timeout=10, what="m1-r02's thermal risk paged once the pump alert resolved")
        (risk_alert,) = [a for a in rack_page[0]["alerts"] if a["labels"]["target"] == "m1-r02"]
        assert risk_alert["status"] == "firing"
        assert risk_alert["labels"]["probable_cause"] == "cdu-m1:pump_redundancy_lost"  # as it fired
        assert risk_alert["annotations"]["probable_cause"].startswith(
            "Fired while cdu-m1:pump_redundancy_lost was active; that alert resolved at ")
        (mail,) = await wait_until(lambda: mails(mailbox, "firing"), timeout=10, what="m1-r01's low flow mailed")
        assert mail["Subject"].startswith("[FIRING] cdu-m1 demo: Rack m1-r01: coolant flow per kW low")
        assert "Cause: Fired while cdu-m1:pump_redundancy_lost was active" in body(mail)
        assert "check the rack itself" in body(mail)
