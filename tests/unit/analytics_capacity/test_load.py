"""Node design loads from PDU samples: full A+B racks per node, gaps, meters, CDU heat."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import polars as pl
import pytest

from podwatch.analytics.load import DataSourceError, node_loads, read_samples_parquet
from tests.unit.analytics_capacity.sites import small_site

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc)


def samples(rows: list[tuple[int, str, str, float | None]]) -> pl.DataFrame:
    """rows: (minute, device, metric, value)"""
    return pl.DataFrame({"ts": [T0 + timedelta(minutes=m) for m, *_ in rows], "device": [r[1] for r in rows],
                         "metric": [r[2] for r in rows], "value": [r[3] for r in rows]},
                        schema={"ts": pl.Datetime("us", "UTC"), "device": pl.String, "metric": pl.String,
                                "value": pl.Float64})


@pytest.fixture
def site():
    return small_site([{"racks": [100.0, 100.0]}, {"racks": [100.0]}], pdus=True, cdu_device=True, meter=True)


def test_busway_and_feeder_carry_full_rack_power_of_both_sides(site):
    rows = [(0, "pdu-m1-r01-a", "pdu.power_kw", 40.0), (0, "pdu-m1-r01-b", "pdu.power_kw", 60.0),
            (0, "pdu-m1-r02-a", "pdu.power_kw", 30.0), (0, "pdu-m1-r02-b", "pdu.power_kw", 30.0),
            (0, "pdu-m2-r01-a", "pdu.power_kw", 25.0), (0, "pdu-m2-r01-b", "pdu.power_kw", 25.0)]
    load = node_loads(site, samples(rows), 60)
    row = load.loads.row(0, named=True)
    assert row["bus-m1-a"] == pytest.approx(160.0)  # (40+60) + (30+30): failover load, not 70
    assert row["bus-m1-b"] == pytest.approx(160.0)
    assert row["m1-r01/a"] == pytest.approx(100.0)  # a rack feed must carry the whole rack
    assert row["fdr-a"] == pytest.approx(210.0)
    assert row["xfmr"] == pytest.approx(210.0)  # each rack once, although both paths meet here
    assert row["cdu-m1"] == pytest.approx(160.0 * 0.88)  # no heat reading: racks x heat-to-liquid share


def test_one_missing_side_is_estimated_from_the_other(site):
    rows = [(0, "pdu-m1-r01-a", "pdu.power_kw", 45.0), (0, "pdu-m1-r02-a", "pdu.power_kw", 30.0),
            (0, "pdu-m1-r02-b", "pdu.power_kw", 30.0), (0, "pdu-m2-r01-a", "pdu.power_kw", 20.0),
            (0, "pdu-m2-r01-b", "pdu.power_kw", 20.0)]
    row = node_loads(site, samples(rows), 60).loads.row(0, named=True)
    assert row["m1-r01/b"] == pytest.approx(90.0)


def test_rack_without_any_reading_leaves_node_empty_not_low(site):
    rows = [(m, dev, "pdu.power_kw", 50.0) for m in (0, 10) for dev in
            ("pdu-m1-r01-a", "pdu-m1-r01-b", "pdu-m2-r01-a", "pdu-m2-r01-b")]
    rows += [(0, "pdu-m1-r02-a", "pdu.power_kw", 50.0), (0, "pdu-m1-r02-b", "pdu.power_kw", 50.0)]
    load = node_loads(site, samples(rows), 60)
    last = load.loads.filter(pl.col("ts") == T0 + timedelta(minutes=10)).row(0, named=True)
    assert last["bus-m1-a"] is None  # m1-r02 silent for 10 min (> fill limit): unknown, not 100 kW
    assert last["bus-m2-a"] == pytest.approx(100.0)
    assert load.missing_buckets["bus-m1-a"] > 0


def test_metered_transformer_uses_meter_and_keeps_it_only_column(site):
    rows = [(0, dev, "pdu.power_kw", 50.0) for dev in ("pdu-m1-r01-a", "pdu-m1-r01-b", "pdu-m1-r02-a",
                                                       "pdu-m1-r02-b", "pdu-m2-r01-a", "pdu-m2-r01-b")]
    rows += [(0, "meter-xfmr", "meter.power_kw", 330.0), (0, "cdu-m1", "cdu.heat_removed_kw", 170.0)]
    load = node_loads(site, samples(rows), 60)
    row = load.loads.row(0, named=True)
    assert row["xfmr"] == pytest.approx(330.0)  # IT + cooling + losses
    assert row["xfmr#it"] == pytest.approx(300.0)
    assert row["fdr-a"] == pytest.approx(300.0)  # sided: failover load from PDUs
    assert row["cdu-m1"] == pytest.approx(170.0)


def test_hourly_peaks_take_the_max_bucket(site):
    rows = []
    for minute, kw in ((0, 40.0), (20, 70.0), (50, 45.0), (70, 30.0)):
        rows += [(minute, dev, "pdu.power_kw", kw) for dev in ("pdu-m1-r01-a", "pdu-m1-r01-b", "pdu-m1-r02-a",
                                                              "pdu-m1-r02-b", "pdu-m2-r01-a", "pdu-m2-r01-b")]
    peaks = node_loads(site, samples(rows), 60).hourly_peaks().sort("ts")
    assert peaks["m1-r01/a"].to_list() == pytest.approx([140.0, 60.0])


def test_empty_data_is_a_clear_error(site):
    with pytest.raises(DataSourceError, match="no pdu.power_kw"):
        node_loads(site, samples([]), 60)


def test_parquet_reader_drops_bad_quality_and_counts_it(tmp_path):
    frame = pl.DataFrame({"ts": [T0, T0 + timedelta(seconds=30), T0 + timedelta(seconds=40)],
                          "device": ["p", "p", "p"], "metric": ["pdu.power_kw"] * 3, "value": [10.0, 20.0, 999.0],
                          "quality": [0, 0, 2]})
    frame.write_parquet(tmp_path / "x.parquet")
    out, rows, bad = read_samples_parquet(tmp_path, 60)
    assert (rows, bad) == (3, 1)
    assert out["value"].to_list() == [15.0]


def test_parquet_reader_names_missing_columns(tmp_path):
    pl.DataFrame({"time": [T0], "device": ["p"]}).write_parquet(tmp_path / "x.parquet")
    with pytest.raises(DataSourceError, match="lacks column"):
        read_samples_parquet(tmp_path, 60)


EXAMPLES = __import__("pathlib").Path(__file__).parents[3] / "examples" / "sites"


def test_racks_that_report_only_through_their_bms_carry_their_own_power_figure():
    from podwatch.site import load_site
    colo = load_site(EXAMPLES / "mqtt-only.yaml")  # no PDUs: rack power comes from the BMS
    bms = {d.entity: d.id for d in colo.devices if d.kind == "rack"}
    rows = [(0, bms[r.id], "rack.power_kw", 100.0 + i) for i, r in enumerate(colo.racks)]
    row = node_loads(colo, samples(rows), 60).loads.row(0, named=True)
    total = sum(100.0 + i for i in range(len(colo.racks)))
    assert row["ups-a"] == pytest.approx(total) and row["ups-b"] == pytest.approx(total)  # failover: whole racks


def test_pdus_win_over_the_bms_figure_which_stands_in_when_they_are_silent():
    from podwatch.site import load_site
    demo = load_site(EXAMPLES / "demo.yaml")
    rows = [(0, "pdu-m1-r01-a", "pdu.power_kw", 50.0), (0, "pdu-m1-r01-b", "pdu.power_kw", 52.0),
            (0, "bms-m1-r01", "rack.power_kw", 99.0),  # the BMS's own figure differs: PDUs win
            (0, "bms-m1-r02", "rack.power_kw", 80.0)]  # m1-r02's PDUs silent: the BMS stands in
    row = node_loads(demo, samples(rows), 60).loads.row(0, named=True)
    assert row["m1-r01/a"] == pytest.approx(102.0)
    assert row["m1-r02/a"] == pytest.approx(80.0)
    assert row["m1-r03/a"] is None  # nothing at all: unknown, not zero


def test_transformer_feeding_one_side_only_carries_the_failover_load_not_its_meter_reading():
    """edge-5mw: xfmr-a feeds only the A switchgear, xfmr-b only the B one. Its meter reads the normal
    A half share (plus cooling); after a B-side failure it carries every rack in full."""
    from podwatch.site import parse_site
    from tests.unit.analytics_capacity.sites import site_dict

    d = site_dict([{"racks": [100.0, 100.0]}], pdus=True)
    d["power"]["transformers"] = [
        {"id": "xfmr-a", "rating_kw": 4000.0,
         "meter": {"id": "meter-xfmr-a", "profile": "schneider-pm5560", "gateway": "gw", "unit_id": 250}},
        {"id": "xfmr-b", "rating_kw": 4000.0,
         "meter": {"id": "meter-xfmr-b", "profile": "schneider-pm5560", "gateway": "gw", "unit_id": 251}}]
    d["power"]["feeders"][0]["transformer"] = "xfmr-a"
    d["power"]["feeders"][1]["transformer"] = "xfmr-b"
    site = parse_site(d)
    rows = [(0, dev, "pdu.power_kw", 50.0) for dev in ("pdu-m1-r01-a", "pdu-m1-r01-b", "pdu-m1-r02-a", "pdu-m1-r02-b")]
    rows += [(0, "meter-xfmr-a", "meter.power_kw", 115.0), (0, "meter-xfmr-b", "meter.power_kw", 115.0)]
    row = node_loads(site, samples(rows), 60).loads.row(0, named=True)
    assert row["xfmr-a"] == pytest.approx(200.0)  # both racks in full, not the 115 kW half share it reads
    assert row["xfmr-b"] == pytest.approx(200.0)


def test_samples_of_another_site_are_a_clear_error_not_a_table_of_dashes(site):
    """`podwatch headroom --site edge-5mw.yaml --history <mqtt-only history>` printed every node with '-' and
    `plan` answered YES on rated loads: no sample belonged to the site."""
    rows = [(0, "bms-row1-1", "rack.power_kw", 120.0), (0, "sensor-gw-row2-1", "rack.power_kw", 100.0)]
    with pytest.raises(DataSourceError, match="no load samples of any device of site 't'.*another site"):
        node_loads(site, samples(rows), 60)


def test_buckets_too_fine_for_the_span_are_a_clear_error_naming_the_flag(site):
    """`headroom --bucket-s 1` over a year built a grid of 31 M buckets x every node and filled the
    machine's memory; it is refused before the grid is built, with a bucket size that fits."""
    rows = [(0, "pdu-m1-r01-a", "pdu.power_kw", 40.0), (400 * 24 * 60, "pdu-m1-r01-a", "pdu.power_kw", 41.0)]
    with pytest.raises(DataSourceError, match=r"--bucket-s 1: 400\.0 days .* use --bucket-s (\d+) or more") as info:
        node_loads(site, samples(rows), 1)
    suggested = int(info.value.args[0].split("use --bucket-s ")[1].split()[0])
    assert node_loads(site, samples(rows), suggested).loads.height == 400 * 86400 // suggested + 1


def test_duckdb_reader_refuses_bucketed_rows_beyond_its_cap(tmp_path, monkeypatch):
    import duckdb

    from podwatch.analytics import load as load_module

    con = duckdb.connect(str(tmp_path / "s.duckdb"))
    con.execute("CREATE TABLE samples AS SELECT TIMESTAMP '2026-03-02' + to_seconds(i * 3600) AS ts, 'pdu-1' AS device, "
                "'pdu.power_kw' AS metric, 50.0 AS value, 0 AS quality FROM range(48) r(i)")
    monkeypatch.setattr(load_module, "MAX_BUCKETED_ROWS", 20)
    with pytest.raises(DataSourceError, match=r"--bucket-s 60: 2\.0 days .* use --bucket-s 8906 or more"):
        load_module.read_samples_connection(con, 60)
    frame, rows, _ = load_module.read_samples_connection(con, 8906)  # the suggested bucket fits
    assert rows == 48 and frame.height <= 20
