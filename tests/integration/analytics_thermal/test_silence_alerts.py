"""When nothing arrives at all (the collector, the broker or the network is down), the serve
process gets no batch, so the per-batch checks never run: the silence itself must still raise
`sensor_stale` for every device, on the real storage Service with the alert engine attached."""

from __future__ import annotations

from pathlib import Path

import pytest

from podwatch.analytics.alerting import attach_alerting
from podwatch.analytics.alerting.settings import settings_from_dict
from podwatch.analytics.alerting.store import list_alerts
from podwatch.analytics.streaming import StreamingSettings, attach_analytics
from podwatch.site import load_site
from podwatch.storage.service import Service, ServiceSettings
from tests.conftest import wait_until
from tests.unit.analytics_thermal.frames import healthy_rows

SITE_PATH = str(Path(__file__).parents[3] / "examples/sites/edge-5mw.yaml")


@pytest.mark.timeout(60)
async def test_a_silent_pipeline_raises_sensor_stale_for_every_device(tmp_path):
    site = load_site(SITE_PATH)
    service = Service(ServiceSettings(db=str(tmp_path / "site.duckdb"), port=0, site=SITE_PATH))
    alerting = attach_alerting(service, settings_from_dict({}), site=site)
    # clock_speed 40: 1 s of silence is 40 s of sample time (the simulator's --speed); stale after 10 s
    analytics = attach_analytics(service, site, None, observe=alerting.observe,
                                 settings=StreamingSettings(score_every_s=3600, silence_after_s=2.0, clock_speed=40.0))
    async with service:
        await analytics.on_batch(healthy_rows(site, 0, 10))  # then nothing: the collector died
        devices = {d.id for d in site.devices}

        def stale_alerts():
            rows = service.db.connection.cursor().execute(
                "SELECT target, state, annotations FROM alerts WHERE rule = 'sensor_stale'").fetchall()
            return {t: (s, a) for t, s, a in rows if s == "firing"}

        firing = await wait_until(lambda: set(stale_alerts()) == devices and stale_alerts(), timeout=30,
                                  what="sensor_stale firing for every device while no batch arrives")
        state, annotations = firing["cdu-m1"]
        assert "no good sample for" in annotations
    await alerting.aclose()
    assert len(devices) > 100


@pytest.mark.timeout(30)
async def test_a_stale_after_metric_rule_fires_when_no_batch_arrives(tmp_path):
    import duckdb
    from datetime import UTC, datetime

    import polars as pl

    from podwatch.analytics.alerting import build_runtime, load_rules

    rules = load_rules(text="""
rules:
  - {id: flow_silent, source: metric, metric: cdu.flow_lpm, stale_after: 1s, annotations: {summary: "{target} silent"}}
""", include_defaults=False)
    con = duckdb.connect(str(tmp_path / "a.duckdb"))
    runtime = build_runtime(con, settings_from_dict({}), rules=rules)
    runtime.silence_after_s = 0.2
    try:
        now = datetime.now(UTC)
        await runtime.on_batch(pl.DataFrame({"ts": [now], "device": ["cdu-m1"], "metric": ["cdu.flow_lpm"],
                                             "value": [900.0], "quality": [0]}))
        assert not list_alerts(con, state="firing")

        async def fired():
            await runtime.deliver()
            return [a for a in list_alerts(con, state="firing") if a["rule"] == "flow_silent"]

        alert = (await wait_until(fired, timeout=10, what="flow_silent firing without any further batch"))[0]
        assert alert["target"] == "cdu-m1" and "no good sample of cdu.flow_lpm" in alert["annotations"]["reasons"]
    finally:
        await runtime.aclose()
        con.close()
