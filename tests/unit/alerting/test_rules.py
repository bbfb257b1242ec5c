"""Rule files: shipped defaults cover every analytics check, site overrides merge by id, bad
files are rejected with every error and its field path."""

from __future__ import annotations

import pytest

from podwatch.analytics.alerting.rules import load_rules, parse_duration_s, render_template
from podwatch.analytics.alerting.settings import settings_from_dict
from podwatch.errors import ConfigError

ANALYTICS_CHECKS = ["cdu_supply_temp_high", "rack_return_temp_high", "return_temp_rising", "flow_per_kw_low",
                    "heat_balance_mismatch", "delta_t_high", "approach_rising", "dew_point_margin_low",
                    "pump_redundancy_lost", "leak_detected", "sensor_stale", "sensor_stuck"]


def test_defaults_cover_every_check_and_risk():
    rules = load_rules()
    consumed = {r.check_name for r in rules.enabled_rules()}
    assert set(ANALYTICS_CHECKS) <= consumed
    assert "thermal_risk" in consumed  # the risk model's observations
    by_id = rules.by_id()
    assert by_id["thermal_risk_high"].source == "risk"
    assert by_id["rack_return_temp_breach"].metric == ["rack.liquid_return_temp_c"]
    assert by_id["cdu_supply_temp_high"].hold_s == 120.0


def test_defaults_cover_the_check_names_analytics_emits():
    checks = pytest.importorskip("podwatch.analytics.checks")
    consumed = {r.check_name for r in load_rules().enabled_rules()}
    assert set(checks.CHECK_NAMES) <= consumed


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("30s", 30), ("2m", 120), ("1h", 3600), (5, 5.0), ("1.5m", 90)])
def test_durations(text, seconds):
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["2 minutes", "-1", True, "m"])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration_s(bad)


def test_site_override_merges_by_id_and_extends(tmp_path):
    site = tmp_path / "site-rules.yaml"
    site.write_text("""
labels: {site: dc7}
rules:
  - id: rack_return_temp_breach
    threshold: 57
    clear_threshold: 55
    labels: {team: cooling}
  - id: sensor_stuck
    enabled: false
  - id: busway_power_high
    source: metric
    metric: meter.power_kw
    op: ">"
    threshold: 1600
    severity: warning
    annotations: {summary: "busway {target} at {value:.0f} kW"}
""")
    rs = load_rules(site)
    rules = rs.by_id()
    assert rules["rack_return_temp_breach"].threshold == 57
    assert rules["rack_return_temp_breach"].clear_for_s == 30.0  # kept from the default
    assert rules["rack_return_temp_breach"].labels == {"team": "cooling"}
    assert rules["rack_return_temp_breach"].annotations.summary.startswith("Rack {target}")
    assert "sensor_stuck" not in {r.id for r in rs.enabled_rules()}
    assert rules["busway_power_high"].metric == ["meter.power_kw"]
    assert rs.labels == {"team": "facilities", "site": "dc7"}


def test_bad_rules_file_reports_every_error_with_path(tmp_path):
    site = tmp_path / "bad.yaml"
    site.write_text("""
rules:
  - id: rack_return_temp_breach
    threshold: 30
    clear_threshold: 31
  - id: new_rule
    source: metric
    metric: cdu.flow_lpm
    op: "=>"
    threshold: 1
    annotations: {summary: "x"}
  - id: typo_rule
    source: check:flow_per_kw_low
    severty: critical
    annotations: {summary: "{nope}"}
""")
    with pytest.raises(ConfigError) as info:
        load_rules(site)
    text = str(info.value)
    assert "rules[0] (rack_return_temp_breach)" in text and "clear_threshold 31.0 must be <= threshold 30.0" in text
    assert "rules[1] (new_rule).op" in text
    assert "rules[2] (typo_rule).severty: unknown field" in text
    assert len(info.value.errors) == 3


def test_bad_template_is_rejected_at_load():
    with pytest.raises(ConfigError) as info:
        load_rules(text="rules: [{id: r1, source: 'check:x', annotations: {summary: '{nope} at {value:.1f}'}}]",
                   include_defaults=False)
    assert "rules[0] (r1): annotations.summary: bad template" in str(info.value)


def test_template_renders_missing_value_as_na():
    out = render_template("{target} at {value:.1f} ({reasons}) {labels[rack]}", target="rack-1", value=None,
                          reasons=["a", "b"], threshold=1.0, rule="r", severity="critical", labels={})
    assert out == "rack-1 at n/a (a; b) "


def test_settings_errors_name_fields():
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"receivers": [
            {"type": "webhook", "name": "a", "url": "ftp://x"},
            {"type": "email", "name": "a", "host": "h", "sender": "s", "to": ["t"], "port": 99999},
            {"type": "pager", "name": "c"}]})
    errors = info.value.errors
    assert any(e.startswith("receivers[0].url: must be an http(s) URL") for e in errors)
    assert any(e.startswith("receivers[1].port") for e in errors)
    assert any(e.startswith("receivers[2]") and "pager" in e for e in errors)


def test_settings_for_serve_flags(tmp_path):
    from podwatch.analytics.alerting.settings import settings_for

    config = tmp_path / "alerting.yaml"
    config.write_text("receivers: [{type: alertmanager, name: alertmanager, url: 'http://old:9093'},"
                      " {type: webhook, name: hook, url: 'http://h/x'}]\nrules_file: site-rules.yaml\n")
    s = settings_for("http://127.0.0.1:9093", config_file=config, generator_url="http://api:8080")
    assert [(r.name, getattr(r, "url", None)) for r in s.receivers] == [("hook", "http://h/x"), ("alertmanager", "http://127.0.0.1:9093")]
    assert s.rules_file == tmp_path / "site-rules.yaml" and s.generator_url == "http://api:8080"
    assert settings_for().receivers == []
    with pytest.raises(ConfigError, match="must be an http"):
        settings_for("ftp://x")


def test_metric_rule_with_unknown_metric_name_is_rejected_with_its_path():
    # A misspelt metric (meter.powr_kw) never matches a sample: the rule would silently never fire.
    with pytest.raises(ConfigError) as info:
        load_rules(text="""
rules:
  - id: busway_power_high
    source: metric
    metric: [meter.power_kw, meter.powr_kw]
    op: ">"
    threshold: 1600
    annotations: {summary: "x"}
""", include_defaults=False)
    errors = info.value.errors
    assert len(errors) == 1
    assert errors[0].startswith("<rules>: rules[0] (busway_power_high).metric: unknown metric 'meter.powr_kw'")
    assert "docs/metrics.md" in errors[0]


def test_an_explicit_threshold_override_replaces_the_per_rack_limit():
    assert load_rules().by_id()["rack_return_temp_breach"].threshold_from == "rack_return_limit"
    rules = load_rules(text="rules: [{id: rack_return_temp_breach, threshold: 57, clear_threshold: 55}]").by_id()
    assert rules["rack_return_temp_breach"].threshold == 57 and rules["rack_return_temp_breach"].threshold_from is None
    kept = load_rules(text="rules: [{id: rack_return_temp_breach, for: 5s}]").by_id()["rack_return_temp_breach"]
    assert kept.threshold_from == "rack_return_limit" and kept.hold_s == 5
    with pytest.raises(ConfigError, match=r"rules\[0\] \(x\): `threshold_from` needs a metric rule"):
        load_rules(text="rules: [{id: x, source: 'check:flow_per_kw_low', threshold_from: rack_return_limit, "
                        "annotations: {summary: s}}]", include_defaults=False)


def test_settings_file_errors_name_the_yaml_path(tmp_path):
    # The documented file wraps everything in `alerting:`; errors must name the keys as written
    # there (not pydantic's union tag), and receiver-name problems the receiver's `name`.
    from podwatch.analytics.alerting.settings import load_settings

    path = tmp_path / "alerting.yaml"
    path.write_text("""
alerting:
  receivers:
    - {type: alertmanager, name: am, url: "127.0.0.1:9093"}
    - {type: webhook, name: kafka, url: "http://127.0.0.1:1/x"}
    - {type: webhook, name: am, url: "http://127.0.0.1:1/y"}
""")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    errors = info.value.errors
    assert any(e.startswith("alerting.receivers[0].url: must be an http(s) URL") for e in errors), errors
    path.write_text(path.read_text().replace('"127.0.0.1:9093"', '"http://127.0.0.1:9093"'))
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    errors = info.value.errors
    assert any(e.startswith("alerting.receivers[1].name: 'kafka' is reserved") for e in errors), errors
    assert any(e.startswith("alerting.receivers[2].name: 'am' is used by receivers[0] too") for e in errors), errors
    assert not any(e.startswith("<root>") for e in errors), errors


def test_label_names_alertmanager_rejects_are_config_errors():
    # Alertmanager answers 400 "invalid label set" for a label name outside [a-zA-Z_][a-zA-Z0-9_]*:
    # every alert of the rule would go dead at the receiver instead of failing at load.
    with pytest.raises(ConfigError) as info:
        load_rules(text="""
labels: {"site id": dc7}
rules:
  - id: delta_t_high
    labels: {team-name: cooling, ok_label: x}
""")
    errors = info.value.errors
    assert any(e.startswith("<rules>: labels: 'site id' is not a valid label name") for e in errors), errors
    assert any(e.startswith("<rules>: rules[0] (delta_t_high).labels: 'team-name' is not a valid label name")
               for e in errors), errors
    assert len(errors) == 2


def test_serve_links_notifications_to_the_api_once_and_keeps_the_configured_generator_url(tmp_path):
    # Notifications' generatorURL is <generator_url>/api/alerts?alert_id=<id>. `podwatch serve` passed
    # "http://host:port/api/alerts" as the base (link .../api/alerts/api/alerts?...) and replaced the
    # generator_url of the alerting file (the address people can reach) with its listen address.
    from podwatch.analytics.alerting.receivers import build_receivers
    from podwatch.serve import ServeOptions, alerting_settings

    opts = ServeOptions(db=str(tmp_path / "x.duckdb"), host="10.0.0.5", port=8081, alertmanager="http://am:9093")
    am = build_receivers(alerting_settings(opts))[0]
    url = am.to_alertmanager({"alert_id": "abc", "labels": {}, "state": "firing", "startsAt": None})["generatorURL"]
    assert url == "http://10.0.0.5:8081/api/alerts?alert_id=abc"
    config = tmp_path / "alerting.yaml"
    config.write_text("alerting: {generator_url: 'https://podwatch.dc7.example', receivers: []}\n")
    opts.alerting_config = str(config)
    assert alerting_settings(opts).generator_url == "https://podwatch.dc7.example"


def test_serve_on_port_0_links_notifications_to_the_port_it_listens_on(tmp_path):
    from podwatch.serve import ServeOptions, ServeProcess, alerting_settings

    sp = ServeProcess(ServeOptions(db=str(tmp_path / "x.duckdb"), port=0))
    assert sp.opts.port != 0 and sp.service.settings.port == sp.opts.port
    assert alerting_settings(sp.opts).generator_url == f"http://127.0.0.1:{sp.opts.port}"


def test_a_rule_on_a_check_podwatch_does_not_have_is_warned_with_the_closest_name(caplog):
    """`source: check:flow_per_kw_lo` (a typo) was accepted silently and the rule never fired."""
    import logging

    from podwatch.analytics.alerting.rules import load_rules, unknown_check_warnings

    text = """
rules:
  - {id: my_flow, source: "check:flow_per_kw_lo", for: 1m, severity: warning, annotations: {summary: s}}
  - {id: custom, source: "check:vendor_fan_speed", for: 1m, severity: info, annotations: {summary: s}}
  - {id: unused, source: "check:nothing_here", enabled: false, annotations: {summary: s}}
"""
    with caplog.at_level(logging.WARNING, logger="podwatch.analytics.alerting.rules"):
        rule_set = load_rules(text=text)
    warnings = unknown_check_warnings(rule_set)
    assert len(warnings) == 2
    assert "'my_flow'" in warnings[0] and "did you mean check:flow_per_kw_low?" in warnings[0]
    assert "'custom'" in warnings[1] and "did you mean" not in warnings[1]
    assert [r.getMessage() for r in caplog.records] == warnings
    assert unknown_check_warnings(load_rules()) == []  # the shipped rules name real checks
