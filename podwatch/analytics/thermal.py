"""Thermal risk per rack: the probability that the rack's coolant return breaches its limit
within the horizon (site `thermal.risk_horizon_s`, default 300 s), with the reasons in words.

- Labels (`label_features`): a feature row at ts is positive when a breach of that rack *starts*
  in (ts, ts + horizon]. Rows while the rack is in breach are left out of training (the risk is
  then 1 by definition, see `ThermalModel.score`).
- Model: scikit-learn `HistGradientBoostingClassifier` over the relative, physics-informed
  features of `features.MODEL_FEATURES` (margins, steady-state margin from ṁ·c_p·ΔT, slopes,
  projections to the horizon), class-balanced so rare pre-breach rows count. The probability
  is the larger of the model's and a physics floor (`physics_risk`: the worst-case settled margin
  and a draining reservoir), so faults unlike the training set still raise the risk.
- Saved (`save(model_dir)`) as `thermal.joblib` plus `thermal.json` with the metadata: version,
  features, horizon, training range and runs, level thresholds, and the evaluation scores.
- Levels: ok < watch (0.2) <= warning (0.5) <= critical (0.8) on the probability.
- Reasons: every explainable signal is compared with its healthy range and the ones furthest out
  become sentences, most important first ("flow 0.71 L/min/kW (design 1.20)", "ΔT 17 K (design
  11 K) and rising 1.2 K/min"). They explain the physics the model reads, deterministically.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import polars as pl
from sklearn.ensemble import HistGradientBoostingClassifier

from podwatch.analytics.features import MODEL_FEATURES
from podwatch.errors import PodwatchError

log = logging.getLogger(__name__)

MODEL_FILE = "thermal.joblib"
META_FILE = "thermal.json"
MODEL_KIND = "thermal-hgb"
LEVELS = (("critical", 0.8), ("warning", 0.5), ("watch", 0.2))
FLAG_LEVEL_PROBABILITY = 0.5
REARM_K = 1.0  # a breach is over once the return is this far below the limit again  # "warning" and above counts as flagged in the evaluation

BREACH_SCHEMA = {"rack": pl.String, "breach_ts": pl.Datetime("us"), "breach_end_ts": pl.Datetime("us")}


class ModelError(PodwatchError):
    """The model file is missing, unreadable or does not fit the features."""


def level_of(probability: float) -> str:
    for name, threshold in LEVELS:
        if probability >= threshold:
            return name
    return "ok"


def level_expr(col: str = "probability") -> pl.Expr:
    expr = pl.lit("ok")
    for name, threshold in reversed(LEVELS):
        expr = pl.when(pl.col(col) >= threshold).then(pl.lit(name)).otherwise(expr)
    return expr


def breaches_from_features(features: pl.DataFrame) -> pl.DataFrame:
    """Breach episodes (rack, breach_ts, breach_end_ts) from the measured return vs limit — for
    histories without ground truth. Ground truth from the simulator is preferred."""
    measured = pl.col("return_c").is_not_null()
    if "return_estimated" in features.columns:  # a heat-balance estimate is no evidence of a breach
        measured = measured & ~pl.col("return_estimated").fill_null(False)
    f = features.filter(measured).sort("rack", "ts").with_columns(
        (pl.col("return_c") >= pl.col("limit_c")).alias("in_breach"))
    f = f.with_columns((pl.col("in_breach") != pl.col("in_breach").shift(1).over("rack").fill_null(False))
                       .cum_sum().over("rack").alias("episode"))
    return (f.filter("in_breach").group_by("rack", "episode")
            .agg(pl.col("ts").min().alias("breach_ts"), pl.col("ts").max().alias("breach_end_ts"))
            .select("rack", "breach_ts", "breach_end_ts").sort("rack", "breach_ts"))


def normalise_breaches(breaches: pl.DataFrame | None) -> pl.DataFrame:
    if breaches is None or breaches.is_empty():
        return pl.DataFrame(schema=BREACH_SCHEMA)
    if "breach_ts" not in breaches.columns or "rack" not in breaches.columns:
        raise ValueError(f"breaches need columns rack, breach_ts[, breach_end_ts]; got {breaches.columns}")
    out = breaches
    if "breach_end_ts" not in out.columns:
        out = out.with_columns(pl.lit(None, pl.Datetime("us")).alias("breach_end_ts"))
    out = out.with_columns(_naive(pl.col("breach_ts"), out.schema["breach_ts"]),
                           _naive(pl.col("breach_end_ts"), out.schema["breach_end_ts"]))
    return out.select(list(BREACH_SCHEMA)).cast(BREACH_SCHEMA)


def _naive(expr: pl.Expr, dtype) -> pl.Expr:
    if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None:
        return expr.dt.convert_time_zone("UTC").dt.replace_time_zone(None).cast(pl.Datetime("us"))
    return expr.cast(pl.Datetime("us"))


def label_features(features: pl.DataFrame, breaches: pl.DataFrame | None, horizon_s: int) -> pl.DataFrame:
    """Add `label` (breach starts within (ts, ts + horizon]) and `in_breach`; see module docstring."""
    b = normalise_breaches(breaches)
    f = features.sort("rack", "ts")
    if b.is_empty():
        return f.with_columns(pl.lit(0, pl.Int8).alias("label"), pl.lit(False).alias("in_breach"),
                              pl.lit(None, pl.Datetime("us")).alias("next_breach_ts"))
    # the next breach start at or after each row (as-of join forward in time)
    nxt = b.select("rack", pl.col("breach_ts").alias("next_breach_ts"), pl.col("breach_ts").alias("_key")).sort("_key")
    f = f.sort("ts").join_asof(nxt, left_on="ts", right_on="_key", by="rack", strategy="forward",
                               check_sortedness=False)
    prev = b.select("rack", pl.col("breach_ts").alias("_start"), "breach_end_ts").sort("_start")
    f = f.sort("ts").join_asof(prev, left_on="ts", right_on="_start", by="rack", strategy="backward",
                               check_sortedness=False)
    horizon = pl.duration(seconds=horizon_s)
    # In breach: from a breach start until its end; ground truth without end times (the simulator
    # re-arms a breach once the return is 1 K below the limit) ends it when the return is back there.
    in_breach = (pl.col("_start").is_not_null() & (pl.col("ts") >= pl.col("_start"))
                 & pl.when(pl.col("breach_end_ts").is_null())
                 .then(pl.col("margin_c").is_null() | (pl.col("margin_c") < REARM_K))
                 .otherwise(pl.col("ts") <= pl.col("breach_end_ts")))
    f = f.with_columns(
        in_breach.alias("in_breach"),
        (pl.col("next_breach_ts").is_not_null() & (pl.col("next_breach_ts") > pl.col("ts"))
         & (pl.col("next_breach_ts") <= pl.col("ts") + horizon)).cast(pl.Int8).alias("label"),
    )
    return f.drop("_key", "_start", "breach_end_ts").sort("rack", "ts")


# --------------------------------------------------------------------------- reasons

def _f(row: dict, key: str) -> float | None:
    v = row.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def explain(row: dict[str, Any], max_reasons: int = 3) -> list[str]:
    """Sentences for the signals of one feature row that are furthest out of their healthy range."""
    cands: list[tuple[float, str]] = []
    g = lambda k: _f(row, k)  # noqa: E731
    slope = g("return_slope_2m")
    rising = f" and rising {slope:.1f} K/min" if slope is not None and slope > 0.2 else ""
    margin, ret, limit = g("margin_c"), g("return_c"), g("limit_c")
    # a rack without liquid sensors: its return and flow come from the CDU and PDUs (features.py)
    est = " (estimated from the CDU and PDUs)" if row.get("return_estimated") else ""
    if margin is not None and ret is not None and limit is not None:
        sev = max(0.0, (8.0 - margin) / 4.0) + (max(0.0, slope or 0.0) / 0.5)
        if sev > 0.5:
            if margin <= 0:
                cands.append((10.0, f"return {ret:.1f} °C{est} at or above the {limit:.0f} °C limit"))
            else:
                cands.append((sev, f"return {ret:.1f} °C{est}, {margin:.1f} K below the {limit:.0f} °C limit{rising}"))
    ratio, fpk, design = g("flow_ratio"), g("flow_per_kw"), g("design_flow_per_kw")
    if ratio is not None and fpk is not None and design is not None and ratio < 0.9:
        fslope = g("flow_ratio_slope_2m")
        falling = " and falling" if fslope is not None and fslope < -0.02 else ""
        cands.append(((0.9 - ratio) / 0.1 + 0.5, f"flow {fpk:.2f} L/min/kW{est} (design {design:.2f}){falling}"))
    dtr, dt, dtd = g("dt_ratio"), g("delta_t_c"), g("dt_design_c")
    if dtr is not None and dt is not None and dtd is not None and dtr > 1.1:
        at_load = f" at {g('power_kw'):.0f} kW" if g("power_kw") is not None else ""
        cands.append(((dtr - 1.1) / 0.1 + 0.5, f"ΔT {dt:.0f} K (design {dtd:.0f} K{at_load}){rising}"))
    mss = g("margin_ss_c")
    if mss is not None and limit is not None and mss < 2.0:
        settle_c = limit - mss
        # With flow near zero the steady state is far beyond anything physical (boiling, shutdown):
        # say "far above" rather than print an extrapolated 200+ °C.
        where = (f"near {settle_c:.0f} °C" if settle_c <= limit + 25
                 else f"far above the limit (> {limit + 25:.0f} °C)")
        cands.append(((2.0 - mss) / 2.0 + 1.0,
                      f"at this flow and load the return settles {where} (limit {limit:.0f} °C)"))
    worst = g("worst_margin_c")
    if worst is not None and limit is not None and worst < 1.0 and (mss is None or worst < mss - 1.0):
        # the worst case differs from the present settled state: say which input drives it
        drivers = []
        sup_w, sup = g("supply_worst_c"), g("supply_c")
        if sup_w is not None and sup is not None and sup_w > sup + 0.5:
            drivers.append(f"supply up to {sup_w:.1f} °C")
        pw_w, pw = g("power_worst_kw"), g("power_kw")
        if pw_w is not None and pw is not None and pw_w > pw * 1.05:
            drivers.append(f"load up to {pw_w:.0f} kW")
        fl_w, fl = g("flow_proj_lpm"), g("flow_lpm")
        if fl_w is not None and fl is not None and fl_w < fl * 0.95:
            drivers.append(f"flow down to {fl_w:.0f} L/min")
        settle_c = limit - worst
        where = f"near {settle_c:.0f} °C" if settle_c <= limit + 25 else f"far above the limit (> {limit + 25:.0f} °C)"
        cands.append(((1.0 - worst) / 1.0 + 1.0,
                      f"within the horizon the return may settle {where} (limit {limit:.0f} °C)"
                      + (f": {', '.join(drivers)}" if drivers else "")))
    over, cdu_supply = g("supply_over_setpoint_c"), g("cdu_supply_c")
    if over is not None and cdu_supply is not None and over > 1.0:
        sslope = g("supply_slope_5m")
        trend = f", rising {sslope * 60:.1f} K/h" if sslope is not None and sslope > 0.01 else ""
        cands.append((over / 1.0, f"CDU supply {cdu_supply:.1f} °C, {over:.1f} K above setpoint{trend}"))
    exc, appr, aslope = g("approach_excess_c"), g("approach_c"), g("approach_slope_5m")
    if exc is not None and appr is not None and ((over or 0) > 0.5 and exc > 1.0 or (aslope or 0) > 0.03):
        trend = f", rising {aslope * 60:.1f} K/h" if aslope is not None and aslope > 0.01 else ""
        cands.append((max(exc / 2.0, (aslope or 0) / 0.03), f"CDU approach {appr:.1f} K (design {g('design_approach_c') or 0:.1f} K){trend}"))
    fac, fslope = g("facility_c"), g("facility_slope_5m")
    if fac is not None and fslope is not None and fslope > 0.05:
        cands.append((fslope / 0.05, f"facility water {fac:.1f} °C rising {fslope:.2f} K/min"))
    deficit, running, working = g("pump_deficit"), g("pumps_running"), g("working_pumps")
    if deficit is not None and deficit >= 1 and running is not None and working is not None:
        cands.append((3.0 + deficit, f"{running:.0f} pump(s) running, {working:.0f} needed for full flow, no standby left"))
    pf, power = g("power_frac"), g("power_kw")
    if pf is not None and power is not None and pf > 1.0:
        cands.append(((pf - 1.0) / 0.05, f"load {power:.0f} kW, {pf:.0%} of rated"))
    err = g("balance_error_c")
    if err is not None and err > 6.0 and ret is not None:
        cands.append((6.0, f"return sensor reads {ret:.1f} °C, {err:+.0f} K off the heat balance (sensor fault?)"))
    res = g("reservoir_slope_5m")
    if res is not None and res < -0.5:
        cands.append((-res / 0.5, f"coolant reservoir falling {-res:.1f} %/min (leak?)"))
    cands.sort(key=lambda c: -c[0])
    return [text for _, text in cands[:max_reasons]] or ["all signals within healthy ranges"]


# --------------------------------------------------------------------------- physics floor

PHYSICS_SCALE_K = 0.5
MODEL_GATE_MARGIN_K = 6.0  # model risk above "watch" needs a worst-case or projected margin below this
MODEL_GATE_CAP = 0.19
SETTLING_BALANCE_K = 1.0  # a return at most this far above the heat balance is settling, not running away
SENSOR_SUSPECT_K = 6.0  # return this far from the heat balance = the sensor, not the loop
SENSOR_JUDGE_MIN_FLOW_SHARE = 0.7  # ... judged only while flow >= 70 % of the rack's design flow


def physics_risk(features: pl.DataFrame, horizon_s: int) -> np.ndarray:
    """A risk floor from first principles, independent of what the training set held.

    - the worst-case margin (`worst_margin_c`: supply at its recent peak or on its trend, load at
      its recent peak, at the present flow, settled through ΔT = P·f/(ṁ·c_p)) through a logistic
      of scale 0.5 K: 0.5 at 0 K, 0.88 at −1 K, 0.12 at +1 K (the settled margin carried along
      its trend, `trend_margin_c`, is a model input, not part of this floor);
    - a falling reservoir that reaches the pumps' air-drawing level within the horizon: 0.9.
    The probability is the larger of this and the model's, so a fault the model never saw still
    raises the risk when the physics says the loop cannot hold the limit."""
    n = features.height
    if n == 0:
        return np.zeros(0)
    p = np.zeros(n)
    if "worst_margin_c" in features.columns:
        worst = features["worst_margin_c"].cast(pl.Float64).fill_null(np.inf).to_numpy()
        with np.errstate(over="ignore"):
            p = np.maximum(p, 1.0 / (1.0 + np.exp(np.clip(worst / PHYSICS_SCALE_K, -50, 50))))
    if "reservoir_time_to_low_s" in features.columns:
        ttl = features["reservoir_time_to_low_s"].cast(pl.Float64).fill_null(np.inf).to_numpy()
        p = np.where(ttl <= horizon_s, np.maximum(p, 0.9), p)
    return p


def sensor_suspect(features: pl.DataFrame) -> np.ndarray:
    """Rows whose measured return reads more than `SENSOR_SUSPECT_K` above where the heat balance
    puts it (supply + P·f/(ṁ·c_p)) while the flow is healthy: a drifting, stuck or spiking sensor."""
    if "balance_error_c" not in features.columns:
        return np.zeros(features.height, dtype=bool)
    err = features["balance_error_c"].cast(pl.Float64).fill_null(0.0).to_numpy()
    # One-sided: a return reading *below* the balance is the normal lag after a flow drop (and a
    # sensor stuck low cannot raise a false alarm anyway); one reading far above it at healthy
    # flow is a sensor fault.
    suspect = np.nan_to_num(err) > SENSOR_SUSPECT_K
    # At low flow the loop's time constant C/(ṁ·c_p) grows to minutes and a throttled rack's
    # return legitimately lags the balance: only judge the sensor while the flow is healthy.
    if "flow_lpm" in features.columns and "design_flow_lpm" in features.columns:
        flow = np.nan_to_num(features["flow_lpm"].cast(pl.Float64).fill_null(0.0).to_numpy())
        design = np.nan_to_num(features["design_flow_lpm"].cast(pl.Float64).fill_null(0.0).to_numpy())
        suspect &= flow >= SENSOR_JUDGE_MIN_FLOW_SHARE * design
    return suspect


def in_breach_certain(features: pl.DataFrame, p: np.ndarray, suspect: np.ndarray) -> np.ndarray:
    """A rack at or over its limit is in breach (risk 1) — unless its return sensor is suspect."""
    if "margin_c" not in features.columns:
        return p
    margin = np.nan_to_num(features["margin_c"].cast(pl.Float64).fill_null(np.nan).to_numpy(), nan=1.0)
    return np.where((margin <= 0) & ~suspect, 1.0, p)


# --------------------------------------------------------------------------- the model

@dataclass
class ThermalModel:
    classifier: HistGradientBoostingClassifier
    features: list[str]
    horizon_s: int
    version: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def predict_proba(self, features: pl.DataFrame) -> np.ndarray:
        missing = [c for c in self.features if c not in features.columns]
        if missing:
            raise ModelError(f"feature frame lacks {missing} that model {self.version} was trained on")
        if features.is_empty():
            return np.zeros(0)
        x = features.select([pl.col(c).cast(pl.Float64) for c in self.features]).to_numpy()
        p_model = self.classifier.predict_proba(x)[:, 1]
        # A rack whose worst-case and extrapolated margins are both wide cannot reach its limit
        # within the horizon without a new fault, which no model sees coming: cap the model there.
        # Nor can one whose worst case is wide and whose return is not above where the heat
        # balance settles it: a first-order loop approaches its settled return without overshoot,
        # so a return climbing after a load step is heading for that settled value, not for the
        # limit. (A return running above the balance — a flow loss the flow sensor misses — keeps
        # the extrapolation in the gate.)
        if "worst_margin_c" in features.columns and "proj_margin_c" in features.columns:
            worst = features["worst_margin_c"].cast(pl.Float64).fill_null(np.nan).to_numpy()
            proj = features["proj_margin_c"].cast(pl.Float64).fill_null(np.nan).to_numpy()
            closest = np.fmin(worst, proj)
            if "balance_error_c" in features.columns:
                err = features["balance_error_c"].cast(pl.Float64).fill_null(np.nan).to_numpy()
                settling = np.nan_to_num(err, nan=np.inf) <= SETTLING_BALANCE_K
                closest = np.where(settling & ~np.isnan(worst), worst, closest)
            p_model = np.where(np.nan_to_num(closest, nan=0.0) > MODEL_GATE_MARGIN_K,
                               np.minimum(p_model, MODEL_GATE_CAP), p_model)
        suspect = sensor_suspect(features)
        # a return sensor that disagrees with the heat balance does not drive the model past "watch"
        p_model = np.where(suspect, np.minimum(p_model, MODEL_GATE_CAP), p_model)
        p = np.maximum(p_model, physics_risk(features, self.horizon_s))
        return in_breach_certain(features, p, suspect)

    def score(self, features: pl.DataFrame, *, with_reasons: bool = True) -> pl.DataFrame:
        """(rack, ts, horizon_s, probability, level, reasons (list), model_version) per feature row
        with a return temperature."""
        f = features.filter(pl.col("return_c").is_not_null()) if "return_c" in features.columns else features
        p = self.predict_proba(f)
        out = f.with_columns(pl.Series("probability", p, dtype=pl.Float64))
        reasons = ([explain(r) for r in out.iter_rows(named=True)] if with_reasons
                   else [[] for _ in range(out.height)])
        return out.select(
            "rack", "ts", pl.lit(self.horizon_s, pl.Int32).alias("horizon_s"), "probability",
            level_expr().alias("level"), pl.Series("reasons", reasons, dtype=pl.List(pl.String)),
            pl.lit(self.version).alias("model_version"))

    def save(self, model_dir: str | Path) -> Path:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        joblib.dump({"classifier": self.classifier, "features": self.features, "horizon_s": self.horizon_s,
                     "version": self.version}, model_dir / MODEL_FILE)
        meta = {**self.metadata, "version": self.version, "kind": MODEL_KIND, "features": self.features,
                "horizon_s": self.horizon_s, "levels": dict(LEVELS)}
        (model_dir / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        return model_dir / MODEL_FILE

    def update_scores(self, model_dir: str | Path, scores: dict[str, Any]) -> None:
        """Record evaluation figures in the metadata sidecar."""
        self.metadata["scores"] = scores
        path = Path(model_dir) / META_FILE
        meta = json.loads(path.read_text()) if path.exists() else {}
        meta["scores"] = scores
        path.write_text(json.dumps(meta, indent=2, default=str))

    @classmethod
    def load(cls, model_dir: str | Path) -> ThermalModel:
        model_dir = Path(model_dir)
        path = model_dir / MODEL_FILE
        if not path.exists():
            raise ModelError(f"no thermal model at {path}: train one with `podwatch train thermal --model-dir {model_dir}`")
        try:
            blob = joblib.load(path)
            meta = json.loads((model_dir / META_FILE).read_text()) if (model_dir / META_FILE).exists() else {}
        except Exception as exc:  # noqa: BLE001 — any unpickling failure is a bad model file for the user
            raise ModelError(f"cannot read thermal model {path}: {exc}") from exc
        return cls(classifier=blob["classifier"], features=list(blob["features"]), horizon_s=int(blob["horizon_s"]),
                   version=str(blob["version"]), metadata=meta)


class PhysicsRiskModel:
    """The risk without a trained model: the physics floor alone (`physics_risk`), with the same
    `score` output and reasons. Used by the serve process until `podwatch train thermal` has
    written a model, so risk scores and their reasons flow from the first minutes."""

    version = "thermal-physics-only"

    def __init__(self, horizon_s: int = 300):
        self.horizon_s = horizon_s
        self.features = list(MODEL_FEATURES)
        self.metadata: dict[str, Any] = {"kind": "physics-only"}

    def predict_proba(self, features: pl.DataFrame) -> np.ndarray:
        return in_breach_certain(features, physics_risk(features, self.horizon_s), sensor_suspect(features))

    score = ThermalModel.score


@dataclass
class TrainingRun:
    """One history to train on: its feature rows and ground-truth breaches."""

    name: str
    features: pl.DataFrame
    breaches: pl.DataFrame | None


def training_frame(runs: list[TrainingRun], horizon_s: int) -> pl.DataFrame:
    parts = []
    for run in runs:
        lab = label_features(run.features, run.breaches, horizon_s)
        parts.append(lab.filter(~pl.col("in_breach") & pl.col("return_c").is_not_null())
                     .select("rack", "ts", *MODEL_FEATURES, "label").with_columns(pl.lit(run.name).alias("run")))
    return pl.concat(parts, how="vertical_relaxed")


def train_thermal(runs: list[TrainingRun], *, horizon_s: int = 300, max_iter: int = 200,
                  max_negative_rows: int = 150_000,
                  random_state: int = 0, extra_metadata: dict[str, Any] | None = None) -> ThermalModel:
    """Fit the classifier on labelled feature rows of all runs."""
    data = training_frame(runs, horizon_s)
    if data.is_empty():
        raise ModelError("no feature rows to train on (are the histories empty?)")
    # Healthy rows far outnumber the rest and teach little after the first tens of thousands:
    # keep every positive and a seeded sample of the negatives (weights restore their share).
    negatives = data.filter(pl.col("label") == 0)
    keep_share = min(1.0, max_negative_rows / max(1, negatives.height))
    if keep_share < 1.0:
        data = pl.concat([data.filter(pl.col("label") == 1),
                          negatives.sample(fraction=keep_share, seed=random_state)])
    y = data["label"].to_numpy()
    positives = int(y.sum())
    if positives == 0 or positives == len(y):
        raise ModelError(f"training needs both breach and healthy rows; got {positives} positive of {len(y)}")
    # A signal no training site measures (a landlord CDU without telemetry leaves every CDU column
    # empty) cannot be learnt — and an all-empty column breaks the binning: the model does without it.
    features = [c for c in MODEL_FEATURES if data[c].cast(pl.Float64).is_not_null().any()
                and data[c].cast(pl.Float64).is_not_nan().any()]
    unmeasured = [c for c in MODEL_FEATURES if c not in features]
    if unmeasured:
        log.info("thermal model trained without %d signal(s) no training row measures: %s",
                 len(unmeasured), ", ".join(unmeasured))
    x = data.select([pl.col(c).cast(pl.Float64) for c in features]).to_numpy()
    # Positives are rare; weigh them up (capped) so the boundary sits before the breach, not at it.
    pos_weight = min(20.0, (len(y) - positives) / positives / keep_share)
    weights = np.where(y == 1, pos_weight, 1.0 / keep_share)
    pos_weight_note = pos_weight
    clf = HistGradientBoostingClassifier(max_iter=max_iter, learning_rate=0.08, max_leaf_nodes=31,
                                         min_samples_leaf=40, l2_regularization=1.0, random_state=random_state)
    clf.fit(x, y, sample_weight=weights)
    now = datetime.now(UTC)
    version = f"{MODEL_KIND}-{now:%Y%m%dT%H%M%SZ}"
    metadata = {
        "trained_at": now.isoformat(),
        "training_range": {"from": str(data["ts"].min()), "to": str(data["ts"].max())},
        "runs": [r.name for r in runs],
        "rows": int(len(y)), "positives": positives, "positive_weight": pos_weight_note,
        "negative_share_kept": keep_share,
        "params": {k: v for k, v in clf.get_params().items() if isinstance(v, (int, float, str, bool, type(None)))},
        "train_accuracy": float((clf.predict(x) == y).mean()),
        "features_not_measured": unmeasured,
        **(extra_metadata or {}),
    }
    log.info("trained thermal model %s on %d rows (%d positive) from %d runs", version, len(y), positives, len(runs))
    return ThermalModel(classifier=clf, features=features, horizon_s=horizon_s, version=version,
                        metadata=metadata)


def risk_rows_for_db(scores: pl.DataFrame) -> pl.DataFrame:
    """Scores shaped as the `risk_scores` table (reasons as a JSON array string, ts UTC)."""
    return scores.select(
        pl.col("ts").dt.replace_time_zone("UTC") if scores.schema["ts"].time_zone is None else pl.col("ts"),
        "rack", pl.col("horizon_s").cast(pl.Int32), "probability", "level",
        pl.col("reasons").map_elements(lambda r: json.dumps(list(r), ensure_ascii=False), return_dtype=pl.String),
        "model_version")
