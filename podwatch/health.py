"""Health counters every component reports the same way (received, sent, errors, dropped,
spooled, retries, overruns, lag), exported on `/metrics` and logged periodically.

A component owns one `ComponentHealth`; `REGISTRY` collects them. Counters are plain ints
(components are asyncio, single-threaded); the Prometheus collector reads them on scrape.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

STANDARD_COUNTERS = ("received", "sent", "errors", "dropped", "spooled", "retries", "overruns")


@dataclass
class ComponentHealth:
    component: str  # e.g. "modbus_collector", "kafka_producer", "duckdb_sink"
    instance: str = "default"
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STANDARD_COUNTERS, 0))
    gauges: dict[str, float] = field(default_factory=dict)  # lag, queue depth, spool bytes, ...

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def set(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def snapshot(self) -> dict[str, float]:
        return {**self.counters, **self.gauges}


class HealthRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._components: dict[tuple[str, str], ComponentHealth] = {}

    def component(self, component: str, instance: str = "default") -> ComponentHealth:
        """Get or create the health record of one component instance."""
        with self._lock:
            key = (component, instance)
            if key not in self._components:
                self._components[key] = ComponentHealth(component, instance)
            return self._components[key]

    def all(self) -> list[ComponentHealth]:
        with self._lock:
            return list(self._components.values())

    def clear(self) -> None:
        with self._lock:
            self._components.clear()


REGISTRY = HealthRegistry()


class PrometheusHealthCollector:
    """prometheus_client custom collector: `podwatch_component_<counter>_total{component,instance}`
    and `podwatch_component_<gauge>{component,instance}`."""

    def __init__(self, registry: HealthRegistry = REGISTRY) -> None:
        self._registry = registry

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        comps = self._registry.all()
        counter_names = sorted({n for c in comps for n in c.counters})
        gauge_names = sorted({n for c in comps for n in c.gauges})
        for name in counter_names:
            fam = CounterMetricFamily(f"podwatch_component_{name}", f"Component {name} count", labels=["component", "instance"])
            for c in comps:
                if name in c.counters:
                    fam.add_metric([c.component, c.instance], c.counters[name])
            yield fam
        for name in gauge_names:
            fam = GaugeMetricFamily(f"podwatch_component_{name}", f"Component {name}", labels=["component", "instance"])
            for c in comps:
                if name in c.gauges:
                    fam.add_metric([c.component, c.instance], c.gauges[name])
            yield fam
