"""The shipped examples/alertmanager/alertmanager.yml: Alertmanager's own `amtool` accepts it,
routes podwatch's alerts where docs/alerts.md says, and its inhibit rules match the labels the
engine sets (cascade=cause|symptom, equal site and cdu)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from podwatch.analytics.alerting.rules import load_rules

ROOT = Path(__file__).resolve().parents[3]
SHIPPED = ROOT / "examples/alertmanager/alertmanager.yml"
AMTOOL = shutil.which("amtool")
needs_amtool = pytest.mark.skipif(AMTOOL is None, reason="amtool (Debian prometheus-alertmanager) not installed")


@needs_amtool
def test_amtool_accepts_the_shipped_config():
    result = subprocess.run([AMTOOL, "check-config", str(SHIPPED)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 inhibit rules" in result.stdout


@needs_amtool
@pytest.mark.parametrize(("labels", "receiver"), [
    ({"alertname": "pump_redundancy_lost", "site": "demo", "cdu": "cdu-m1", "severity": "critical", "cascade": "cause"},
     "facilities-pager"),
    ({"alertname": "flow_per_kw_low", "site": "demo", "cdu": "cdu-m1", "rack": "m1-r01", "severity": "warning",
      "cascade": "symptom"}, "facilities-mail"),
    ({"alertname": "sensor_stale", "site": "demo", "device": "pdu-m1-r01-a", "severity": "warning"}, "facilities-mail"),
    ({"alertname": "busway_power_high", "site": "demo", "severity": "critical"}, "facilities-pager"),
])
def test_routes(labels, receiver):
    argv = [AMTOOL, "config", "routes", "test", f"--config.file={SHIPPED}", *(f"{k}={v}" for k, v in labels.items())]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == receiver


def test_cooling_grouped_per_cdu_loop_and_inhibited_by_the_cause_on_the_same_cdu():
    config = yaml.safe_load(SHIPPED.read_text())
    (cooling,) = [r for r in config["route"]["routes"] if r.get("matchers") == ['cdu=~".+"']]
    assert cooling["group_by"] == ["site", "cdu"]
    rules = config["inhibit_rules"]
    assert all(r["equal"] == ["site", "cdu"] for r in rules)
    assert all('cascade="cause"' in r["source_matchers"] and 'cascade="symptom"' in r["target_matchers"] for r in rules)
    # The engine sets exactly these values, from the shipped rules' `cascade`.
    assert {r.cascade for r in load_rules().rules} == {"cause", "symptom", None}
