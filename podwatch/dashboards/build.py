"""podwatch's Grafana dashboards, built with grafana-foundation-sdk (never hand-written JSON).

Five dashboards with stable uids (`DASHBOARD_UIDS`): site overview, module, rack thermal, CDU
and pipeline health. Every data panel reads the podwatch HTTP API through the Infinity
datasource (one datasource per site API; the `site` variable picks it), so each panel's
query is an API call that `panel_queries()` lists and `podwatch dashboards check` runs.
The pipeline dashboard also has an optional row of Prometheus panels over `/metrics`.

Public API:
    build_dashboards() -> list[Dashboard]                  SDK builders
    dashboard_docs() -> dict[uid, dict]                   JSON documents, as Grafana stores them
    panel_queries(docs) -> list[PanelQuery]                every API call a panel or variable makes
    prometheus_queries(docs) -> list[PrometheusQuery]      every PromQL expression
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import NamedTuple

from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.builders.common import ReduceDataOptions, StackingConfig, TableSortByFieldState
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, Row, ThresholdsConfig
from grafana_foundation_sdk.builders.heatmap import Panel as Heatmap
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.statetimeline import Panel as StateTimeline
from grafana_foundation_sdk.builders.table import Panel as Table
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import StackingMode
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    DataTransformerConfig,
    DynamicConfigValue,
    MatcherConfig,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableOption,
)

from podwatch.dashboards.infinity import (
    INFINITY_TYPE,
    INFINITY_UID,
    PROMETHEUS_UID,
    Column,
    InfinityQuery,
    InfinityVariable,
    RowFilter,
    SITE_DS,
)

TAGS = ["podwatch"]
DASHBOARD_UIDS = {
    "site": "podwatch-site-overview",
    "module": "podwatch-module",
    "rack": "podwatch-rack-thermal",
    "cdu": "podwatch-cdu",
    "pipeline": "podwatch-pipeline",
}
PROM_DS = DataSourceRef(type_val="prometheus", uid="${prometheus}")
RANGE = {"from": "${__from}", "to": "${__to}"}
RACK_RETURN_LIMIT_C = 55.0  # default of the site file's thermal.rack_return_limit_c

TIME = Column("time", "timestamp")
VALUE = Column("value", "number")
DEVICE = Column("device", "string")
METRIC = Column("metric", "string")
STATE_MAPPINGS = [ValueMap(options={
    "0": ValueMappingResult(text="OK", color="green", index=0),
    "1": ValueMappingResult(text="Warning", color="orange", index=1),
    "2": ValueMappingResult(text="Critical", color="red", index=2),
})]
PUMP_MAPPINGS = [ValueMap(options={
    "0": ValueMappingResult(text="stopped", color="red", index=0),
    "1": ValueMappingResult(text="running", color="green", index=1),
})]
LEVEL_MAPPINGS = [ValueMap(options={
    "ok": ValueMappingResult(color="green", index=0),
    "watch": ValueMappingResult(color="yellow", index=1),
    "warning": ValueMappingResult(color="orange", index=2),
    "critical": ValueMappingResult(color="red", index=3),
})]


# --------------------------------------------------------------------------- small helpers

def series_query(ref: str, params: dict[str, str], by: Column = DEVICE, step: str | None = None,
                 filters: tuple[RowFilter, ...] = ()) -> InfinityQuery:
    """GET /api/series as a long frame (time, <by>, value) that Infinity turns into one series per `by`."""
    query = {**params, **RANGE}
    if step:
        query["step"] = step
    return InfinityQuery(ref, "/api/series", query, [TIME, by, VALUE], "timeseries", filters)


def named_series(ref: str, params: dict[str, str], name: str, step: str | None = None) -> InfinityQuery:
    """GET /api/series for one device+metric as (time, <name>): a single named field that
    transformations (join, binary calculation) can refer to."""
    query = {**params, **RANGE}
    if step:
        query["step"] = step
    return InfinityQuery(ref, "/api/series", query, [TIME, Column("value", "number", name)], "table")


def thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(value=value, color=color) for value, color in steps])


def by_device_name() -> str:
    return "${__field.labels.device}"


def transformation(id_: str, options: dict, ref_id: str | None = None) -> DataTransformerConfig:
    matcher = MatcherConfig(id_val="byRefId", options=ref_id) if ref_id else None
    return DataTransformerConfig(id_val=id_, options=options, filter_val=matcher)


def join_on_time() -> DataTransformerConfig:
    return transformation("joinByField", {"byField": "time", "mode": "outer"})


def binary(left: str, operator: str, right: str, alias: str) -> DataTransformerConfig:
    return transformation("calculateField", {
        "mode": "binary", "alias": alias, "replaceFields": False,
        "binary": {"left": left, "operator": operator, "right": right},
    })


def site_variable() -> DatasourceVariable:
    return (DatasourceVariable("site").label("Site").type(INFINITY_TYPE).regex("/podwatch/")
            .description("One Infinity datasource per podwatch site API (uid podwatch-api by default)")
            .current(VariableOption(selected=True, text="podwatch", value=INFINITY_UID)))


def prometheus_variable() -> DatasourceVariable:
    return (DatasourceVariable("prometheus").label("Prometheus").type("prometheus")
            .description("Optional: a Prometheus that scrapes the podwatch API's /metrics")
            .current(VariableOption(selected=True, text="podwatch-prometheus", value=PROMETHEUS_UID)))


def module_variable() -> InfinityVariable:
    return InfinityVariable("module", "Module", "/api/topology/racks", None, "module")


def rack_variable() -> InfinityVariable:
    return InfinityVariable("rack", "Rack", "/api/topology/racks", None, "rack",
                            filters=(RowFilter("module", "==", "${module}"),))


def cdu_variable() -> InfinityVariable:
    return InfinityVariable("cdu", "CDU", "/api/topology/cdus", None, "cdu",
                            filters=(RowFilter("module", "==", "${module}"),))


def node_variable() -> InfinityVariable:
    return InfinityVariable("node", "Site feed (transformer)", "/api/topology/power", None, "node",
                            filters=(RowFilter("kind", "==", "transformer"),))


def _dashboard(key: str, title: str, description: str) -> Dashboard:
    return (Dashboard(title).uid(DASHBOARD_UIDS[key]).description(description).tags(TAGS)
            .refresh("30s").time("now-6h", "now").timezone("browser").editable())


# --------------------------------------------------------------------------- dashboards

def site_overview() -> Dashboard:
    headroom_cols = [Column("node", "string"), Column("horizon", "string")]
    headroom_filter = (RowFilter("node", "==", "${node}"), RowFilter("horizon", "==", "24h"))
    return (
        _dashboard("site", "podwatch / Site overview",
                   "Site power against usable capacity and its forecast, headroom and stranded power, "
                   "cooling overhead and active alerts.")
        .with_variable(site_variable())
        .with_variable(node_variable())
        .with_row(Row("Power and capacity"))
        .with_panel(
            Timeseries().title("Site power vs usable capacity and 24 h forecast (${node})")
            .description("Meter power of transformer ${node} (not the feeder or busway meters); the forecast's "
                         "p50-p99 band and the usable capacity (rating x 0.8, weaker A/B side) of the site feed, "
                         "from /api/forecasts. With one transformer per side the meter reads that side's normal "
                         "share while the forecast is the failover load it must carry when the other side fails.")
            .datasource(SITE_DS).unit("kwatt").min(0).span(16).height(9)
            .with_target(series_query("A", {"node": "${node}", "metric": "meter.power_kw"}))
            .with_target(InfinityQuery("B", "/api/forecasts", {"node": "${node}", "horizon": "24h"},
                                       [TIME, Column("usable_kw", "number"), Column("p50_kw", "number"),
                                        Column("p95_kw", "number"), Column("p99_kw", "number")]))
            .display_name("${__field.labels.device}")
            .override_by_name("usable_kw", [DynamicConfigValue("displayName", "usable capacity"),
                                            DynamicConfigValue("color", {"mode": "fixed", "fixedColor": "red"}),
                                            DynamicConfigValue("custom.lineStyle", {"fill": "dash", "dash": [10, 10]})])
            .override_by_name("p99_kw", [DynamicConfigValue("displayName", "forecast p99"),
                                         DynamicConfigValue("custom.fillBelowTo", "p50_kw"),
                                         DynamicConfigValue("custom.fillOpacity", 20)])
            .override_by_name("p50_kw", [DynamicConfigValue("displayName", "forecast p50")])
            .override_by_name("p95_kw", [DynamicConfigValue("displayName", "forecast p95")])
        )
        .with_panel(
            Stat().title("Headroom, 24 h (${node})")
            .description("Usable capacity minus the forecast p99 peak.")
            .datasource(SITE_DS).unit("kwatt").span(4).height(9)
            .with_target(InfinityQuery("A", "/api/headroom", None,
                                       [*headroom_cols, Column("headroom_kw", "number")], filters=headroom_filter))
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).fields("headroom_kw"))
            .thresholds(thresholds((None, "red"), (0, "orange"), (100, "green")))
        )
        .with_panel(
            Stat().title("Stranded power, 24 h (${node})")
            .description("Provisioned (allocated) power minus the forecast p99 peak: paid for, never drawn.")
            .datasource(SITE_DS).unit("kwatt").span(4).height(9)
            .with_target(InfinityQuery("A", "/api/headroom", None,
                                       [*headroom_cols, Column("stranded_kw", "number")], filters=headroom_filter))
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).fields("stranded_kw"))
        )
        .with_panel(
            Table().title("Headroom and stranded power by power node")
            .description("Latest forecast per node and horizon (/api/headroom).")
            .datasource(SITE_DS).span(24).height(8)
            .with_target(InfinityQuery("A", "/api/headroom", None, [
                Column("node", "string"), Column("node_kind", "string"), Column("horizon", "string"),
                Column("usable_kw", "number"), Column("provisioned_kw", "number"),
                Column("measured_peak_kw", "number"), Column("p99_kw", "number"),
                Column("headroom_kw", "number"), Column("stranded_kw", "number")]))
            .unit("kwatt")
        )
        .with_row(Row("Cooling overhead"))
        .with_panel(
            Stat().title("PUE-style overhead (meter / IT power)")
            .description("Power of the transformer meters (every substation transformer; feeder and busway "
                         "meters would count the same load twice) divided by IT power (every rack's PDUs, or "
                         "its BMS figure where it has no PDU reading), newest values. 1.00 would mean no "
                         "cooling or distribution overhead.")
            .datasource(SITE_DS).decimals(2).span(6).height(8)
            .with_target(InfinityQuery("A", "/api/latest", {"node_kind": "transformer", "metric": "meter.power_kw"},
                                       [Column("value", "number", "facility_kw")]))
            .with_target(InfinityQuery("B", "/api/rack_power", {"latest": "true"},
                                       [Column("power_kw", "number", "it_kw")]))
            .with_transformation(transformation("reduce", {"mode": "reduceFields", "reducers": ["sum"]}))
            .with_transformation(transformation("concatenate", {"frameNameMode": "drop"}))
            .with_transformation(binary("facility_kw", "/", "it_kw", "overhead_ratio"))
            .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).fields("overhead_ratio"))
            .thresholds(thresholds((None, "green"), (1.3, "orange"), (1.6, "red")))
        )
        .with_panel(
            Timeseries().title("Facility power and IT power")
            .description("Transformer meter power (all substation transformers) and IT power (every rack's "
                         "PDUs, or its BMS figure where it has no PDU reading) per minute; their ratio is the "
                         "overhead.")
            .datasource(SITE_DS).unit("kwatt").min(0).span(18).height(8)
            .with_target(named_series("A", {"node_kind": "transformer", "metric": "meter.power_kw"}, "facility_kw",
                                      step="1m"))
            .with_target(InfinityQuery("B", "/api/rack_power", {**RANGE, "step": "1m"},
                                       [TIME, Column("rack", "string"), Column("power_kw", "number", "value")]))
            .with_transformation(transformation("groupBy", {"fields": {  # one row per minute per transformer
                "time": {"aggregations": [], "operation": "groupby"},
                "facility_kw": {"aggregations": ["sum"], "operation": "aggregate"}}}, ref_id="A"))
            .with_transformation(transformation("groupBy", {"fields": {
                "time": {"aggregations": [], "operation": "groupby"},
                "value": {"aggregations": ["sum"], "operation": "aggregate"}}}, ref_id="B"))
            .with_transformation(transformation("organize", {"renameByName": {"value (sum)": "it_kw",
                                                                              "facility_kw (sum)": "facility_kw"}}))
            .with_transformation(join_on_time())
            .with_transformation(binary("facility_kw", "/", "it_kw", "overhead_ratio"))
            .override_by_name("overhead_ratio", [DynamicConfigValue("unit", "none"),
                                                 DynamicConfigValue("custom.axisPlacement", "right")])
        )
        .with_row(Row("Alerts"))
        .with_panel(
            Stat().title("Firing alerts").datasource(SITE_DS).span(4).height(6).no_value("0")
            .with_target(InfinityQuery("A", "/api/alerts", {"state": "firing", "format": "csv"},
                                       [Column("alert_id", "string")], format_="table").csv())
            .reduce_options(ReduceDataOptions().calcs(["count"]).fields("/.*/"))
            .thresholds(thresholds((None, "green"), (1, "red")))
        )
        .with_panel(
            Table().title("Active alerts").datasource(SITE_DS).span(20).height(8)
            .description("Pending and firing alerts, newest change first (/api/alerts).")
            .with_target(InfinityQuery("A", "/api/alerts", {"state": "firing,pending", "format": "csv"}, [
                Column("time", "timestamp", "since"), Column("severity", "string"), Column("state", "string"),
                Column("rule", "string"), Column("target", "string"), Column("value", "number"),
                Column("annotations", "string")]).csv())
            .override_by_name("severity", [DynamicConfigValue("mappings", [{"type": "value", "options": {
                "critical": {"color": "red", "index": 0}, "warning": {"color": "orange", "index": 1},
                "info": {"color": "blue", "index": 2}}}]),
                DynamicConfigValue("custom.cellOptions", {"type": "color-text"})])
        )
    )


def module_dashboard() -> Dashboard:
    busway_cols = [Column("node", "string"), Column("node_kind", "string"), Column("module", "string"),
                   Column("horizon", "string"), Column("usable_kw", "number"), Column("measured_peak_kw", "number"),
                   Column("p99_kw", "number"), Column("headroom_kw", "number")]
    dash = (
        _dashboard("module", "podwatch / Module",
                   "Busway load per feed (A and B) and the module's CDU loops.")
        .with_variable(site_variable())
        .with_variable(module_variable())
        .with_variable(cdu_variable())
        .with_row(Row("Busway load per feed"))
    )
    for side in ("a", "b"):
        dash = dash.with_panel(
            Timeseries().title(f"{side.upper()} feed: rack PDUs on the {side.upper()} busway (stacked)")
            .description(f"Power of every {side.upper()}-side rack PDU in ${{module}}, stacked: the top of the "
                         f"stack is the {side.upper()} busway load. In 2N each side must be able to carry both.")
            .datasource(SITE_DS).unit("kwatt").min(0).span(12).height(9)
            .with_target(series_query("A", {"module": "${module}", "side": side, "metric": "pdu.power_kw"}, step="1m"))
            .stacking(StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(35)
            .display_name(by_device_name())
        )
    return (
        dash.with_panel(
            Table().title("Busways: peak and forecast vs usable capacity")
            .datasource(SITE_DS).unit("kwatt").span(24).height(6)
            .with_target(InfinityQuery("A", "/api/headroom", None, busway_cols,
                                       filters=(RowFilter("node_kind", "==", "busway"),
                                                RowFilter("module", "==", "${module}"))))
        )
        .with_row(Row("CDU loops (${cdu})"))
        .with_panel(
            Timeseries().title("Secondary loop temperatures").datasource(SITE_DS).unit("celsius").span(12).height(8)
            .with_target(series_query("A", {"cdu": "${cdu}",
                                            "metric": "cdu.supply_temp_c,cdu.return_temp_c,cdu.supply_setpoint_c"},
                                      by=METRIC))
            .display_name("${__field.labels.metric}")
        )
        .with_panel(
            Timeseries().title("Loop flow").datasource(SITE_DS).unit("litre/min").min(0).span(6).height(8)
            .with_target(series_query("A", {"cdu": "${cdu}", "metric": "cdu.flow_lpm"}, by=METRIC))
            .display_name("${__field.labels.metric}")
        )
        .with_panel(
            Timeseries().title("Heat removed").datasource(SITE_DS).unit("kwatt").min(0).span(6).height(8)
            .with_target(series_query("A", {"cdu": "${cdu}", "metric": "cdu.heat_removed_kw"}, by=METRIC))
            .display_name("${__field.labels.metric}")
        )
        .with_panel(
            Timeseries().title("Rack coolant return temperature, ${module}")
            .datasource(SITE_DS).unit("celsius").span(24).height(8)
            .with_target(series_query("A", {"module": "${module}", "metric": "rack.liquid_return_temp_c"}))
            .display_name(by_device_name())
            .thresholds(thresholds((None, "green"), (RACK_RETURN_LIMIT_C - 5, "orange"), (RACK_RETURN_LIMIT_C, "red")))
        )
    )


def rack_thermal() -> Dashboard:
    return (
        _dashboard("rack", "podwatch / Rack thermal",
                   "Thermal risk of every rack with its reasons; coolant supply, return, delta-T and flow "
                   "of one rack; rack power heatmap of the module.")
        .with_variable(site_variable())
        .with_variable(module_variable())
        .with_variable(rack_variable())
        .with_row(Row("Thermal risk"))
        .with_panel(
            Table().title("Thermal risk by rack (latest)")
            .description("Probability that the rack's coolant return crosses its limit within the horizon, "
                         "with the model's reasons, most important first (/api/risk).")
            .datasource(SITE_DS).span(24).height(9)
            .with_target(InfinityQuery("A", "/api/risk", {"format": "csv"}, [
                TIME, Column("rack", "string"), Column("level", "string"), Column("probability", "number"),
                Column("horizon_s", "number"), Column("reasons", "string")]).csv())
            .override_by_name("level", [DynamicConfigValue("mappings", [m.to_json() for m in LEVEL_MAPPINGS]),
                                        DynamicConfigValue("custom.cellOptions", {"type": "color-background"})])
            .override_by_name("probability", [DynamicConfigValue("unit", "percentunit")])
        )
        .with_panel(
            Timeseries().title("Breach probability (${rack})").datasource(SITE_DS)
            .unit("percentunit").min(0).max(1).span(8).height(8)
            .with_target(InfinityQuery("A", "/api/risk", {"rack": "${rack}", **RANGE},
                                       [TIME, Column("probability", "number")]))
            .thresholds(thresholds((None, "green"), (0.3, "orange"), (0.7, "red")))
        )
        .with_panel(
            Timeseries().title("Coolant supply, return and delta-T (${rack})")
            .description("Rack manifold temperatures from the rack BMS; delta_t_c = return - supply.")
            .datasource(SITE_DS).unit("celsius").span(16).height(8)
            .with_target(named_series("A", {"rack": "${rack}", "metric": "rack.liquid_supply_temp_c"}, "supply_temp_c"))
            .with_target(named_series("B", {"rack": "${rack}", "metric": "rack.liquid_return_temp_c"}, "return_temp_c"))
            .with_transformation(join_on_time())
            .with_transformation(binary("return_temp_c", "-", "supply_temp_c", "delta_t_c"))
            .override_by_name("delta_t_c", [DynamicConfigValue("custom.axisPlacement", "right")])
        )
        .with_panel(
            Timeseries().title("Coolant flow and differential pressure (${rack})").datasource(SITE_DS)
            .span(12).height(8)
            .with_target(series_query("A", {"rack": "${rack}",
                                            "metric": "rack.liquid_flow_lpm,rack.liquid_diff_pressure_kpa"}, by=METRIC))
            .display_name("${__field.labels.metric}")
            .override_by_regexp(".*diff_pressure.*", [DynamicConfigValue("unit", "kpa"),
                                                      DynamicConfigValue("custom.axisPlacement", "right")])
            .override_by_regexp(".*flow_lpm.*", [DynamicConfigValue("unit", "litre/min")])
        )
        .with_panel(
            Heatmap().title("Rack power, ${module} (kW per rack per minute)")
            .description("One row per rack (its PDUs, or its BMS figure where it has no PDU reading), one "
                         "column per minute; hot cells are busy racks.")
            .datasource(SITE_DS).calculate(False).unit("kwatt").span(12).height(8)
            .with_target(InfinityQuery("A", "/api/rack_power", {"module": "${module}", **RANGE, "step": "1m"},
                                       [TIME, Column("rack", "string"), Column("power_kw", "number", "value")],
                                       "timeseries"))
            .display_name("${__field.labels.rack}")
        )
    )


def cdu_dashboard() -> Dashboard:
    pumps = range(1, 5)
    return (
        _dashboard("cdu", "podwatch / CDU",
                   "Pumps, loop pressure, approach temperature, reservoir and leak detection of one CDU.")
        .with_variable(site_variable())
        .with_variable(module_variable())
        .with_variable(cdu_variable())
        .with_row(Row("Pumps (${cdu})"))
        .with_panel(
            Timeseries().title("Pump speed").datasource(SITE_DS).unit("percent").min(0).max(100).span(12).height(8)
            .with_target(series_query("A", {"cdu": "${cdu}",
                                            "metric": ",".join(f"cdu.pump{n}.speed_pct" for n in pumps)}, by=METRIC))
            .display_name("${__field.labels.metric}")
        )
        .with_panel(
            StateTimeline().title("Pumps running").datasource(SITE_DS).span(12).height(8)
            .with_target(series_query("A", {"cdu": "${cdu}",
                                            "metric": ",".join(f"cdu.pump{n}.running" for n in pumps)}, by=METRIC))
            .display_name("${__field.labels.metric}").mappings(PUMP_MAPPINGS)
        )
        .with_row(Row("Loop"))
        .with_panel(
            Timeseries().title("Loop pressure").datasource(SITE_DS).unit("kpa").span(8).height(8)
            .with_target(series_query("A", {"cdu": "${cdu}", "metric":
                                            "cdu.supply_pressure_kpa,cdu.return_pressure_kpa,cdu.diff_pressure_kpa"},
                                      by=METRIC))
            .display_name("${__field.labels.metric}")
        )
        .with_panel(
            Timeseries().title("Approach: secondary supply - facility supply").datasource(SITE_DS)
            .description("How close the heat exchanger brings the secondary supply to the facility water; "
                         "a growing approach at the same load means fouling or low facility flow.")
            .unit("celsius").span(8).height(8)
            .with_target(named_series("A", {"cdu": "${cdu}", "metric": "cdu.supply_temp_c"}, "supply_temp_c"))
            .with_target(named_series("B", {"cdu": "${cdu}", "metric": "cdu.facility_supply_temp_c"},
                                      "facility_supply_temp_c"))
            .with_transformation(join_on_time())
            .with_transformation(binary("supply_temp_c", "-", "facility_supply_temp_c", "approach_c"))
            .override_by_name("approach_c", [DynamicConfigValue("custom.axisPlacement", "right"),
                                             DynamicConfigValue("unit", "kelvin")])
        )
        .with_panel(
            Timeseries().title("Reservoir level").datasource(SITE_DS).unit("percent").min(0).max(100).span(8).height(8)
            .with_target(series_query("A", {"cdu": "${cdu}", "metric": "cdu.reservoir_level_pct"}, by=METRIC))
            .display_name("${__field.labels.metric}")
            .thresholds(thresholds((None, "red"), (20, "orange"), (40, "green")))
        )
        .with_panel(
            StateTimeline().title("Leak detection and unit status").datasource(SITE_DS).span(24).height(6)
            .with_target(series_query("A", {"cdu": "${cdu}", "metric": "cdu.leak_state,cdu.status"}, by=METRIC))
            .display_name("${__field.labels.metric}").mappings(STATE_MAPPINGS)
        )
    )


def pipeline_dashboard() -> Dashboard:
    def pipeline_stat(title: str, column: str, unit: str, description: str, span: int = 4) -> Stat:
        return (Stat().title(title).description(description).datasource(SITE_DS).unit(unit).span(span).height(5)
                .with_target(InfinityQuery("A", "/api/pipeline", None, [TIME, Column(column, "number")]))
                .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).fields(column)))

    def prom_panel(title: str, expr: str, legend: str, unit: str) -> Timeseries:
        return (Timeseries().title(title).datasource(PROM_DS).unit(unit).span(12).height(8)
                .with_target(prom.Dataquery().expr(expr).legend_format(legend).datasource(PROM_DS)))

    return (
        _dashboard("pipeline", "podwatch / Pipeline health",
                   "Ingest rate, consumer lag, dead letters, batch latency and collector errors of podwatch itself.")
        .with_variable(site_variable())
        .with_variable(prometheus_variable())
        .with_row(Row("Now (podwatch API /api/pipeline)"))
        .with_panel(pipeline_stat("Ingest rate", "points_per_s", "short",
                                  "Sample points written to DuckDB per second (10 s window)."))
        .with_panel(pipeline_stat("Consumer lag", "lag_messages", "short",
                                  "Messages behind the Kafka high watermark, all partitions."))
        .with_panel(pipeline_stat("Dead letters", "dead_letters", "short",
                                  "Messages that could not be decoded, sent to podwatch.deadletter.v1."))
        .with_panel(pipeline_stat("Duplicates dropped", "duplicates", "short",
                                  "Readings dropped as already stored (device, sequence)."))
        .with_panel(pipeline_stat("Batch latency", "batch_latency_s", "s",
                                  "Fetch-to-commit time of the last batch."))
        .with_panel(pipeline_stat("DuckDB file", "db_bytes", "bytes", "Size of the DuckDB file with its WAL."))
        .with_panel(
            Table().title("Newest reading per device and metric (oldest first)")
            .description("A collector that stopped shows here first; quality 1 = stale, 2 = bad.")
            .datasource(SITE_DS).span(24).height(8)
            .with_target(InfinityQuery("A", "/api/latest", None, [TIME, DEVICE, METRIC, VALUE,
                                                                   Column("quality", "number")]))
            .sort_by([TableSortByFieldState().display_name("time").desc(False)])
        )
        # Collapsed: a Grafana without the optional Prometheus datasource shows no errors.
        .with_row(
            Row("History (optional Prometheus datasource scraping /metrics)").collapsed(True)
            .with_panel(prom_panel("Ingest rate (points/s)", "rate(podwatch_ingest_points_total[1m])", "points/s",
                                   "short"))
            .with_panel(prom_panel("Consumer lag by partition", "podwatch_ingest_lag_messages",
                                   "partition {{partition}}", "short"))
            .with_panel(prom_panel("Dead letters per minute", "increase(podwatch_ingest_dead_letters_total[1m])",
                                   "dead letters", "short"))
            .with_panel(prom_panel("Batch latency p95",
                                   "histogram_quantile(0.95, rate(podwatch_ingest_batch_latency_seconds_bucket[5m]))",
                                   "p95", "s"))
            .with_panel(prom_panel("Collector errors per minute",
                                   "sum by (component, instance) (increase(podwatch_component_errors_total[1m]))",
                                   "{{component}} {{instance}}", "short"))
        )
    )


def build_dashboards() -> list[Dashboard]:
    return [site_overview(), module_dashboard(), rack_thermal(), cdu_dashboard(), pipeline_dashboard()]


def to_json_doc(dashboard: Dashboard) -> dict:
    """The dashboard as Grafana's JSON model (plain dicts), with panel ids 1..n in layout
    order (the SDK leaves them unset; stable ids keep panel links and exports stable)."""
    doc = json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))
    next_id = 1
    for panel in _iter_panels(doc):
        panel["id"] = next_id
        next_id += 1
    return doc


def dashboard_docs() -> dict[str, dict]:
    return {doc["uid"]: doc for doc in (to_json_doc(d) for d in build_dashboards())}


# --------------------------------------------------------------------------- query inventory

@dataclass(frozen=True)
class PanelQuery:
    """One API call a panel target (or a query variable) makes through Infinity.

    Unpacks as the 4-tuple (dashboard_uid, panel_title, url_template, expected_columns); the
    rest (ref_id, Infinity row filters, CSV or JSON, may the answer be empty) are attributes.
    """

    dashboard_uid: str
    panel_title: str
    url_template: str                      # relative to the API base; ${__from}, ${rack}, ... unresolved
    expected_columns: dict[str, str]       # JSON key (selector) -> Infinity type
    ref_id: str = "A"
    filters: tuple[RowFilter, ...] = ()
    csv: bool = False
    may_be_empty: bool = False             # e.g. active alerts: none firing is a valid answer

    def __iter__(self):
        return iter((self.dashboard_uid, self.panel_title, self.url_template, self.expected_columns))


class PrometheusQuery(NamedTuple):
    dashboard_uid: str
    panel_title: str
    expr: str


# Queries whose empty answer is a correct answer, not a broken panel.
MAY_BE_EMPTY = {"/api/alerts"}


def _iter_panels(doc: dict):
    for panel in doc.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []  # collapsed rows keep their panels inside


def _filters_of(query: dict) -> tuple[RowFilter, ...]:
    text = (query.get("filterExpression") or "").strip()
    if not text:
        return ()
    out = []
    for part in text.split(" && "):
        match = re.fullmatch(r"(\w+) (==|=~) '(.*)'", part.strip())
        if not match:
            raise ValueError(f"unsupported Infinity filter expression {part!r}")
        out.append(RowFilter(match[1], match[2], match[3]))  # type: ignore[arg-type]
    return tuple(out)


def _panel_query(uid: str, title: str, query: dict) -> PanelQuery:
    url = query["url"]
    return PanelQuery(
        dashboard_uid=uid, panel_title=title, url_template=url,
        expected_columns={c["selector"]: c["type"] for c in query.get("columns", [])},
        ref_id=query.get("refId", "A"), filters=_filters_of(query), csv=query.get("type") == "csv",
        may_be_empty=url.split("?")[0] in MAY_BE_EMPTY)


def _as_docs(dashboards) -> list[dict]:
    if dashboards is None:
        return list(dashboard_docs().values())
    items = dashboards.values() if isinstance(dashboards, dict) else dashboards
    return [to_json_doc(d) if isinstance(d, Dashboard) else d for d in items]


def panel_queries(dashboards: dict[str, dict] | list[dict] | list[Dashboard] | None = None) -> list[PanelQuery]:
    """Every Infinity query of the dashboards (JSON docs, or SDK builders; default: all of
    podwatch's): each dashboard's variables first, in order, then its panels' targets."""
    docs = _as_docs(dashboards)
    out: list[PanelQuery] = []
    for doc in docs:
        uid = doc["uid"]
        for var in (doc.get("templating") or {}).get("list") or []:
            query = var.get("query")
            if isinstance(query, dict) and query.get("queryType") == "infinity":
                out.append(_panel_query(uid, f"variable ${var['name']}", query["infinityQuery"]))
        for panel in _iter_panels(doc):
            for target in panel.get("targets") or []:
                if (target.get("datasource") or {}).get("type") == INFINITY_TYPE:
                    out.append(_panel_query(uid, panel.get("title", ""), target))
    return out


def prometheus_queries(dashboards: dict[str, dict] | list[dict] | list[Dashboard] | None = None) -> list[PrometheusQuery]:
    out = []
    for doc in _as_docs(dashboards):
        for panel in _iter_panels(doc):
            for target in panel.get("targets") or []:
                if (target.get("datasource") or {}).get("type") == "prometheus" and target.get("expr"):
                    out.append(PrometheusQuery(doc["uid"], panel.get("title", ""), target["expr"]))
    return out


def markdown_inventory(docs: dict[str, dict] | None = None) -> str:
    """Every dashboard, panel and query as Markdown (`podwatch dashboards list`); the panel
    reference in docs/dashboards.md is this text, and a test keeps the two equal."""
    docs = docs if docs is not None else dashboard_docs()
    lines: list[str] = []
    for uid, doc in docs.items():
        variables = [v["name"] for v in doc["templating"]["list"]]
        lines += [f"### {doc['title']} (`{uid}`)", "", doc.get("description", ""), "",
                  "Variables: " + ", ".join(f"`${name}`" for name in variables), ""]
        for query in panel_queries({uid: doc}):
            if query.panel_title.startswith("variable $"):
                lines.append(f"- `{query.panel_title.removeprefix('variable ')}` options: "
                             f"`GET {query.url_template}` column `{next(iter(query.expected_columns))}`"
                             + (f", filter `{' && '.join(f.expression() for f in query.filters)}`"
                                if query.filters else ""))
        lines.append("")
        for panel in _iter_panels(doc):
            if panel["type"] == "row":
                lines += [f"#### Row: {panel['title']}", ""]
                continue
            lines += [f"**{panel['title']}** ({panel['type']})" + (f": {panel['description']}"
                                                                    if panel.get("description") else ""), ""]
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    lines.append(f"- {target['refId']}: PromQL `{target['expr']}`")
                    continue
                query = _panel_query(uid, panel["title"], target)
                columns = ", ".join(f"{c['selector']}:{c['type']}" + (f" as {c['text']}" if c["text"] != c["selector"] else "")
                                    for c in target.get("columns", []))
                text = f"- {query.ref_id}: `GET {query.url_template}` ({target['type']}, {target['format']}) -> {columns}"
                if query.filters:
                    text += f"; filter `{' && '.join(f.expression() for f in query.filters)}`"
                lines.append(text)
            for transform in panel.get("transformations") or []:
                on = f" (on {transform['filter']['options']})" if transform.get("filter") else ""
                lines.append(f"- transformation `{transform['id']}`{on} "
                             f"{json.dumps(transform.get('options'), sort_keys=True)}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
