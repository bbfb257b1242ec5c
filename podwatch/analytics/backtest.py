"""Rolling-origin backtest of the peak forecaster against seasonal naive (`podwatch eval forecast`,
`benchmarks/forecast_eval.py`), and a small synthetic load history for tests and for runs without
simulator history.

Backtest protocol (docs/analytics.md, "Forecasts"):
- Origins every `step_h` hours (6 by default: 4 a day, also for the 7-day horizon — its windows
  overlap, so neighbouring origins are not independent, but every weekday and hour is scored)
  from `min_train_days` + one horizon after the first usable origin (7 days of history) to the
  last origin whose whole horizon is observed. 140 days give ~485 origins at 24 h and ~437 at 7 d.
- The model is refitted every `refit_every_h` hours on an expanding window, using only rows whose
  target window ended before the refit time (no peeking); calibration is part of each fit.
- Scores over all (origin, node) pairs: pinball loss per quantile and coverage (share of peaks at
  or below the predicted quantile), for the model and for seasonal naive with its own empirical
  residual quantiles (each node's own residuals; the pooled variant is reported beside it). Pinball losses are computed on the scaled target (peak / node's 7-day mean)
  so that a 3 MW transformer does not drown out a 130 kW rack feed; coverage is scale-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl

from podwatch.analytics.forecast import (HORIZON_HOURS, FeatureTable, ForecastConfig, PeakForecaster, build_features,
                                         coverage, pinball_loss)
from podwatch.site import Site


# --------------------------------------------------------------------------- synthetic history


def synthetic_history(site: Site, days: float, resolution_s: int = 300, seed: int = 0,
                      start: datetime | None = None, growth_per_day: float = 0.002) -> pl.DataFrame:
    """A plausible inference-site load history in the long sample format (ts, device, metric,
    value, quality): per rack a daily cycle (user demand peaks in the local afternoon), quieter
    weekends, slow growth, a shared day-to-day demand level, AR(1) noise and short bursts; A/B PDUs
    share each rack's power about evenly; the substation meter adds cooling/auxiliary load; CDUs
    report heat removed. Used by tests and when no simulator history is available."""
    rng = np.random.default_rng(seed)
    start = start or datetime(2026, 1, 5, tzinfo=timezone.utc)  # a Monday
    n = int(days * 86400 // resolution_s)
    t_s = np.arange(n) * resolution_s
    ts = pl.datetime_range(start, start + timedelta(seconds=int(t_s[-1])), f"{resolution_s}s", eager=True,
                           time_zone="UTC")
    local = ts.dt.convert_time_zone(site.spec.site.timezone)
    hour = (local.dt.hour() + local.dt.minute() / 60.0).to_numpy()
    weekday = local.dt.weekday().to_numpy()  # 1 = Monday .. 7 = Sunday
    day_index = (t_s // 86400).astype(int)
    daily_shape = 0.5 - 0.5 * np.cos(2 * np.pi * (hour - 4.0) / 24.0)  # 0 at 04:00, 1 at 16:00
    weekend = np.where(weekday >= 6, 0.88, 1.0)
    day_level = 1.0 + rng.normal(0, 0.035, day_index.max() + 1)[day_index]
    steps_per_hour = max(1, 3600 // resolution_s)
    n_hours = n // steps_per_hour + 1
    hour_idx = np.arange(n) // steps_per_hour
    rows = []
    rack_total: dict[str, np.ndarray] = {}
    phi = np.exp(-resolution_s / 1800.0)  # AR(1) with a ~30 min memory
    for rack in site.racks:
        base = rng.uniform(0.42, 0.55)
        amplitude = rng.uniform(0.18, 0.28)
        noise = np.empty(n)
        eps = rng.normal(0, 0.025 * np.sqrt(1 - phi ** 2), n)
        noise[0] = eps[0]
        for i in range(1, n):
            noise[i] = phi * noise[i - 1] + eps[i]
        bursts = np.where(rng.random(n_hours) < 0.03, rng.uniform(0.04, 0.12, n_hours), 0.0)[hour_idx]
        frac = (base + amplitude * daily_shape) * weekend * day_level * (1 + growth_per_day * t_s / 86400) + noise + bursts
        rack_total[rack.id] = np.clip(frac, 0.05, 1.0) * rack.rated_kw
    for dev in site.devices:
        if dev.kind == "pdu" and dev.entity in rack_total:
            share = 0.5 + (0.01 if dev.side == "a" else -0.01)
            value = rack_total[dev.entity] * share + rng.normal(0, 0.2, n)
            rows.append((dev.id, "pdu.power_kw", value))
        elif dev.kind == "meter":
            racks = [r.id for r in site.racks
                     if dev.entity in {x.id for x in site.power_path(r.feed_a)} | {x.id for x in site.power_path(r.feed_b)}]
            node = site.power_nodes.get(dev.entity)
            it = sum(rack_total[r] for r in racks) if racks else np.zeros(n)
            if node is not None and node.side is not None:
                it = it / 2.0  # a sided feeder's meter reads its normal half share
            rows.append((dev.id, "meter.power_kw", it * 1.08 + 15.0 + rng.normal(0, 2.0, n)))
        elif dev.kind == "cdu":
            cdu = site.cdu(dev.entity)
            it = sum(rack_total[r] for r in cdu.racks if r in rack_total)
            rows.append((dev.id, "cdu.heat_removed_kw", it * cdu.heat_to_liquid + rng.normal(0, 3.0, n)))
    frames = [pl.DataFrame({"ts": ts, "device": [dev] * n, "metric": [metric] * n, "value": value,
                            "quality": np.zeros(n, dtype=np.uint8)})
              for dev, metric, value in rows]
    return pl.concat(frames).with_columns(pl.col("quality").cast(pl.UInt8))


def write_history(frame: pl.DataFrame, out_dir: str | Path) -> Path:
    """Write a long-format history as one Parquet file under `out_dir` (what --history reads)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "samples.parquet"
    frame.write_parquet(path)
    return path


# --------------------------------------------------------------------------- backtest


@dataclass
class HorizonScores:
    horizon: str
    origins: int
    pairs: int  # (origin, node) pairs scored
    first_origin: datetime | None
    last_origin: datetime | None
    pinball_model: dict[float, float] = field(default_factory=dict)
    pinball_naive: dict[float, float] = field(default_factory=dict)
    coverage_model: dict[float, float] = field(default_factory=dict)
    coverage_naive: dict[float, float] = field(default_factory=dict)
    # the weaker variant of the baseline (residual quantiles pooled over all nodes), for reference
    pinball_naive_pooled: dict[float, float] = field(default_factory=dict)
    coverage_naive_pooled: dict[float, float] = field(default_factory=dict)
    fallback_pairs: int = 0  # pairs forecast by the naive fallback (too little training history at that refit)

    def improvement_pooled(self, level: float = 0.95) -> float:
        """Like `improvement`, against the naive with residual quantiles pooled over nodes."""
        naive = self.pinball_naive_pooled.get(level, float("nan"))
        return 1.0 - self.pinball_model.get(level, float("nan")) / naive if naive else float("nan")

    def improvement(self, level: float = 0.95) -> float:
        """Relative pinball-loss reduction vs seasonal naive at `level` (0.25 = 25 % better)."""
        naive = self.pinball_naive.get(level, float("nan"))
        return 1.0 - self.pinball_model.get(level, float("nan")) / naive if naive else float("nan")


def combine_scores(parts: list[HorizonScores]) -> HorizonScores:
    """Scores of several backtests (histories, sites) of one horizon taken together, as if their
    (origin, node) pairs had been scored in one run: each mean is weighted by its pairs."""
    if not parts or len({p.horizon for p in parts}) != 1:
        raise ValueError("combine_scores needs at least one score, all of one horizon")
    pairs = sum(p.pairs for p in parts)
    out = HorizonScores(horizon=parts[0].horizon, origins=sum(p.origins for p in parts), pairs=pairs,
                        first_origin=min(p.first_origin for p in parts), last_origin=max(p.last_origin for p in parts),
                        fallback_pairs=sum(p.fallback_pairs for p in parts))
    for name in ("pinball_model", "pinball_naive", "coverage_model", "coverage_naive", "pinball_naive_pooled",
                 "coverage_naive_pooled"):
        combined = getattr(out, name)
        for level in getattr(parts[0], name):
            combined[level] = sum(getattr(p, name)[level] * p.pairs for p in parts) / pairs
    return out


@dataclass
class BacktestResult:
    scores: dict[str, HorizonScores]
    predictions: pl.DataFrame  # ts, node, horizon, scale, y_kw, q{50,95,99}_kw, naive_q{..}_kw
    history_days: float
    quantiles: tuple[float, ...]
    skipped: dict[str, str] = field(default_factory=dict)  # horizon -> why it was not evaluated

    def summary_lines(self) -> list[str]:
        lines = [f"rolling-origin backtest over {self.history_days:.1f} days of history"]
        for h, s in self.scores.items():
            span = f"{s.first_origin:%Y-%m-%d}..{s.last_origin:%Y-%m-%d}" if s.first_origin else "-"
            lines.append(f"[{h}] {s.origins} origins ({span}), {s.pairs} node forecasts"
                         + (f", {s.fallback_pairs} of them by the naive fallback (too little history at that refit)"
                            if s.fallback_pairs else ""))
            for q in self.quantiles:
                lines.append(f"  P{round(q * 100)}: pinball model {s.pinball_model[q]:.4f} vs seasonal-naive "
                             f"{s.pinball_naive[q]:.4f} ({_better_or_worse(s.improvement(q))}); coverage model "
                             f"{s.coverage_model[q] * 100:.1f} % vs naive {s.coverage_naive[q] * 100:.1f} %")
                lines.append(f"       (naive with residual quantiles pooled over nodes: pinball {s.pinball_naive_pooled[q]:.4f}, "
                             f"coverage {s.coverage_naive_pooled[q] * 100:.1f} %)")
        lines += [f"[{h}] skipped: {why}" for h, why in self.skipped.items()]
        return lines


def rolling_origin_backtest(hourly_peaks: pl.DataFrame, timezone_name: str = "UTC",
                            config: ForecastConfig | None = None, horizons: tuple[str, ...] = ("24h", "7d"),
                            step_h: int = 6, refit_every_h: int = 168, min_train_days: float = 10.0,
                            node_info: dict | None = None) -> BacktestResult:
    """Rolling-origin evaluation; see the module docstring for the protocol."""
    cfg = config or ForecastConfig()
    ts_all = hourly_peaks["ts"]
    history_days = (ts_all.max() - ts_all.min()).total_seconds() / 86400 + 1 / 24
    scores: dict[str, HorizonScores] = {}
    skipped: dict[str, str] = {}
    pred_frames = []
    for horizon in horizons:
        h = HORIZON_HOURS[horizon]
        table = build_features(hourly_peaks, h, timezone_name, node_info)
        frame = table.frame
        known = frame.filter(pl.col("target").is_not_nan())
        if known.is_empty():
            skipped[horizon] = f"history too short for a {horizon} backtest: no origin with a known {horizon} peak"
            continue
        first = known["ts"].min() + timedelta(days=min_train_days) + timedelta(hours=h)
        last = known["ts"].max()
        if first > last:
            skipped[horizon] = (f"history too short for a {horizon} backtest: needs {min_train_days:g} training days "
                                f"after the first 7 days, plus the horizon twice")
            continue
        eval_rows = known.filter((pl.col("ts") >= first)
                                 & (((pl.col("ts") - pl.lit(first)).dt.total_hours()) % step_h == 0))
        collected = []
        fallback_pairs = 0
        refit_at = first
        while refit_at <= last:
            block = eval_rows.filter((pl.col("ts") >= refit_at) & (pl.col("ts") < refit_at + timedelta(hours=refit_every_h)))
            if not block.is_empty():
                train = FeatureTable(frame=frame.filter(pl.col("ts") <= refit_at - timedelta(hours=h)), horizon_h=h)
                forecaster = PeakForecaster(cfg).fit(train)
                q_model = forecaster.predict(table, block)
                if not forecaster.models:
                    fallback_pairs += block.height
                q_naive = forecaster.predict_naive(block)
                q_pooled = forecaster.predict_naive(block, pooled=True)
                out = block.select(["ts", "node", "scale"]).with_columns(
                    pl.lit(horizon).alias("horizon"), (block["target"] * block["scale"]).alias("y_kw"))
                for i, q in enumerate(cfg.quantiles):
                    out = out.with_columns(pl.Series(f"q{round(q * 100)}_kw", q_model[:, i]),
                                           pl.Series(f"naive_q{round(q * 100)}_kw", q_naive[:, i]),
                                           pl.Series(f"naive_pooled_q{round(q * 100)}_kw", q_pooled[:, i]))
                collected.append(out)
            refit_at += timedelta(hours=refit_every_h)
        preds = pl.concat(collected)
        pred_frames.append(preds)
        y = (preds["y_kw"] / preds["scale"]).to_numpy()
        s = HorizonScores(horizon=horizon, origins=preds["ts"].n_unique(), pairs=preds.height,
                          first_origin=preds["ts"].min(), last_origin=preds["ts"].max(), fallback_pairs=fallback_pairs)
        for q in cfg.quantiles:
            col = f"q{round(q * 100)}_kw"
            model_q = (preds[col] / preds["scale"]).to_numpy()
            naive_q = (preds[f"naive_{col}"] / preds["scale"]).to_numpy()
            s.pinball_model[q] = pinball_loss(y, model_q, q)
            s.pinball_naive[q] = pinball_loss(y, naive_q, q)
            s.coverage_model[q] = coverage(y, model_q)
            s.coverage_naive[q] = coverage(y, naive_q)
            pooled_q = (preds[f"naive_pooled_{col}"] / preds["scale"]).to_numpy()
            s.pinball_naive_pooled[q] = pinball_loss(y, pooled_q, q)
            s.coverage_naive_pooled[q] = coverage(y, pooled_q)
        scores[horizon] = s
    if not scores:
        raise ValueError("; ".join(skipped.values()) or "nothing to evaluate")
    return BacktestResult(scores=scores, predictions=pl.concat(pred_frames), history_days=history_days,
                          quantiles=cfg.quantiles, skipped=skipped)


def backtest_figures(result: BacktestResult, out_dir: str | Path, node: str | None = None) -> list[Path]:
    """PNG figures of a backtest: scores vs seasonal naive, and one node's peaks against the bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    horizons = list(result.scores)
    if not horizons:
        return paths
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.38
    labels = [f"{h} P{round(q * 100)}" for h in horizons for q in result.quantiles]
    x = np.arange(len(labels))
    model = [result.scores[h].pinball_model[q] for h in horizons for q in result.quantiles]
    naive = [result.scores[h].pinball_naive[q] for h in horizons for q in result.quantiles]
    axes[0].bar(x - width / 2, model, width, label="model (HGB quantile + conformal)")
    axes[0].bar(x + width / 2, naive, width, label="seasonal naive")
    axes[0].set_xticks(x, labels, rotation=30)
    axes[0].set_title("Pinball loss (scaled; lower is better)")
    axes[0].legend(fontsize=8)
    cov_model = [result.scores[h].coverage_model[q] * 100 for h in horizons for q in result.quantiles]
    cov_naive = [result.scores[h].coverage_naive[q] * 100 for h in horizons for q in result.quantiles]
    axes[1].bar(x - width / 2, cov_model, width, label="model")
    axes[1].bar(x + width / 2, cov_naive, width, label="seasonal naive")
    for i, q in enumerate([q for _ in horizons for q in result.quantiles]):
        axes[1].hlines(q * 100, i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=1)
    axes[1].set_xticks(x, labels, rotation=30)
    axes[1].set_ylim(0, 105)
    axes[1].set_title("Coverage % (dashed: nominal)")
    fig.tight_layout()
    path = out / "backtest_scores.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)

    preds = result.predictions.filter(pl.col("horizon") == horizons[0])
    node = node or sorted(preds["node"].unique().to_list())[0]
    one = preds.filter(pl.col("node") == node).sort("ts")
    if one.height:
        fig, ax = plt.subplots(figsize=(10, 3.8))
        t = one["ts"].to_list()
        ax.fill_between(t, one["q50_kw"].to_numpy(), one["q99_kw"].to_numpy(), alpha=0.2, label="P50–P99")
        ax.plot(t, one["q95_kw"].to_numpy(), label="P95", linewidth=1)
        ax.plot(t, one["naive_q95_kw"].to_numpy(), label="seasonal-naive P95", linewidth=1, linestyle="dotted")
        ax.plot(t, one["y_kw"].to_numpy(), "k.", markersize=3, label=f"actual {horizons[0]} peak")
        ax.set_title(f"{node}: {horizons[0]} peak forecasts at each origin")
        ax.set_ylabel("kW")
        ax.legend(fontsize=8)
        fig.autofmt_xdate()
        fig.tight_layout()
        path = out / "backtest_node.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _better_or_worse(improvement: float) -> str:
    """"35.4 % better" / "34.6 % worse" (never "-34.6 % better")."""
    return f"{abs(improvement) * 100:.1f} % {'better' if improvement >= 0 else 'worse'}"
