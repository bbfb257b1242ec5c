"""Alerting attached to the real storage `Service` (DuckDB file + HTTP API), and the
`podwatch alerts` commands: reading the file directly, and through the API while the service
holds the file's lock; `test-receivers` against real receivers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from typer.testing import CliRunner

from podwatch.analytics.alerting import attach_alerting, load_rules
from podwatch.analytics.alerting.settings import settings_from_dict
from podwatch.cli import app
from podwatch.storage.service import Service, ServiceSettings
from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

RULES = "rules: [{id: rack_return_temp_breach, for: 0s, clear_for: 0s}]"


def return_rows(device: str, values: list[float]) -> pl.DataFrame:
    start = datetime.now(UTC) - timedelta(seconds=len(values))
    return pl.DataFrame({"ts": [start + timedelta(seconds=i) for i in range(len(values))], "device": [device] * len(values),
                         "metric": ["rack.liquid_return_temp_c"] * len(values), "value": values, "quality": [0] * len(values)})


@pytest.mark.slow
async def test_attached_to_service_and_cli_reads_through_api(webhook_sink, tmp_path):
    db = str(tmp_path / "site.duckdb")
    settings = settings_from_dict({"receivers": [{"type": "webhook", "name": "hook", "url": webhook_sink.url, "secret": "k"}],
                                   "delivery_interval": "100ms"})
    published: list[dict] = []

    async def publish(event: dict) -> None:  # stands in for the stream stage's send_alert_event
        published.append(event)

    service = Service(ServiceSettings(db=db, port=0))
    alerting = attach_alerting(service, settings, publish, rules=load_rules(text=RULES))
    async with service:
        events = await alerting.on_batch(return_rows("rack-m1-01", [45.0, 56.0, 57.0]))
        assert [e["state"] for e in events] == ["pending", "firing"]
        await wait_until(lambda: len(webhook_sink.snapshot()) == 1, timeout=10, what="webhook delivery from the service")
        await wait_until(lambda: [e["state"] for e in published] == ["pending", "firing"], timeout=10,
                         what="every transition published to podwatch.alerts.v1")
        # The file is locked by this process: the CLI (another process) reads through the API.
        # (asyncio subprocess: this event loop serves the API meanwhile)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "podwatch", "alerts", "list", "--db", db, "--state", "firing", "--format", "json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, stderr.decode()
        assert "reading through its API" in stderr.decode()
        rows = json.loads(stdout)
        assert [(r["rule"], r["target"], r["state"]) for r in rows] == [("rack_return_temp_breach", "rack-m1-01", "firing")]
        assert rows[0]["labels"]["team"] == "facilities"
        await alerting.aclose()
    # Released: the CLI reads the file itself, and `show` adds the deliveries.
    runner = CliRunner()
    result = runner.invoke(app, ["alerts", "list", "--db", db])
    assert result.exit_code == 0, result.output
    assert "rack_return_temp_breach" in result.output and "firing" in result.output
    result = runner.invoke(app, ["alerts", "show", rows[0]["alert_id"][:10], "--db", db])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["state"] == "firing"
    assert {(d["receiver"], d["state"], d["status"]) for d in shown["deliveries"]} == {
        ("hook", "firing", "delivered"), ("kafka", "pending", "delivered"), ("kafka", "firing", "delivered")}
    result = runner.invoke(app, ["alerts", "show", "ffff", "--db", db])
    assert result.exit_code != 0


def test_cli_rejects_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["alerts", "list", "--db", str(tmp_path / "missing.duckdb")])
    assert result.exit_code != 0 and "no such DuckDB file" in str(result.exception)
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules: [{id: cdu_supply_temp_high, for: soon}]")
    result = runner.invoke(app, ["alerts", "rules", "--rules", str(bad)])
    assert result.exit_code != 0 and "rules[0] (cdu_supply_temp_high).for: not a duration" in str(result.exception)


def test_test_receivers_prints_ok_and_failure(am_with_sink, webhook_sink, tmp_path):
    am_url, am_sink = am_with_sink
    from podwatch import procs

    config = tmp_path / "alerting.yaml"
    config.write_text(f"""
alerting:
  receivers:
    - {{type: alertmanager, name: am, url: "{am_url}"}}
    - {{type: webhook, name: hook, url: "{webhook_sink.url}", secret: k}}
    - {{type: webhook, name: down, url: "http://127.0.0.1:{procs.free_port()}/x", timeout: 1s}}
""")
    proc = subprocess.run([sys.executable, "-m", "podwatch", "alerts", "test-receivers", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("OK   am (alertmanager)")
    assert lines[1].startswith("OK   hook (webhook)")
    assert lines[2].startswith("FAIL down (webhook)") and "retriable" in lines[2]
    assert webhook_sink.snapshot()[0].json()["rule"] == "podwatch_receiver_test"
