"""podwatch: power and thermal telemetry for modular AI sites.

Root modules own the site model (`site`), canonical metric names (`metrics`), the reading
envelope passed from collectors to the stream (`samples`), shared health counters (`health`)
and the CLI (`cli`). Subpackages own one stage each; data flows
simulators -> collectors -> stream -> storage -> analytics/alerts -> API/dashboards.
"""

__version__ = "0.1.0"
