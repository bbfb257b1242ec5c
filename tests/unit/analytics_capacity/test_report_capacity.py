"""The report's site-power plot: the usable capacity of the site feed under the A/B rule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from podwatch.analytics.report import site_capacity_kw, site_feed_groups
from podwatch.site import parse_site
from tests.unit.analytics_capacity.sites import site_dict


def _rows(site, load_kw: float = 0.0) -> dict:
    from podwatch.analytics.capacity import site_capacities

    caps = site_capacities(site)
    return {(n, "24h"): SimpleNamespace(usable_kw=c.usable_kw, provisioned_kw=c.provisioned_kw)
            for n, c in caps.items() if c.kind == "transformer"}


def test_one_transformer_per_side_is_worth_the_weaker_side_not_the_sum():
    """edge-5mw: xfmr-a feeds the A switchgear, xfmr-b the B one. The plot drew 'usable 11,520 kW' (the sum of
    both 5,760 kW transformers) although either must carry the whole site alone."""
    d = site_dict([{"racks": [100.0, 100.0]}])
    d["power"]["transformers"] = [{"id": "xfmr-a", "rating_kw": 4000.0}, {"id": "xfmr-b", "rating_kw": 3000.0}]
    d["power"]["feeders"][0]["transformer"] = "xfmr-a"
    d["power"]["feeders"][1]["transformer"] = "xfmr-b"
    site = parse_site(d)
    assert site_feed_groups(site, ["xfmr-a", "xfmr-b"]) == [["xfmr-a", "xfmr-b"]]
    usable, provisioned = site_capacity_kw(site, _rows(site), ["xfmr-a", "xfmr-b"])
    assert usable == pytest.approx(3000.0 * 0.8)  # the weaker side
    assert provisioned == pytest.approx(200.0)  # the racks once


def test_transformers_feeding_different_racks_add_up():
    """campus-20mw: each transformer feeds its own modules on both sides."""
    d = site_dict([{"racks": [100.0]}, {"racks": [100.0, 100.0]}])
    d["power"]["transformers"].append({"id": "xfmr-2", "rating_kw": 2000.0})
    d["power"]["feeders"] += [{"id": "fdr-a2", "transformer": "xfmr-2", "side": "a", "rating_kw": 3000.0},
                              {"id": "fdr-b2", "transformer": "xfmr-2", "side": "b", "rating_kw": 3000.0}]
    m2 = d["modules"][1]
    m2["busways"][0]["feeder"], m2["busways"][1]["feeder"] = "fdr-a2", "fdr-b2"
    site = parse_site(d)
    assert sorted(map(sorted, site_feed_groups(site, ["xfmr", "xfmr-2"]))) == [["xfmr"], ["xfmr-2"]]
    usable, provisioned = site_capacity_kw(site, _rows(site), ["xfmr", "xfmr-2"])
    # xfmr (3,200 kW usable) is held to one side's feeder (3,000 x 0.8); xfmr-2 (1,600) to itself
    assert usable == pytest.approx(3000.0 * 0.8 + 2000.0 * 0.8) and provisioned == pytest.approx(300.0)


def test_site_capacity_stops_at_the_weaker_side_of_the_feeders_below_the_transformer():
    """mqtt-only: a 2,500 kVA landlord transformer (1,900 kW usable) feeds UPS A and B of 1,500 kW
    each. Every rack fails over onto one UPS, so the site delivers 1,200 kW; the report's plot drew
    the transformer's 1,900 kW as the site's usable capacity."""
    from pathlib import Path

    from podwatch.site import load_site

    site = load_site(Path(__file__).parents[3] / "examples" / "sites" / "mqtt-only.yaml")
    rows = _rows(site)
    assert rows[("landlord-xfmr", "24h")].usable_kw == pytest.approx(1900.0)
    usable, _ = site_capacity_kw(site, rows, ["landlord-xfmr"])
    assert usable == pytest.approx(1500.0 * 0.8)


def test_risk_timeline_window_of_a_single_score_per_rack_is_minutes_not_years():
    """`podwatch analyze` stores the latest score per rack; the report's risk timeline then had one
    timestamp, an axis from 2025 to 2029 and no visible score."""
    from datetime import datetime, timedelta

    import polars as pl

    from podwatch.analytics.report import risk_time_window

    t = datetime(2026, 11, 22, 22, 10, 50)
    lo, hi = risk_time_window(pl.DataFrame({"ts": [t, t], "rack": ["r1", "r2"], "probability": [0.9, 0.0]}))
    assert lo <= t <= hi and hi - lo == timedelta(minutes=10)
    many = pl.DataFrame({"ts": [t, t + timedelta(hours=3)], "rack": ["r1", "r1"], "probability": [0.1, 0.2]})
    assert risk_time_window(many) == (t, t + timedelta(hours=3))
