"""A CDU reports the pumps it has: the CDU profile maps up to 4 pumps; the collector reads the
site's installed `pumps` of each CDU (2, 3 or 4) from the simulator, no more (a pump that is not
there was a bad point in every reading), no fewer (a 4th pump used to go unread)."""

from __future__ import annotations

import pytest

from podwatch.collectors.modbus import ModbusCollector
from podwatch.samples import Quality
from podwatch.site import load_site
from tests.integration.collectors.sites import MemorySink
from tests.integration.collectors.test_site_pipeline import free_offset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SITES = __import__("pathlib").Path(__file__).resolve().parents[3] / "examples" / "sites"


@pytest.mark.parametrize("site_name", ["edge-5mw", "campus-20mw"])
async def test_each_cdu_reports_exactly_its_installed_pumps(site_name):
    from podwatch.simulators.engine import Simulator

    path = SITES / f"{site_name}.yaml"
    site = load_site(path, port_offset=free_offset(path))
    pumps = {c.id: c.pumps for c in site.cdus}
    cdu_devices = [d for d in site.devices if d.kind == "cdu" and d.protocol != "mqtt" and d.entity in pumps]
    assert cdu_devices
    sim = Simulator(site)
    await sim.start()
    collector = ModbusCollector(site, MemorySink(), devices=cdu_devices)
    try:
        seen = set()
        for d in cdu_devices:
            reading = await collector.poll_once(d.id)
            assert reading.quality is Quality.GOOD and reading.point_quality == {}, (d.id, reading.point_quality)
            running = sorted(m for m in reading.points if m.endswith(".running"))
            assert running == [f"cdu.pump{n}.running" for n in range(1, pumps[d.entity] + 1)], d.id
            assert all(reading.points[m] in (0.0, 1.0) for m in running), d.id
            seen.add(pumps[d.entity])
        assert seen  # the sites cover 2-, 3- and 4-pump CDUs between them
    finally:
        collector.close()
        await sim.stop()
