"""`podwatch config ...` end to end: real processes, exit codes, messages without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def podwatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "podwatch", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_validate_accepts_the_demo_site():
    result = podwatch("config", "validate", "examples/sites/demo.yaml")
    assert result.returncode == 0, result.stderr
    assert "valid site 'demo'" in result.stdout and "racks 16" in result.stdout


def test_validate_reports_every_error_with_its_path_and_exits_2(tmp_path):
    text = (ROOT / "examples/sites/demo.yaml").read_text()
    broken = text.replace('b: "bus-m{i}-b"}', 'b: "fdr-9"}').replace("capacity_kw: 1350", "capacity_kw: 100")
    path = tmp_path / "broken.yaml"
    path.write_text(broken)
    result = podwatch("config", "validate", str(path))
    assert result.returncode == 2
    assert "modules[1].racks[3].feeds.b: unknown feeder 'fdr-9'" in result.stderr
    assert "modules[0].cdus[0]: over-subscribed" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_validate_missing_file_is_a_clear_error():
    result = podwatch("config", "validate", "no/such/site.yaml")
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr


def test_schema_is_json():
    result = podwatch("config", "schema")
    assert result.returncode == 0
    assert json.loads(result.stdout)["title"] == "podwatch site"


def test_every_command_has_help():
    """Walk the whole command tree: `--help` works on every command and group."""
    import typer.main
    from typer.testing import CliRunner

    from podwatch.cli import app

    root = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(cmd, path: list[str]) -> None:
        paths.append(path)
        if getattr(cmd, "commands", None):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])

    walk(root, [])
    assert len(paths) > 3
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output
