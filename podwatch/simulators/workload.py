"""Rack IT load: what each rack *wants* to draw before thermal throttling (`demand_fraction`).

Inference racks replay the real Azure LLM inference trace (`data/`, CC-BY 4.0, Patel et al.,
"Splitwise", ISCA 2024): request arrivals are turned into GPU work per second
(`ContextTokens + DECODE_WEIGHT * GeneratedTokens` at the arrival second), smoothed with a
first-order filter (batching and the decode phase spread a request over seconds), and normalised
so the trace's 95th percentile is full utilisation. Each rack replays one of the two services
from its own offset at its own playback rate (0.8-1.25x), so the one-hour trace loops without
racks moving in lockstep, under a diurnal envelope in the site's time zone (busiest mid-afternoon,
quietest ~04:00, weekends lower). Training racks run flat-high with periodic checkpoint dips.
Utilisation maps to power linearly between an idle floor (~30 % of rated) and rated power.

Everything is a pure function of simulated time (seconds) and per-rack parameters drawn once
from the seed, so live mode and history mode see the same load for the same seed and time.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np

DATA_DIR = Path(__file__).parent / "data"
TRACES = ("code", "conv")
DECODE_WEIGHT = 6.0  # a generated token costs ~6x a prompt token of GPU time (decode is memory bound)
SMOOTHING_S = 15.0 # batching + decode spread one request's work over seconds
IDLE_FRACTION = 0.30  # GPUs idle but powered: ~30 % of rated rack power
TRAINING_FRACTION = 0.93
CHECKPOINT_PERIOD_S = 1800.0  # training racks dip while writing a checkpoint every 30 min ...
CHECKPOINT_DURATION_S = 90.0  # ... for 90 s ...
CHECKPOINT_FRACTION = 0.45  # ... down to 45 % of rated
WORKLOAD_CODES = {"inference": 0, "training": 1, "mixed": 2}


@lru_cache(maxsize=None)
def trace_utilisation(name: str) -> np.ndarray:
    """Per-second utilisation 0..~1.5 of one Azure trace ('code' or 'conv'), 95th percentile = 1."""
    path = DATA_DIR / f"AzureLLMInferenceTrace_{name}.csv"
    seconds, work = [], []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            hms = row["TIMESTAMP"].split(" ")[1]
            h, m, s = hms.split(":")
            seconds.append(int(h) * 3600 + int(m) * 60 + float(s))
            work.append(float(row["ContextTokens"]) + DECODE_WEIGHT * float(row["GeneratedTokens"]))
    sec = np.asarray(seconds)
    sec -= sec.min()
    length = int(np.ceil(sec.max())) + 1
    per_second = np.bincount(sec.astype(np.int64), weights=np.asarray(work), minlength=length)
    # first-order smoothing, run twice over the loop so the start joins the end without a step
    alpha = 1.0 - np.exp(-1.0 / SMOOTHING_S)
    smoothed = np.empty_like(per_second)
    level = per_second.mean()
    for _ in range(2):
        for i, w in enumerate(per_second):
            level += alpha * (w - level)
            smoothed[i] = level
    return smoothed / np.percentile(smoothed, 95)


def diurnal_envelope(epoch_s: np.ndarray, tz: str) -> np.ndarray:
    """Demand multiplier 0.55..1.0 by local hour (peak ~16:00, trough ~04:00); weekends x0.85."""
    epoch_s = np.asarray(epoch_s, dtype=np.float64)
    zone = ZoneInfo(tz)
    # one UTC offset per chunk is accurate to the hour around DST changes, which is plenty here
    mid = datetime.fromtimestamp(float(epoch_s.flat[len(epoch_s.flat) // 2]), tz=timezone.utc).astimezone(zone)
    offset_s = mid.utcoffset().total_seconds() if mid.utcoffset() else 0.0
    local = epoch_s + offset_s
    hour = (local % 86400.0) / 3600.0
    day = np.floor(local / 86400.0).astype(np.int64)
    weekday = (day + 3) % 7  # 1970-01-01 was a Thursday (weekday 3, Monday = 0)
    env = 0.55 + 0.45 * (0.5 - 0.5 * np.cos(2 * np.pi * (hour - 4.0) / 24.0))
    return env * np.where(weekday >= 5, 0.85, 1.0)


@dataclass
class RackLoadParams:
    """Per-rack load parameters drawn once from the seed."""

    workload: np.ndarray  # WORKLOAD_CODES
    trace_index: np.ndarray  # 0 code, 1 conv
    offset_s: np.ndarray
    rate: np.ndarray  # playback rate
    checkpoint_phase_s: np.ndarray
    scale: np.ndarray  # per-rack utilisation scale (tenants differ)

    @classmethod
    def draw(cls, workloads: list[str], rng: np.random.Generator) -> "RackLoadParams":
        n = len(workloads)
        lengths = [len(trace_utilisation(t)) for t in TRACES]
        trace_index = np.arange(n) % 2
        return cls(
            workload=np.array([WORKLOAD_CODES[w] for w in workloads], dtype=np.int8),
            trace_index=trace_index,
            offset_s=rng.uniform(0, 1, n) * np.array(lengths)[trace_index],
            rate=rng.uniform(0.8, 1.25, n),
            checkpoint_phase_s=rng.uniform(0, CHECKPOINT_PERIOD_S, n),
            scale=rng.uniform(0.85, 1.05, n),
        )


def demand_fraction(t_s: np.ndarray, epoch_s: np.ndarray, params: RackLoadParams, tz: str) -> np.ndarray:
    """Demand as a fraction of rated power, shape (len(t_s), n_racks). `t_s` is simulated seconds
    since the simulation started (drives the trace position), `epoch_s` the matching Unix time
    (drives the diurnal envelope)."""
    t = np.asarray(t_s, dtype=np.float64)[:, None]
    out = np.empty((t.shape[0], params.workload.size))
    env = diurnal_envelope(epoch_s, tz)[:, None]
    inference = np.empty_like(out)
    for k, name in enumerate(TRACES):
        cols = np.flatnonzero(params.trace_index == k)
        if cols.size == 0:
            continue
        trace = trace_utilisation(name)
        pos = (params.offset_s[cols] + t * params.rate[cols]) % len(trace)
        i0 = pos.astype(np.int64)
        frac = pos - i0
        u = trace[i0] * (1 - frac) + trace[(i0 + 1) % len(trace)] * frac  # linear interpolation
        inference[:, cols] = u
    util = np.clip(inference * env * params.scale, 0.0, 1.0)
    inference_fraction = IDLE_FRACTION + (1.0 - IDLE_FRACTION) * util
    phase = (t + params.checkpoint_phase_s) % CHECKPOINT_PERIOD_S
    training_fraction = np.where(phase < CHECKPOINT_DURATION_S, CHECKPOINT_FRACTION, TRAINING_FRACTION)
    out[:] = np.where(params.workload == 0, inference_fraction,
                      np.where(params.workload == 1, training_fraction, 0.5 * (inference_fraction + training_fraction)))
    return out
