"""Thermal analytics inside the process that owns the DuckDB file (`podwatch serve`, the demo).

    analytics = attach_analytics(service, site, model_dir="models/", observe=alerting.observe)

registers two things on the storage `Service`:

- a batch listener: the streaming checks (`checks.StreamingChecks`) on every committed batch;
  their observations go to `observe` (the alert engine's `AlertingRuntime.observe`). The batch's
  rows of the signals the features need are also kept in a bounded recent window
  (`window_s`, at most `max_buffer_rows`; overflow drops the oldest rows and is counted).
- a periodic task (every `score_every_s`): features over the recent window, the risk model per
  rack, one `risk_scores` row per rack (the newest feature row) and a `thermal_risk` observation.

Without a trained model (no `model_dir`, or no model in it) the risk is the physics floor alone
(`thermal.PhysicsRiskModel`: worst-case settled margin, draining reservoir), logged once. Counters: health component `analytics`/`thermal` (received rows, sent
observations, errors, dropped buffer rows, scores).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from podwatch.analytics.alerting.model import Observation
from podwatch.analytics.checks import CheckSettings, StreamingChecks, normalise_rows
from podwatch.analytics.features import latest_features
from podwatch.analytics.thermal import ModelError, PhysicsRiskModel, ThermalModel, risk_rows_for_db
from podwatch.health import REGISTRY
from podwatch.site import Site

log = logging.getLogger(__name__)

RISK_RULE = "thermal_risk"
Observe = Callable[[list[Observation]], Awaitable[Any] | Any]

_FEATURE_METRIC_PREFIXES = ("rack.", "cdu.", "pdu.power_kw")


class StreamingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score_every_s: float = Field(10.0, gt=0, description="Risk scoring period")
    window_s: float = Field(660.0, gt=0, description="Recent samples kept for the features: the longest look-back "
                            "(the 10-min peaks of load and supply of the worst case) + a bucket, so live scores "
                            "see what the model was trained and evaluated on")
    max_buffer_rows: int = Field(2_000_000, gt=0, description="Cap of the recent window; overflow drops the oldest")
    silence_after_s: float = Field(5.0, gt=0, description="No batch for this long (sample time): evaluate sensor_stale "
                                   "on the clock alone, so a silent collector or broker alerts")
    clock_speed: float = Field(1.0, gt=0, description="Sample seconds per wall second while no batch arrives "
                               "(accelerated simulator runs)")
    checks: CheckSettings = Field(default_factory=CheckSettings)


class ThermalAnalytics:
    """Streaming checks and periodic risk scoring for one site (see the module docstring)."""

    def __init__(self, site: Site, model: ThermalModel | PhysicsRiskModel | None = None, *,
                 observe: Observe | None = None,
                 settings: StreamingSettings | None = None) -> None:
        self.site = site
        self.model = model
        self.settings = settings or StreamingSettings()
        self.checks = StreamingChecks(site, self.settings.checks)
        self._observe = observe
        self._buffer: list[pl.DataFrame] = []
        self._buffer_rows = 0
        self.health = REGISTRY.component("analytics", "thermal")
        self.last_scores: pl.DataFrame | None = None
        self._lock = asyncio.Lock()
        self._last_batch: tuple[float, datetime] | None = None  # (monotonic, newest sample time)
        self._checks_lock = asyncio.Lock()  # StreamingChecks is not thread-safe: batches vs check_silence

    async def _emit(self, observations: list[Observation]) -> None:
        if not observations or self._observe is None:
            return
        result = self._observe(observations)
        if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
            await result
        self.health.inc("sent", len(observations))

    def _keep(self, rows: pl.DataFrame) -> None:
        keep = rows.filter(pl.any_horizontal(*[pl.col("metric").str.starts_with(p) for p in _FEATURE_METRIC_PREFIXES]))
        if keep.is_empty():
            return
        self._buffer.append(keep)
        self._buffer_rows += keep.height
        newest = keep["ts"].max()
        cutoff = newest - timedelta(seconds=self.settings.window_s)
        # drop whole old batches first (cheap), then trim by the row cap
        while self._buffer and self._buffer[0]["ts"].max() < cutoff:
            self._buffer_rows -= self._buffer.pop(0).height
        while self._buffer_rows > self.settings.max_buffer_rows and len(self._buffer) > 1:
            dropped = self._buffer.pop(0)
            self._buffer_rows -= dropped.height
            self.health.inc("dropped", dropped.height)

    def recent_rows(self) -> pl.DataFrame:
        if not self._buffer:
            return pl.DataFrame(schema={"ts": pl.Datetime("us"), "device": pl.String, "metric": pl.String,
                                        "value": pl.Float64, "quality": pl.UInt8})
        return pl.concat(self._buffer, how="vertical_relaxed")

    async def on_batch(self, rows: pl.DataFrame) -> list[Observation]:
        """Batch listener: checks on the new rows; the rows join the recent window."""
        if rows.is_empty():
            return []
        self.health.inc("received", rows.height)
        try:
            rows = normalise_rows(rows)
            async with self._checks_lock:
                observations = await asyncio.to_thread(self.checks.process, rows)
        except Exception:
            self.health.inc("errors")
            log.exception("streaming checks failed on a batch of %d rows", rows.height)
            return []
        self._keep(rows)
        newest = rows["ts"].max()
        if isinstance(newest, datetime):
            newest = newest.replace(tzinfo=UTC) if newest.tzinfo is None else newest.astimezone(UTC)
            if self._last_batch is None or newest >= self._last_batch[1]:
                self._last_batch = (time.monotonic(), newest)
        await self._emit(observations)
        return observations

    async def check_silence(self, service: Any = None) -> list[Observation]:
        """Periodic task: while no batch arrives, sample time runs on from the newest sample with
        the wall clock and `sensor_stale` is evaluated on it (every device goes stale, alerts fire)."""
        if self._last_batch is None:
            return []
        wall, newest = self._last_batch
        idle_s = (time.monotonic() - wall) * self.settings.clock_speed
        if idle_s < self.settings.silence_after_s:
            return []
        async with self._checks_lock:
            observations = self.checks.stale_observations(newest + timedelta(seconds=idle_s))
        await self._emit(observations)
        return observations

    def score_now(self) -> pl.DataFrame:
        """Newest risk per rack from the recent window (empty without a model or data)."""
        if self.model is None:
            return pl.DataFrame()
        feats = latest_features(self.recent_rows(), self.site, horizon_s=self.model.horizon_s)
        if feats.is_empty():
            return pl.DataFrame()
        return self.model.score(feats)

    async def score_once(self, service: Any = None) -> pl.DataFrame:
        """Periodic task: score, write `risk_scores`, emit `thermal_risk` observations."""
        async with self._lock:
            try:
                scores = await asyncio.to_thread(self.score_now)
            except Exception:
                self.health.inc("errors")
                log.exception("thermal risk scoring failed")
                return pl.DataFrame()
            if scores.is_empty():
                return scores
            self.last_scores = scores
            self.health.inc("scores", scores.height)
            db = getattr(service, "db", None) if service is not None else None
            if db is not None:
                await db.run(lambda cur: write_risk_scores(cur, scores))
            await self._emit(risk_observations(scores, self.site))
            return scores


def risk_observations(scores: pl.DataFrame, site: Site) -> list[Observation]:
    racks = {r.id: r for r in site.racks}
    out = []
    for row in scores.iter_rows(named=True):
        rack = racks.get(row["rack"])
        labels = {"site": site.id, "rack": row["rack"]}
        if rack is not None:
            labels.update(module=rack.module, cdu=rack.cdu)
        reasons = list(row["reasons"] or [])
        out.append(Observation(rule=RISK_RULE, target=row["rack"], active=row["level"] in ("warning", "critical"),
                               ts=row["ts"], value=float(row["probability"]), labels=labels,
                               reasons=[f"{row['probability']:.0%} risk of a breach within {row['horizon_s'] // 60} min"
                                        f" ({row['level']})", *reasons]))
    return out


def write_risk_scores(con, scores: pl.DataFrame) -> int:
    """Upsert scores into `risk_scores` (primary key rack, ts, horizon_s)."""
    if scores.is_empty():
        return 0
    db_rows = risk_rows_for_db(scores)
    con.register("_podwatch_risk_rows", db_rows.to_arrow())
    try:
        con.execute("INSERT OR REPLACE INTO risk_scores (ts, rack, horizon_s, probability, level, reasons, model_version) "
                    "SELECT ts, rack, horizon_s, probability, level, reasons, model_version FROM _podwatch_risk_rows")
    finally:
        con.unregister("_podwatch_risk_rows")
    return db_rows.height


def load_model_or_physics(model_dir: str | Path | None, horizon_s: int) -> ThermalModel | PhysicsRiskModel:
    """The trained model in `model_dir`, else the physics-only risk (logged once)."""
    if model_dir is not None:
        try:
            return ThermalModel.load(model_dir)
        except ModelError as exc:
            log.warning("thermal risk falls back to physics only: %s", exc)
    else:
        log.info("thermal risk: no model dir given, physics-only risk (train one with `podwatch train thermal`)")
    return PhysicsRiskModel(horizon_s)


def attach_analytics(service: Any, site: Site, model_dir: str | Path | None = None, *,
                     observe: Observe | None = None, settings: StreamingSettings | None = None,
                     model: ThermalModel | None = None) -> ThermalAnalytics:
    """Register the checks (batch listener) and periodic risk scoring on the storage service."""
    model = model or load_model_or_physics(model_dir, site.spec.thermal.risk_horizon_s)
    analytics = ThermalAnalytics(site, model, observe=observe, settings=settings)
    service.add_batch_listener(analytics.on_batch)
    service.add_periodic(analytics.score_once, analytics.settings.score_every_s)
    service.add_periodic(analytics.check_silence, analytics.settings.silence_after_s / analytics.settings.clock_speed)
    return analytics


def reasons_json(reasons: Iterable[str]) -> str:
    return json.dumps(list(reasons), ensure_ascii=False)
