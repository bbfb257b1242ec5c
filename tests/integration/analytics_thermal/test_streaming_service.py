"""Thermal analytics attached to the real storage Service (DuckDB file, HTTP API on a loopback
port): checks run on each batch, periodic scoring writes risk_scores, GET /api/risk serves them."""

from __future__ import annotations

from pathlib import Path

import httpx
import polars as pl
import pytest

from podwatch.analytics.commands import TRAIN_RANGES, scenario_specs, simulate_run, train_from_runs
from podwatch.analytics.streaming import StreamingSettings, attach_analytics
from podwatch.simulators.history import generate_history
from podwatch.site import load_site
from podwatch.storage.service import Service, ServiceSettings

SITE_PATH = str(Path(__file__).parents[3] / "examples/sites/demo.yaml")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("stream-model")
    runs = [simulate_run(s, work) for s in scenario_specs([SITE_PATH], 1, 1.0, seed=21, ranges=TRAIN_RANGES,
                                                           prefix="s")
            if s.faults[0]["kind"] in ("pump_failure", "flow_restriction", "leak")]
    train_from_runs(runs, horizon_s=300, max_iter=40).save(work / "model")
    return work / "model"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("trained", [True, False], ids=["trained-model", "physics-only"])
async def test_checks_and_risk_through_the_service(tmp_path, request, trained):
    model_dir = request.getfixturevalue("model_dir") if trained else None
    site = load_site(SITE_PATH)
    # 10 min of history; pump 1 and 2 of cdu-m1 trip at 7 min with no standby
    from podwatch.simulators.scenario import Scenario

    scenario = Scenario.parse({"name": "trip", "faults": [{"kind": "pump_failure", "target": "cdu-m1", "onset_s": 420,
                                                           "pumps": [1, 2], "standby_takeover": False}]}, "t", site)
    hist = generate_history(site, days=600 / 86400, resolution_s=2, scenarios=[scenario], seed=3,
                            out_dir=tmp_path / "hist")
    rows = pl.read_parquet(hist.samples_path).sort("ts")
    observed = []

    async def observe(observations):
        observed.extend(observations)

    service = Service(ServiceSettings(db=str(tmp_path / "site.duckdb"), port=0, site=SITE_PATH))
    analytics = attach_analytics(service, site, model_dir, observe=observe,
                                 settings=StreamingSettings(score_every_s=3600))  # scored by hand below
    assert analytics.model.version.startswith("thermal-hgb" if trained else "thermal-physics-only")
    received_before = analytics.health.snapshot().get("received", 0)  # the health registry is process-wide
    async with service:
        # the sink is not running (no Kafka): feed the listener the way the sink does, batch by batch
        batches = rows.with_columns(pl.col("ts").dt.truncate("20s").alias("_b")).partition_by("_b", maintain_order=True)
        for batch in batches:
            await analytics.on_batch(batch.drop("_b"))
        scores = await analytics.score_once(service)
        assert scores.height == 16
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as client:
            resp = await client.get("/api/risk")
            assert resp.status_code == 200
            risk = {r["rack"]: r for r in resp.json()}
    assert set(risk) == {r.id for r in site.racks}
    m1 = [risk[r.id] for r in site.racks if r.cdu == "cdu-m1"]
    m2 = [risk[r.id] for r in site.racks if r.cdu == "cdu-m2"]
    # the CDU that lost its pumps has high risk with reasons; the other stays ok
    assert min(r["probability"] for r in m1) >= 0.5
    assert all(r["level"] in ("warning", "critical") and r["reasons"] for r in m1)
    assert max(r["probability"] for r in m2) < 0.5
    rules = {(o.rule, o.target) for o in observed if o.active}
    assert ("pump_redundancy_lost", "cdu-m1") in rules
    assert ("flow_per_kw_low", m1[0]["rack"]) in rules
    assert ("thermal_risk", m1[0]["rack"]) in rules
    assert not any(target.startswith("m2-") or target == "cdu-m2" for rule, target in rules
                   if rule in ("pump_redundancy_lost", "flow_per_kw_low", "thermal_risk"))
    assert analytics.health.snapshot()["received"] - received_before == rows.height
