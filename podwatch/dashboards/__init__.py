"""Grafana dashboards and provisioning as code (grafana-foundation-sdk) and the Grafana HTTP
API client (httpx)."""
