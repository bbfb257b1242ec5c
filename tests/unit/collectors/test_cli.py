"""`podwatch collect` option handling (no servers needed): the plan, and user errors without tracebacks."""

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from podwatch.cli import app

ROOT = Path(__file__).resolve().parents[3]
REF = ROOT / "examples" / "sites" / "reference-10mw.yaml"


def test_plan_prints_every_modbus_device_with_its_requests():
    result = CliRunner().invoke(app, ["collect", "--plan", "--site", str(REF)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    headers = [line for line in lines if not line.startswith("  ")]
    assert len(headers) == 3 + 6 * (1 + 24) + 1  # 3 meters, per module 1 CDU + 24 PDUs; BMS (MQTT): one summary line
    assert headers[-1] == "MQTT (mqtt://127.0.0.1:1883): 72 device(s) subscribed, not polled: nvidia-bms-rack 72"
    assert headers[0].startswith("meter-sub  profile=sunspec-213 modbus-tcp://127.0.0.1:16010 unit=1")
    assert "  fc3 start=40073 count=66 gap=30  meter.l1.current_a@+0" in result.output
    assert any(h.startswith("pdu-m6-r01-a ") and "modbus-rtu-over-tcp://127.0.0.1:16026" in h for h in headers)


def test_plan_honours_max_registers_override():
    result = CliRunner().invoke(app, ["collect", "--plan", "--site", str(REF), "--max-registers", "16"])
    assert result.exit_code == 0, result.output
    counts = [int(part.split("=")[1]) for line in result.output.splitlines() if line.startswith("  fc")
              for part in line.split() if part.startswith("count=")]
    assert counts and max(counts) <= 16


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "podwatch", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def test_missing_kafka_and_bad_mqtt_url_are_clear_errors_without_traceback():
    r = run_cli("collect", "--site", str(REF))
    assert r.returncode == 2 and "--kafka HOST:PORT is required" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("collect", "--site", str(REF), "--kafka", "127.0.0.1:1", "--mqtt", "http://x")
    assert r.returncode == 2 and "--mqtt" in r.stderr and "Traceback" not in r.stderr


def test_unknown_site_file_is_a_clear_error():
    r = run_cli("collect", "--plan", "--site", "/nonexistent/site.yaml")
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


def test_plan_of_a_site_without_modbus_says_so_and_lists_the_mqtt_devices():
    result = CliRunner().invoke(app, ["collect", "--plan", "--site", str(ROOT / "examples/sites/mqtt-only.yaml")])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "no Modbus devices: nothing is polled",
        "MQTT (mqtt://127.0.0.1:1883): 8 device(s) subscribed, not polled: generic-json-rack 4, nvidia-bms-rack 4"]
