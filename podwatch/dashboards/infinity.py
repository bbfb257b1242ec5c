"""Queries of Grafana's Infinity datasource (`yesoreyeram-infinity-datasource`), which the
foundation SDK has no builder for: `InfinityQuery` (a panel target) and `InfinityVariable` (a
dashboard query variable), plus the filters podwatch uses, which the checker
(`podwatch.dashboards.check`) applies exactly as Infinity's backend does.

Every query uses the backend parser (so Grafana alerting and caching work, and a long frame
in "timeseries" format is turned wide by Infinity itself: one series per `device`), a URL
relative to the datasource's base URL (the podwatch API), and an explicit column list:
the columns a panel expects are exactly the JSON keys it selects, with their types.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.runtime import UnknownDataquery
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    VariableHide,
    VariableModel,
    VariableOption,
    VariableRefresh,
    VariableSort,
    VariableType,
)

INFINITY_TYPE = "yesoreyeram-infinity-datasource"
INFINITY_UID = "podwatch-api"
PROMETHEUS_UID = "podwatch-prometheus"
INFINITY = DataSourceRef(type_val=INFINITY_TYPE, uid=INFINITY_UID)
# What every podwatch query points at: the Infinity datasource the dashboard's `site` variable
# selects (one datasource per site API), so one set of dashboards serves every site.
SITE_DS = DataSourceRef(type_val=INFINITY_TYPE, uid="${site}")

ColumnType = Literal["timestamp", "timestamp_epoch", "number", "string"]


@dataclass(frozen=True, slots=True)
class Column:
    """One column Infinity extracts: `selector` is the JSON key in an API row, `text` the
    field name in Grafana (defaults to the selector), `type` Infinity's column type."""

    selector: str
    type: ColumnType
    text: str = ""

    def to_json(self) -> dict:
        return {"selector": self.selector, "text": self.text or self.selector, "type": self.type}


@dataclass(frozen=True, slots=True)
class RowFilter:
    """`column == 'value'` or `column =~ 'regex'` — Infinity's filter expression (govaluate
    syntax). Values may hold template variables; they are interpolated before evaluation."""

    column: str
    op: Literal["==", "=~"]
    value: str

    def expression(self) -> str:
        return f"{self.column} {self.op} '{self.value}'"

    def matches(self, row: dict) -> bool:
        cell = row.get(self.column)
        if cell is None:
            return False
        if self.op == "==":
            return str(cell) == self.value
        return re.search(self.value, str(cell)) is not None


def api_url(path: str, params: dict[str, str] | None = None) -> str:
    """A URL relative to the datasource base URL. Template variables (`${rack}`, `${__from}`)
    are left unencoded so Grafana interpolates them before Infinity sends the request."""
    if not params:
        return path
    return path + "?" + "&".join(f"{key}={value}" for key, value in params.items())


def infinity_query_json(ref_id: str, url: str, columns: list[Column], format_: str = "table",
                        filters: tuple[RowFilter, ...] = ()) -> dict:
    query = {
        "refId": ref_id,
        "datasource": SITE_DS.to_json(),
        "type": "json",
        "source": "url",
        "parser": "backend",
        "format": format_,
        "url": url,
        "url_options": {"method": "GET", "data": ""},
        "root_selector": "",
        "columns": [c.to_json() for c in columns],
        "computed_columns": [],
        "filterExpression": " && ".join(f.expression() for f in filters),
    }
    return query


class InfinityQuery(cogbuilder.Builder[UnknownDataquery]):
    """A panel target reading a podwatch API endpoint through Infinity.

    `format_="timeseries"` for long rows (time, device, value): Infinity turns them into one
    series per string column value. `format_="table"` for everything else.
    """

    def __init__(self, ref_id: str, path: str, params: dict[str, str] | None, columns: list[Column],
                 format_: Literal["table", "timeseries"] = "table", filters: tuple[RowFilter, ...] = ()) -> None:
        self._query = infinity_query_json(ref_id, api_url(path, params), columns, format_, filters)

    def csv(self) -> "InfinityQuery":
        """Read the endpoint's CSV form (`?format=csv`): nested values (alert annotations, risk
        reasons) arrive as JSON text, which a table shows as it is."""
        self._query["type"] = "csv"
        return self

    def build(self) -> UnknownDataquery:
        return UnknownDataquery(dict(self._query))


class InfinityVariable(cogbuilder.Builder[VariableModel]):
    """A query variable whose options are one column of an API response (deduplicated by
    Grafana). The first option is selected by default, as Grafana does on load."""

    def __init__(self, name: str, label: str, path: str, params: dict[str, str] | None, value_column: str,
                 filters: tuple[RowFilter, ...] = (), hide: bool = False, include_all: bool = False) -> None:
        self._model = VariableModel(
            type_val=VariableType.QUERY,
            name=name,
            label=label,
            hide=VariableHide.HIDE_VARIABLE if hide else VariableHide.DONT_HIDE,
            datasource=SITE_DS,
            query={
                "queryType": "infinity",
                "query": "",
                # More than one column: Grafana takes the options from __text/__value. Filter
                # columns must be selected too: Infinity filters the frame it extracted.
                "infinityQuery": infinity_query_json(
                    "variable", api_url(path, params),
                    [Column(value_column, "string", "__text"), Column(value_column, "string", "__value"),
                     *[Column(f.column, "string") for f in filters if f.column != value_column]],
                    "table", filters),
            },
            refresh=VariableRefresh.ON_DASHBOARD_LOAD,
            sort=VariableSort.ALPHABETICAL_ASC,
            multi=False,
            include_all=include_all,
            current=VariableOption(selected=True, text="", value=""),
            options=[],
        )

    def build(self) -> VariableModel:
        return self._model
