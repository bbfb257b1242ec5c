"""Topology tables (topo_racks, topo_devices, topo_power, topo_cdus) loaded from the site model.

`load_topology(con, site)` replaces the four tables in one transaction, so readers see the
old topology or the new one, never a mix. The views (`rack_power`, `cdu_loops`, `substation`)
and the API's rack/module filters join on these tables.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from podwatch.errors import PodwatchError
from podwatch.site import Site, load_site


def load_topology(con: duckdb.DuckDBPyConnection, site: Site) -> dict[str, int]:
    rack_ids = {r.id for r in site.racks}
    cdu_ids = {c.id for c in site.cdus}
    racks = [(r.id, r.module, r.cdu, r.rated_kw, r.workload, r.feed_a, r.feed_b, r.design_flow_lpm, r.return_limit_c)
             for r in site.racks]
    devices = [
        (d.id, d.kind, d.protocol, d.profile, d.entity, d.module, d.side,
         d.entity if d.entity in rack_ids else None,
         d.entity if d.entity in cdu_ids else None,
         d.entity if d.entity in site.power_nodes else None,
         d.poll_interval_s)
        for d in site.devices
    ]
    power = [(n.id, n.kind, n.parent, n.side, n.module, n.nameplate_kw, n.usable_kw) for n in site.power_nodes.values()]
    cdus = [(c.id, site.module_of_cdu(c.id), c.capacity_kw, c.pumps, c.supply_setpoint_c,
             ",".join(r.id for r in site.racks_of_cdu(c.id))) for c in site.cdus]
    con.execute("BEGIN TRANSACTION")
    try:
        stored = con.execute("SELECT value FROM podwatch_meta WHERE key = 'site'").fetchone()
        if stored and stored[0] != site.id:
            raise PodwatchError(f"this DuckDB file holds site {stored[0]!r}, the site file describes site "
                                f"{site.id!r}: one file holds one site (use another --db for {site.id!r})")
        con.execute("INSERT OR IGNORE INTO podwatch_meta VALUES ('site', ?)", [site.id])
        for table, rows, width in (("topo_racks", racks, 9), ("topo_devices", devices, 11), ("topo_power", power, 7),
                                   ("topo_cdus", cdus, 6)):
            con.execute(f"DELETE FROM {table}")
            if rows:
                con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * width)})", rows)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return {"racks": len(racks), "devices": len(devices), "power": len(power), "cdus": len(cdus)}


def load_topology_file(con: duckdb.DuckDBPyConnection, path: str) -> dict[str, int]:
    """Load the site file (raises ConfigError naming the bad fields) into the topology tables."""
    return load_topology(con, load_site(path))


def check_file_site(db: str | Path, site_id: str) -> None:
    """Raise PodwatchError when the DuckDB file `db` records a site other than `site_id` (one
    file holds one site). A file that cannot be opened here (missing, held by `podwatch serve`)
    or that records no site passes: the command's own open reports those."""
    import duckdb

    if not Path(db).exists():
        return
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error:
        return
    try:
        stored = con.execute("SELECT value FROM podwatch_meta WHERE key = 'site'").fetchone()
    except duckdb.Error:
        return
    finally:
        con.close()
    if stored and stored[0] != site_id:
        raise PodwatchError(f"{db} holds site {stored[0]!r}, the site file describes site {site_id!r}: "
                            f"one file holds one site (give the site file of {stored[0]!r}, or another --db)")
