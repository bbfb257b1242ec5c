"""Site model: templates, typed validation, cross-checks, every error with its field path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from podwatch.errors import ConfigError
from podwatch.site import expand_templates, load_site, parse_site, site_json_schema

EXAMPLES = sorted((Path(__file__).parents[3] / "examples" / "sites").glob("*.yaml"))


def small_site() -> dict:
    """A valid two-rack site, as parsed YAML; tests break one thing at a time."""
    return {
        "site": {"id": "t1", "timezone": "UTC"},
        "gateways": [{"id": "gw", "host": "127.0.0.1", "port": 1502}],
        "power": {
            "transformers": [{"id": "x1", "rating_kva": 2000}],
            "feeders": [
                {"id": "fa", "transformer": "x1", "side": "a", "rating_kw": 800},
                {"id": "fb", "transformer": "x1", "side": "b", "rating_kw": 800},
            ],
        },
        "modules": [{
            "id": "m1",
            "busways": [{"id": "ba", "feeder": "fa", "side": "a", "rating_kw": 600},
                        {"id": "bb", "feeder": "fb", "side": "b", "rating_kw": 600}],
            "cdus": [{"id": "c1", "capacity_kw": 600, "pumps": 2, "pump_flow_lpm": 800,
                      "racks": ["r1", "r2"],
                      "device": {"id": "cdu-1", "profile": "podwatch-cdu", "gateway": "gw", "unit_id": 200}}],
            "racks": [
                {"template": {"id": "r{i}", "rated_kw": 132, "feeds": {"a": "ba", "b": "bb"},
                              "pdus": {"a": {"id": "pdu-r{i}-a", "profile": "raritan-px3", "gateway": "gw", "unit_id": "{i}"},
                                       "b": {"id": "pdu-r{i}-b", "profile": "raritan-px3", "gateway": "gw", "unit_id": "{i+100}"}}},
                 "range": [1, 2]},
            ],
        }],
    }


def errors_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_site(data)
    return info.value.errors


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_shipped_example_site_loads(path):
    site = load_site(path)
    assert site.racks and site.devices
    assert all(r.cdu for r in site.racks)


def test_demo_site_matches_its_description():
    site = load_site(Path(__file__).parents[3] / "examples/sites/demo.yaml")
    assert len(site.modules) == 2 and len(site.cdus) == 2 and len(site.racks) == 16
    assert {r.rated_kw for r in site.racks} == {132}
    assert sum(1 for d in site.devices if d.kind == "meter") == 1
    pdus = [d for d in site.devices if d.kind == "pdu"]
    assert len(pdus) == 32 and {d.side for d in pdus} == {"a", "b"}
    # gateways: several devices behind one host:port, distinct unit ids
    gw_m1 = [d for d in site.devices if d.gateway == "gw-m1"]
    assert len({d.endpoint for d in gw_m1}) == 1 and len({d.unit_id for d in gw_m1}) == len(gw_m1)


def test_reference_site_is_about_10_mw():
    site = load_site(Path(__file__).parents[3] / "examples/sites/reference-10mw.yaml")
    it_kw = sum(r.rated_kw for r in site.racks)
    assert 60 <= len(site.racks) <= 80 and 9_000 <= it_kw <= 11_000


def test_templates_expand_ranges_nested_loops_and_integer_expressions():
    data = {"items": [{"template": {"id": "m{i}", "sub": [{"template": "m{i}-r{j:02d}", "for": {"j": [1, 3]}}],
                                    "unit": "{i+100}"}, "range": [1, 2]}]}
    out = expand_templates(data)
    assert [x["id"] for x in out["items"]] == ["m1", "m2"]
    assert out["items"][1]["sub"] == ["m2-r01", "m2-r02", "m2-r03"]
    assert out["items"][1]["unit"] == 102  # a lone expression becomes an integer


def test_small_site_is_valid_and_flattened():
    site = parse_site(small_site())
    assert [r.id for r in site.racks] == ["r1", "r2"]
    assert site.device("pdu-r2-b").unit_id == 102
    assert site.rack("r1").cdu == "c1"
    assert [n.id for n in site.power_path("r1/a")] == ["r1/a", "ba", "fa", "x1"]


def test_port_offset_shifts_every_tcp_port():
    from podwatch.site import shift_ports

    site = shift_ports(parse_site(small_site()), 1000)
    assert {d.port for d in site.devices} == {2502}


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["modules"][0]["racks"][0]["template"]["feeds"].update(b="fdr-9"),
     "modules[0].racks[0].feeds.b: unknown feeder 'fdr-9'"),
    (lambda d: d["modules"][0]["cdus"][0].update(racks=["r1"]),
     "modules[0].racks[1]: rack 'r2' is cooled by no CDU"),
    (lambda d: d["modules"][0]["cdus"].append({"id": "c2", "capacity_kw": 600, "racks": ["r1"]}),
     "modules[0].racks[0]: rack 'r1' is on 2 CDUs"),
    (lambda d: d["modules"][0]["cdus"][0].update(capacity_kw=100),
     "modules[0].cdus[0]: over-subscribed"),
    (lambda d: d["modules"][0]["racks"][0]["template"]["feeds"].update(a="bb"),
     "modules[0].racks[0].feeds.a: 'bb' is on side B, not A"),
    (lambda d: d["modules"][0]["racks"][0]["template"].update(colour="red"),
     "modules[0].racks[0].colour: unknown field"),
    (lambda d: d["modules"][0]["racks"][0]["template"].update(rated_kw=-5),
     "modules[0].racks[0].rated_kw: Input should be greater than 0"),
    (lambda d: d["modules"][0]["racks"][0]["template"]["pdus"]["a"].update(profile="nope"),
     "modules[0].racks[0].pdus.a.profile: unknown profile 'nope'"),
    (lambda d: d["modules"][0]["racks"][0]["template"]["pdus"]["a"].update(unit_id="{i+99}"),
     "unit 101 is already used"),
    (lambda d: d["modules"][0]["racks"][0]["template"]["pdus"]["a"].update(gateway="gw-x"),
     "modules[0].racks[0].pdus.a.gateway: unknown gateway 'gw-x'"),
    (lambda d: d["modules"][0]["racks"][0]["template"]["pdus"]["a"].update(timeout_s=2.0),
     "modules[0].racks[0].pdus.a.timeout_s: timeout 2 s must be shorter than the poll interval 1 s"),
    (lambda d: d["modules"][0]["racks"][0]["template"]["pdus"]["a"].update(profile="podwatch-cdu"),
     "is a cdu profile; this slot needs a pdu profile"),
    (lambda d: d["power"]["feeders"][0].update(transformer="x9"),
     "power.feeders[0].transformer: unknown transformer 'x9'"),
    (lambda d: d["site"].update(timezone="Mars/Olympus"), "site.timezone: unknown time zone 'Mars/Olympus'"),
    (lambda d: d["power"]["transformers"][0].update(rating_kw=10),
     "power.transformers[0]: give one rating, not rating_kw and rating_kva"),
    (lambda d: d["modules"].append(copy.deepcopy(d["modules"][0])), "duplicate module id 'm1'"),
])
def test_each_broken_field_is_reported_with_its_path(mutate, expected):
    data = small_site()
    mutate(data)
    errors = errors_of(data)
    assert any(expected in e for e in errors), errors


def test_all_errors_are_reported_at_once():
    data = small_site()
    data["modules"][0]["racks"][0]["template"]["feeds"]["b"] = "fdr-9"
    data["modules"][0]["cdus"][0]["capacity_kw"] = 100
    data["power"]["feeders"][0]["transformer"] = "x9"
    errors = errors_of(data)
    assert len(errors) >= 4  # two racks with a bad feed, the CDU, the feeder


def test_json_schema_describes_the_site_file():
    schema = site_json_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    assert {"site", "power", "modules"} <= set(schema["properties"])
    assert "rated_kw" in schema["$defs"]["RackSpec"]["properties"]


def test_yaml_syntax_error_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("site:\n  id: x\n  name: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_site(bad)
    assert "line" in info.value.errors[0]


def test_schema_validates_the_shipped_examples_after_template_expansion():
    import jsonschema

    schema = site_json_schema()
    for path in EXAMPLES:
        jsonschema.validate(expand_templates(yaml.safe_load(path.read_text())), schema)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_site_is_valid_against_the_published_json_schema(path):
    """Editors validate against `podwatch config schema`: templates and placeholders must pass
    (they did not: every templated example was flagged), misspelt keys must still fail."""
    import jsonschema
    import yaml

    from podwatch.site import site_json_schema

    validator = jsonschema.Draft202012Validator(site_json_schema())
    assert list(validator.iter_errors(yaml.safe_load(path.read_text()))) == []
    broken = yaml.safe_load((Path(__file__).parent / "broken" / "unknown-keys.yaml").read_text())
    assert any("'gateway' was unexpected" in e.message for e in validator.iter_errors(broken))


def test_rack_whips_default_to_the_site_voltage():
    """site.md: ratings in amperes are at `voltage_v`, default `defaults.voltage_v`. A 400 V site
    whose racks do not repeat the voltage on their whips must not get 415 V whips."""
    data = small_site()
    data["defaults"] = {"voltage_v": 400}
    site = parse_site(data)
    rack = site.racks[0].spec
    assert rack.whips.voltage_v == 400
    expected_kva = 5 * 3 ** 0.5 * 400 * 60 / 1000.0
    assert site.power_nodes[f"{rack.id}/a"].nameplate_kw == pytest.approx(expected_kva * 0.95)


def test_rack_whips_keep_their_own_voltage():
    data = small_site()
    data["defaults"] = {"voltage_v": 400}
    data["modules"][0]["racks"][0]["template"]["whips"] = {"per_side": 5, "rating_a": 60, "voltage_v": 480}
    assert parse_site(data).racks[0].spec.whips.voltage_v == 480
