"""An outside checker's broken site and scenario files (tests/unit/site/broken/): each problem is
one line naming its field path, `podwatch config validate` exits 2, never a traceback. Also the
template and YAML fixes found on the way (division by zero, unbound variables, nested scopes,
duplicate keys, huge ranges) and the new example sites."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from podwatch.cli import app
from podwatch.errors import ConfigError
from podwatch.simulators.scenario import Scenario
from podwatch.site import expand_templates, load_site, parse_site, read_yaml_file

ROOT = Path(__file__).resolve().parents[3]
BROKEN = Path(__file__).parent / "broken"
DEMO = ROOT / "examples" / "sites" / "demo.yaml"

# file -> lines that must appear (each a substring of one error line, path first)
EXPECTED: dict[str, list[str]] = {
    "wrong-types.yaml": [
        "site.id: ids start with a letter or digit", "got 'bad id with space'",
        "site.timezone: unknown time zone 'Mars/Olympus'",
        "defaults.poll_interval_s: Input should be greater than 0, got -1",
        "defaults.timeout_s: Input should be a valid number", "mqtt.url: 'http://broker:1883' is not mqtt://",
        "mqtt.qos: Input should be 0 or 1, got 2", "power.transformers[0].rating_kva: Input should be a valid number",
        "power.feeders[0].side: Input should be 'a' or 'b', got 'c'", "modules[0].cdus[0].pumps: Input should be less than or equal to 4, got 9",
        "modules[0].cdus[0].racks: Input should be a valid list, got 'r1'", "got '100kW'",
        "modules[0].racks[0].feeds.b: required field is missing", "modules[0].racks[0].pdus.c: key 'c'",
        "modules[0].racks[1]: Input should be a valid dictionary, got 17"],
    "unknown-keys.yaml": [
        "modules[0].cdus[0].capacity: unknown field; did you mean 'capacity_kw'?",
        "modules[0].racks[0].rated_kW: unknown field; did you mean 'rated_kw'?",
        "modules[0].colour: unknown field", "gateway: unknown field; did you mean 'gateways'?"],
    "missing-refs.yaml": [
        "power.feeders[0].transformer: unknown transformer 'x9'", "modules[0].busways[0].feeder: unknown feeder 'fdr-missing'",
        "modules[0].cdus[0].racks[1]: unknown rack 'r-ghost'", "modules[0].racks[0].feeds.b: unknown feeder 'fdr-9'",
        "modules[0].racks[1].cdu: unknown CDU 'c-none'", "modules[0].cdus[0].device.gateway: unknown gateway 'gw-none'"],
    "oversubscribed-cdu.yaml": [
        "modules[0].cdus[0]: over-subscribed: racks' rated heat to liquid 792 kW", "exceeds capacity 600 kW",
        "modules[0].cdus[0]: design flow 1080 L/min exceeds 1 working pump(s)",
        "modules[0].cdus[0].supply_setpoint_c: 25 °C is below facility water"],
    "duplicate-units.yaml": [
        "modules[0].racks[2].id: duplicate rack id 'r1'",
        "modules[0].racks[0].pdus.b.unit_id: 127.0.0.1:15999 unit 1 is already used by modules[0].racks[0].pdus.a",
        "modules[0].racks[1].pdus.a.id: duplicate device id 'pdu-1a'",
        "modules[0].racks[1].pdus.b.unit_id: RTU unit ids are 1..247", "one port speaks one framing"],
    "bad-templates.yaml": [
        "modules[0].template: division by zero", "modules[1].template: '{k}' uses unknown variable 'k'",
        "modules[2].template: bad format 'zz'", "modules[3].range: expected [first, last]",
        "modules[4].range: expected", "modules[5].range: expected", "modules[6].range: expected",
        "modules[7]: give either 'range' or 'for', not both", "modules[8]: a template needs",
        "modules[9].range: expands to 100,000,000 items"],
    "read-limits.yaml": [
        "power.transformers[0].meter (gateway 'gw2' max_registers_per_read): meter.energy_kwh: int64 needs 4 registers "
        "but max_registers_per_read is 3",
        "power.feeders[0].meter.max_registers_per_read: meter.energy_kwh: int64 needs 4 registers",
        "modules[0].racks[0].sensors: max_registers_per_read / max_gap apply to Modbus devices, not MQTT"],
    "syntax-error.yaml": ["line 3, column 6: invalid YAML"],
    "mqtt-tag-paths.yaml": [
        "modules[0].racks[0].sensors.tag_path: 'DC1/+/r1' contains an MQTT wildcard (+ or #); "
        "a published topic cannot contain one",
        "modules[0].racks[1].sensors.tag_path: 'DC1//r2' has an empty topic level"],
    "duplicate-tag-path.yaml": [
        "modules[0].racks[3].sensors.tag_path: 'DC1/row/r' is already used by modules[0].racks[2].sensors"],
    "alias-bomb.yaml": ["<root>: the site file expands to more than 2,000,000 values"],
    "recursive-alias.yaml": ["line 2, column 7: invalid YAML: found unconstructable recursive node"],
    "timezone-case.yaml": ["site.timezone: unknown time zone 'europe/berlin'; did you mean 'Europe/Berlin'?"],
    "duplicate-key.yaml": ["line 3, column 1: invalid YAML: duplicate key 'site' (first at line 2)"],
    "empty.yaml": ["<root>: the site file is empty"],
    "only-comments.yaml": ["<root>: the site file holds only comments"],
    "not-a-mapping.yaml": ["<root>: a site file must be a mapping"],
    "latin1.yaml": ["line 1: not UTF-8 text (byte 0xe9)"],
}


def test_every_broken_fixture_has_expectations():
    on_disk = {p.name for p in BROKEN.glob("*.yaml") if not p.name.startswith("scenario-")}
    assert on_disk == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_validate_reports_every_problem_with_its_path(name):
    result = CliRunner().invoke(app, ["config", "validate", str(BROKEN / name)])
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line.strip() for line in out.splitlines()[1:]]
    assert out.splitlines()[0].endswith(f"invalid, {len(lines)} error(s):")
    for want in EXPECTED[name]:
        assert any(want in line for line in lines), f"{want!r} not in:\n{out}"
    assert len(set(lines)) == len(lines), "an error is reported twice"


def test_a_directory_is_a_clear_error(tmp_path):
    (tmp_path / "site.yaml").mkdir()
    result = CliRunner().invoke(app, ["config", "validate", str(tmp_path / "site.yaml")])
    assert result.exit_code == 2
    assert "is a directory, not a site file" in result.output


def test_yaml_merge_keys_may_be_overridden_without_a_duplicate_error(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {rated_kw: 100, workload: inference}\nrack:\n  <<: *b\n  rated_kw: 150\n")
    assert read_yaml_file(path)["rack"] == {"rated_kw": 150, "workload": "inference"}


@pytest.mark.parametrize("name, expected", [
    ("scenario-missing-targets.yaml", [
        "faults[0].target: 'm9' is not a valid load_surge target", "faults[1].target: 'cdu-m9' is not a valid pump_failure target",
        "faults[2].pumps: [4] not installed on cdu-m1", "faults[3].target: 'm1-r99'",
        "faults[4].id: duplicate fault id 'dup' (also faults[3])", "faults[4].metric: 'cdu.flow_lpm' is not served by pdu-m1-r01-a",
        "faults[5].target: device faults apply to Modbus devices"]),
    ("scenario-bad-types.yaml", [
        "faults[0]: kind 'meteor' is not one of", "faults[1]: 'kind' is missing",
        "faults[2].onset_s: Input should be greater than or equal to 0, got -5", "faults[2].magnitude: Input should be greater than 0, got 0",
        "faults[3].rampe_s: unknown field; did you mean 'ramp_s'?", "duration: unknown field; did you mean 'duration_s'?"]),
])
def test_broken_scenarios_name_each_fault_field(name, expected):
    with pytest.raises(ConfigError) as exc:
        Scenario.load(BROKEN / name, load_site(DEMO))
    for want in expected:
        assert any(want in e for e in exc.value.errors), f"{want!r} not in {exc.value.errors}"


def test_simulate_with_a_broken_scenario_exits_2_without_a_traceback():
    """Through the real entry point (`main` turns a ConfigError into lines on stderr and exit 2)."""
    proc = subprocess.run([sys.executable, "-m", "podwatch", "simulate", "--site", str(DEMO), "--scenario",
                           str(BROKEN / "scenario-missing-targets.yaml"), "--no-mqtt"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "faults[0].target: 'm9' is not a valid load_surge target" in proc.stderr


def test_validate_checks_a_scenario_against_the_site():
    result = CliRunner().invoke(app, ["config", "validate", str(DEMO), "--scenario",
                                      str(BROKEN / "scenario-missing-targets.yaml")])
    assert result.exit_code == 2
    assert "faults[0].target: 'm9' is not a valid load_surge target" in result.output
    ok = CliRunner().invoke(app, ["config", "validate", str(DEMO), "--scenario",
                                  str(ROOT / "examples" / "scenarios" / "pump-failure.yaml")])
    assert ok.exit_code == 0, ok.output
    assert "scenario 'pump-failure'" in ok.output


# ------------------------------------------------------------------ templates


def test_inner_template_sees_the_outer_variables():
    data = [{"template": {"id": "m{i}", "units": [{"template": "{10*(i-1)+k}", "for": {"k": [1, 3]}}]},
             "range": [1, 2]}]
    assert expand_templates(data) == [{"id": "m1", "units": [1, 2, 3]}, {"id": "m2", "units": [11, 12, 13]}]


def test_braces_in_templates_are_either_expressions_or_a_clear_error():
    errors: list[str] = []
    out = expand_templates([{"template": {"name": "rack {i} {}"}, "range": [1, 1]}], errors=errors)
    assert errors == [] and out == [{"name": "rack 1 {}"}]
    expand_templates([{"template": {"name": "rack {i} {not an expr!}"}, "range": [1, 1]}], errors=errors)
    assert errors == ["[0].template: bad template expression 'not an expr!'"]


def test_template_errors_inside_an_outer_template_are_reported_once():
    data = {"site": {"id": "x"}, "power": {"transformers": [{"id": "t", "rating_kw": 10}]},
            "modules": [{"template": {"id": "m{i}", "racks": [{"template": {"id": "r{q}"}, "range": [1, 2]}]},
                         "range": [1, 3]}]}
    with pytest.raises(ConfigError) as exc:
        parse_site(data)
    assert exc.value.errors == ["modules[0].racks[0].template: '{q}' uses unknown variable 'q' (defined here: i)"]


def test_no_site_checks_print_an_empty_device_summary(tmp_path):
    result = CliRunner().invoke(app, ["config", "validate", str(ROOT / "examples/sites/mqtt-only.yaml")])
    assert result.exit_code == 0
    assert "devices 8: rack 8 | mqtt 8" in result.output
    bare = tmp_path / "bare.yaml"
    bare.write_text("site: {id: b}\npower: {transformers: [{id: t, rating_kw: 500}], feeders: "
                    "[{id: a, transformer: t, side: a, rating_kw: 200}, {id: b, transformer: t, side: b, rating_kw: 200}]}\n"
                    "modules: [{id: m, cdus: [{id: c, capacity_kw: 200, racks: [r]}], racks: [{id: r, rated_kw: 100, feeds: {a: a, b: b}}]}]\n")
    result = CliRunner().invoke(app, ["config", "validate", str(bare)])
    assert result.exit_code == 0 and "devices 0 (nothing to collect" in result.output


# ------------------------------------------------------------------ flags that used to give tracebacks


@pytest.mark.parametrize("args, expected", [
    (["--tick", "0", "--duration", "2"], "--tick"),                # ZeroDivisionError in the physics loop
    (["--duration", "-5"], "--duration"),                          # ran and stopped at t=0
    (["--port-offset", "60000", "--duration", "1"], "75021 is outside 1..65535"),  # OverflowError in bind()
    (["--clock-origin", "garbage", "--duration", "1"], "expected WALL_MS:SIM_MS"),  # ValueError
])
def test_simulate_flag_errors_are_config_errors(args, expected):
    result = CliRunner().invoke(app, ["simulate", "--site", str(DEMO), "--no-mqtt", *args])
    assert isinstance(result.exception, ConfigError), result.exception
    assert result.exception.exit_code == 2
    assert expected in str(result.exception)


def test_collect_port_offset_out_of_range_is_a_config_error():
    result = CliRunner().invoke(app, ["collect", "--site", str(DEMO), "--port-offset", "-20000", "--plan"])
    assert isinstance(result.exception, ConfigError)
    assert "port 15010 + offset -20000 = -4990 is outside 1..65535" in str(result.exception)


@pytest.mark.parametrize("args, expected", [
    (["--days", "0.02", "--resolution", "100000"], "longer than the history"),  # wrote 0 samples, exit 0
    (["--days", "0.01", "--episodes-per-day", "-1"], "--episodes-per-day must be >= 0"),  # silently ignored
    (["--days", "0.01", "--start", "yesterday"], "'yesterday' is not an ISO date/time"),
])
def test_history_flag_errors(tmp_path, args, expected):
    result = CliRunner().invoke(app, ["simulate", "history", "--site", str(DEMO), "--out", str(tmp_path / "h"), *args])
    assert isinstance(result.exception, ConfigError), result.output
    assert expected in str(result.exception)
    assert not (tmp_path / "h").exists()


def test_history_out_that_is_a_file_is_a_config_error(tmp_path):
    out = tmp_path / "afile"
    out.write_text("x")
    result = CliRunner().invoke(app, ["simulate", "history", "--site", str(DEMO), "--days", "0.01", "--out", str(out)])
    assert isinstance(result.exception, ConfigError)  # was FileExistsError from mkdir
    assert "exists and is not a directory" in str(result.exception)


def test_a_broken_profile_is_named_and_does_not_hide_the_good_ones(tmp_path):
    """Was: one multi-line YAML error without the file name, then 'unknown profile ...; known: none'
    for every device of the site."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "acme-pdu.yaml").write_text(
        "id: acme-pdu\nkind: pdu\nvendor: ACME\nmodel: P1\naddress_base: 1\n"
        "points:\n  - {metric: pdu.power_kw, address: 101, data_type: int32, scale: 0.01, unit: kW}\n")
    (profiles / "broken.yaml").write_text("id: broken\nkind: pdu\npoints: [\n")
    (profiles / "typo.yaml").write_text("id: typo\nkind: pdu\nvendr: x\nmodel: y\n"
                                        "points: [{metric: pdu.power_kw, address: 1, data_type: float33}]\n")
    site = tmp_path / "site.yaml"
    site.write_text("site: {id: pf}\nprofiles_dir: profiles\n"
                    "power: {transformers: [{id: t1, rating_kva: 500}], feeders: [{id: a, transformer: t1, side: a, rating_a: 400},"
                    " {id: b, transformer: t1, side: b, rating_a: 400}]}\n"
                    "modules: [{id: m, cdus: [{id: c, capacity_kw: 200, racks: [r]}], racks: [{id: r, rated_kw: 100,"
                    " feeds: {a: a, b: b}, pdus: {a: {id: pa, profile: acme-pdu, host: 127.0.0.1, port: 23501}}}]}]\n")
    with pytest.raises(ConfigError) as exc:
        load_site(site)
    assert exc.value.errors == [
        "profiles_dir: broken.yaml: line 4, column 1: invalid YAML: expected the node content, but found '<stream end>'",
        "profiles_dir: typo.yaml: vendor: required field is missing",
        "profiles_dir: typo.yaml: points[0].data_type: Input should be 'int16', 'uint16', 'int32', 'uint32', 'float32', "
        "'int64', 'uint64', 'float64' or 'bool', got 'float33'",
        "profiles_dir: typo.yaml: vendr: unknown field; did you mean 'vendor'?"]
    (profiles / "broken.yaml").unlink()
    (profiles / "typo.yaml").unlink()
    from podwatch.collectors.profiles import _load_dir

    _load_dir.cache_clear()  # the directory's files changed within this process
    assert load_site(site).device("pa").profile == "acme-pdu"


def test_history_rejects_a_fault_that_starts_after_its_end(tmp_path):
    late = tmp_path / "late.yaml"
    late.write_text("name: late\nfaults:\n  - {kind: pump_failure, target: cdu-m1, onset_s: 999999, pumps: [1, 2]}\n")
    result = CliRunner().invoke(app, ["simulate", "history", "--site", str(DEMO), "--days", "0.05",
                                      "--out", str(tmp_path / "h"), "--scenario", str(late)])
    assert isinstance(result.exception, ConfigError)  # was: written to the truth as a fault that never happened
    assert "faults[0] (pump_failure-0) starts at 999999 s, after the history's end (4320 s)" in str(result.exception)
