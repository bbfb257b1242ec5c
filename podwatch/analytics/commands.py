"""Thermal-risk commands: `podwatch train thermal`, `podwatch analyze`, `podwatch eval thermal`.

- `train thermal` simulates training histories (randomised fault episodes on the given sites,
  `podwatch.simulators.history`) — or reads `--history` folders written by `podwatch simulate
  history` (samples.parquet + truth.json) — builds features, trains and saves the model.
- `analyze` scores racks from a DuckDB file (`--db`) or a Parquet history (`--history`) and
  writes `risk_scores` (into `--db`, or `--write-db`), printing the newest risk per rack.
- `eval thermal` simulates held-out scenarios (other seeds, onsets, magnitudes, loads and both
  example sites, compound two-fault runs; fault-free days for false alarms), prints the figures
  against the goals with the per-fault-kind table (recall over all and over predictable breaches)
  and records them in the model's metadata.

The simulator is imported lazily here (CLI wiring), never by the analytics modules.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import typer

from podwatch.errors import PodwatchError, user_errors

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path("models/thermal")
EXAMPLE_SITES = ("examples/sites/demo.yaml", "examples/sites/reference-10mw.yaml")
FEATURE_STEP_S = 10




def _group(app: typer.Typer, name: str, help_text: str) -> typer.Typer:
    """A shared sub-command group (`train`, `eval`): reuse it if another stage made it first."""
    for info in app.registered_groups:
        if info.name == name and info.typer_instance is not None:
            return info.typer_instance
    group = typer.Typer(help=help_text, no_args_is_help=True)
    app.add_typer(group, name=name)
    return group


# --------------------------------------------------------------------------- simulated runs

@dataclass
class RunSpec:
    """One simulated history: a site, a length, a seed and its faults."""

    name: str
    site_path: str
    hours: float
    seed: int
    episodes_per_day: float = 0.0  # randomised episodes (training)
    faults: list[dict[str, Any]] = field(default_factory=list)  # explicit faults (held-out scenarios)
    fault_free: bool = False
    sensor_faults: bool = True


@dataclass
class SimRun:
    spec: RunSpec
    features: pl.DataFrame
    breaches: pl.DataFrame  # rack, breach_ts, fault_kind, onset_ts
    faults: pl.DataFrame


def simulate_run(spec: RunSpec, out_dir: Path, *, resolution_s: int = FEATURE_STEP_S) -> SimRun:
    """Generate one history with the simulator and turn it into features + ground truth."""
    from podwatch.analytics.evaluate import truth_frames
    from podwatch.analytics.features import build_features
    from podwatch.simulators.history import generate_history
    from podwatch.simulators.scenario import Scenario, random_scenario
    from podwatch.site import load_site

    site = load_site(spec.site_path)
    duration_s = spec.hours * 3600.0
    scenarios = []
    if spec.episodes_per_day > 0:
        scenarios.append(random_scenario(site, duration_s, spec.episodes_per_day, spec.seed,
                                         sensor_faults=spec.sensor_faults, warmup_s=min(3600.0, duration_s / 4)))
    if spec.faults:
        scenarios.append(Scenario.parse({"name": spec.name, "faults": spec.faults}, spec.name, site))
    result = generate_history(site, days=duration_s / 86400.0, resolution_s=resolution_s, scenarios=scenarios,
                              seed=spec.seed, out_dir=out_dir / spec.name)
    rows = pl.read_parquet(result.samples_path)
    features = build_features(rows, site, step_s=FEATURE_STEP_S)
    faults, breaches = truth_frames(result.truth.to_dict())
    return SimRun(spec, features, breaches, faults)


def read_history_run(path: Path, site_path: str) -> SimRun:
    """A history folder written by the simulator (samples.parquet + truth.json)."""
    from podwatch.analytics.evaluate import truth_frames
    from podwatch.analytics.features import build_features
    from podwatch.site import load_site

    site = load_site(site_path)
    samples = path / "samples.parquet" if path.is_dir() else path
    if not samples.exists():
        raise PodwatchError(f"{path}: no samples.parquet (write one with `podwatch simulate history`)")
    truth_path = (path if path.is_dir() else path.parent) / "truth.json"
    if not truth_path.exists():
        raise PodwatchError(f"{path}: no truth.json next to the samples: training needs the ground truth")
    features = build_features(pl.read_parquet(samples), site, step_s=FEATURE_STEP_S)
    faults, breaches = truth_frames(json.loads(truth_path.read_text()))
    spec = RunSpec(name=path.name, site_path=site_path, hours=0, seed=0)
    return SimRun(spec, features, breaches, faults)


def training_specs(sites: list[str], runs_per_site: int, hours: float, seed: int, episodes_per_day: float,
                   per_kind: int = 2, scenario_hours: float = 3.0) -> list[RunSpec]:
    """Random-episode histories per site (all fault kinds incl. sensor faults, mixed with normal
    operation) plus targeted single-fault runs (`per_kind` per kind and site) so that rare
    breaches — slow fouling, facility water — are represented."""
    specs = []
    for si, site in enumerate(sites):
        for i in range(runs_per_site):
            s = seed + 1000 * si + i
            specs.append(RunSpec(f"train-{Path(site).stem}-{s}", site, hours, s, episodes_per_day=episodes_per_day))
    if per_kind > 0:
        specs += scenario_specs(sites, per_kind, scenario_hours, seed, ranges=TRAIN_RANGES, prefix="train")
    return specs


# Magnitude ranges of the targeted scenarios. Held-out ranges differ from (and reach past) the
# training ranges; slow faults are large enough to breach within the run (a CDU holding 32 °C on
# 26 °C facility water needs ~8x fouling or ~17 K warmer facility water before racks breach).
TRAIN_RANGES = {"flow_restriction": (0.4, 0.95), "hx_fouling": (6.0, 12.0), "facility_water_rise": (12.0, 22.0),
                "leak": (0.5, 8.0), "load_surge": (1.1, 1.6)}
HELDOUT_RANGES = {"flow_restriction": (0.45, 0.97), "hx_fouling": (8.0, 14.0), "facility_water_rise": (16.0, 25.0),
                  "leak": (1.0, 10.0), "load_surge": (1.2, 1.8)}
FAULT_KINDS = ("pump_failure", "flow_restriction", "hx_fouling", "facility_water_rise", "leak", "load_surge")


def scenario_specs(sites: list[str], per_kind: int, hours: float, seed: int, *, ranges: dict[str, tuple[float, float]],
                   prefix: str, fault_free_hours: float = 0.0) -> list[RunSpec]:
    """One fault per run, for every fault kind and site, with onsets, targets and magnitudes drawn
    from `seed` (training and held-out use different seeds and ranges), plus fault-free runs."""
    import numpy as np

    from podwatch.site import load_site

    rng = np.random.default_rng(seed + 7_777_777)
    specs: list[RunSpec] = []
    run_s = hours * 3600.0
    for site_path in sites:
        site = load_site(site_path)
        cdus, racks = site.cdus, site.racks
        stem = Path(site_path).stem
        for kind in FAULT_KINDS:
            for i in range(per_kind):
                cdu = cdus[int(rng.integers(len(cdus)))]
                rack = racks[int(rng.integers(len(racks)))]
                earliest = min(900.0, 0.1 * run_s)
                onset = float(rng.uniform(earliest, max(earliest + 1.0, 0.3 * run_s)))
                base = {"kind": kind, "onset_s": round(onset, 1)}
                lo, hi = ranges.get(kind, (0.0, 0.0))
                magnitude = round(float(rng.uniform(lo, hi)), 3)
                if kind == "pump_failure":
                    duty = list(range(1, cdu.working_pumps + 1))
                    fault = {**base, "target": cdu.id, "pumps": duty if i % 2 == 0 else [duty[0]],
                             "standby_takeover": i % 3 == 2, "takeover_delay_s": float(rng.uniform(5, 30))}
                elif kind == "flow_restriction":
                    fault = {**base, "target": rack.id, "magnitude": magnitude, "ramp_s": float(rng.uniform(0, 2400))}
                elif kind in ("hx_fouling", "facility_water_rise"):
                    ramp = float(rng.uniform(0.15, 0.5) * run_s)
                    fault = {**base, "target": cdu.id, "magnitude": magnitude, "ramp_s": ramp}
                elif kind == "leak":
                    fault = {**base, "target": rack.id if i % 2 else cdu.id, "magnitude": magnitude}
                else:
                    fault = {**base, "target": cdu.id if i % 2 else rack.id, "magnitude": magnitude,
                             "ramp_s": float(rng.uniform(0, 600))}
                specs.append(RunSpec(f"{prefix}-{stem}-{kind}-{i}", site_path, hours, seed + 50_000 + len(specs),
                                     faults=[fault]))
        if fault_free_hours > 0:
            specs.append(fault_free_spec(prefix, site_path, fault_free_hours, seed + 90_000 + len(specs)))
    return specs


def fault_free_spec(prefix: str, site_path: str, hours: float, seed: int) -> RunSpec:
    """A healthy run for the false-alarm rate (no faults, sensor noise only)."""
    return RunSpec(f"{prefix}-faultfree-{Path(site_path).stem}", site_path, hours, seed, fault_free=True)


SENSOR_FAULT_POINTS = (("rack", "rack.liquid_return_temp_c"), ("rack", "rack.liquid_supply_temp_c"),
                       ("rack", "rack.liquid_flow_lpm"), ("pdu", "pdu.power_kw"), ("cdu", "cdu.supply_temp_c"),
                       ("cdu", "cdu.facility_supply_temp_c"), ("cdu", "cdu.reservoir_level_pct"))


def sensor_fault_specs(sites: list[str], per_site: int, hours: float, seed: int) -> list[RunSpec]:
    """Runs with only sensor faults (stuck, drift, dropout, spike on the signals the risk reads)
    and no physical fault: every alarm there is a false alarm caused by a lying sensor."""
    import numpy as np

    from podwatch.site import load_site

    rng = np.random.default_rng(seed + 31_337)
    specs = []
    for site_path in sites:
        site = load_site(site_path)
        for i in range(per_site):
            faults = []
            for j, (kind, metric) in enumerate(SENSOR_FAULT_POINTS):
                devices = [d for d in site.devices if d.kind == kind]
                dev = devices[int(rng.integers(len(devices)))]
                mode = ("stuck", "drift", "dropout", "spike")[(i + j) % 4]
                magnitude = float(rng.uniform(2, 8)) * (1 if rng.random() < 0.5 else -1)
                faults.append({"kind": "sensor_fault", "target": dev.id, "metric": metric, "mode": mode,
                               "magnitude": round(magnitude, 2),
                               "onset_s": round(float(rng.uniform(600, 0.5 * hours * 3600)), 1)})
            specs.append(RunSpec(f"sensorfaults-{Path(site_path).stem}-{i}", site_path, hours,
                                 seed + 70_000 + len(specs), faults=faults, fault_free=True))
    return specs


def compound_specs(sites: list[str], per_site: int, hours: float, seed: int, *, prefix: str) -> list[RunSpec]:
    """Two faults in one run, a kind of scenario the training set never holds as such: a load
    surge on a rack whose strainer is already partly clogged; a duty pump tripping (no standby)
    while the facility water is warm; a module-wide load surge on a fouled CDU. The breach is
    attributed to the fault that started last (the trigger), so load surges and single pump trips
    get breaches of their own. Onsets, magnitudes and ramps are drawn from `seed`."""
    import numpy as np

    from podwatch.site import load_site

    rng = np.random.default_rng(seed + 4_242_424)
    specs: list[RunSpec] = []
    run_s = hours * 3600.0
    for site_path in sites:
        site = load_site(site_path)
        stem = Path(site_path).stem
        for i in range(per_site):
            cdu = site.cdus[int(rng.integers(len(site.cdus)))]
            rack = site.racks[int(rng.integers(len(site.racks)))]
            first = float(rng.uniform(0.1, 0.25) * run_s)
            trigger = float(first + rng.uniform(0.2, 0.4) * run_s)
            variants = {
                "restricted-surge": [
                    {"kind": "flow_restriction", "target": rack.id, "onset_s": round(first, 1),
                     "magnitude": round(float(rng.uniform(0.45, 0.65)), 3), "ramp_s": float(rng.uniform(0, 900))},
                    {"kind": "load_surge", "target": rack.id, "onset_s": round(trigger, 1),
                     "magnitude": round(float(rng.uniform(1.3, 1.7)), 3), "ramp_s": float(rng.uniform(0, 600))}],
                "warm-water-pump-trip": [
                    {"kind": "facility_water_rise", "target": cdu.id, "onset_s": round(first, 1),
                     "magnitude": round(float(rng.uniform(11.0, 15.0)), 2), "ramp_s": float(rng.uniform(600, 1800))},
                    {"kind": "pump_failure", "target": cdu.id, "onset_s": round(trigger, 1), "pumps": [1],
                     "standby_takeover": False}],
                "fouled-module-surge": [
                    {"kind": "hx_fouling", "target": cdu.id, "onset_s": round(first, 1),
                     "magnitude": round(float(rng.uniform(4.0, 7.0)), 2), "ramp_s": float(rng.uniform(600, 1800))},
                    {"kind": "load_surge", "target": cdu.id, "onset_s": round(trigger, 1),
                     "magnitude": round(float(rng.uniform(1.2, 1.5)), 3), "ramp_s": float(rng.uniform(60, 900))}],
            }
            for name, faults in variants.items():
                specs.append(RunSpec(f"{prefix}-{stem}-{name}-{i}", site_path, hours, seed + 60_000 + len(specs),
                                     faults=faults))
    return specs


def heldout_specs(sites: list[str], per_kind: int, hours: float, seed: int, fault_free_hours: float,
                  compound_per_site: int | None = None) -> list[RunSpec]:
    """Held-out scenarios (their own seed and magnitude ranges), compound two-fault scenarios
    (`compound_specs`, default one set per site per 2 `per_kind`, at least one), worn pumps - a
    kind training never holds (`degradation_specs`, 2 `per_kind` per site) - and fault-free runs."""
    compound = compound_per_site if compound_per_site is not None else max(1, per_kind // 2)
    return (scenario_specs(sites, per_kind, hours, seed, ranges=HELDOUT_RANGES, prefix="heldout",
                           fault_free_hours=fault_free_hours)
            + compound_specs(sites, compound, hours, seed, prefix="heldout-compound")
            + degradation_specs(sites, 2 * per_kind, hours, seed))


def degradation_specs(sites: list[str], per_site: int, hours: float, seed: int) -> list[RunSpec]:
    """Held-out runs of a fault kind the training set never holds: CDU pumps wearing out
    (`pump_degradation`) over 15-90 minutes — both duty pumps (cavitation, erosion) or one, some
    tripping at a remaining capacity with or without the standby taking over. A model that learned
    the physics (flow per kW falling, the settled ΔT rising) flags them; one that learned the
    training kinds' signatures may not."""
    import numpy as np

    from podwatch.site import load_site

    rng = np.random.default_rng(seed + 5_151_515)
    specs = []
    run_s = hours * 3600.0
    for site_path in sites:
        site = load_site(site_path)
        for i in range(per_site):
            cdu = site.cdus[int(rng.integers(len(site.cdus)))]
            duty = list(range(1, cdu.working_pumps + 1))
            fault = {"kind": "pump_degradation", "target": cdu.id, "pumps": duty if i % 3 != 2 else [duty[0]],
                     "onset_s": round(float(rng.uniform(0.1, 0.3) * run_s), 1),
                     "ramp_s": round(float(rng.uniform(900, 5400)), 1),
                     "magnitude": round(float(rng.uniform(0.6, 0.95)), 3)}
            if i % 2 == 1:
                fault |= {"trip_at_capacity": round(float(rng.uniform(0.2, 0.4)), 2),
                          "standby_takeover": bool(rng.random() < 0.5), "takeover_delay_s": float(rng.uniform(5, 30))}
            specs.append(RunSpec(f"heldout-{Path(site_path).stem}-pump_degradation-{i}", site_path, hours,
                                 seed + 80_000 + len(specs), faults=[fault]))
    return specs


SCENARIO_WARMUP_S = 1800.0  # history before a user scenario starts: the model's windows need it


def user_scenario_specs(paths: list[Path], sites: list[str], seed: int, hours: float | None = None) -> list[RunSpec]:
    """Runs of scenario files (`examples/scenarios/*.yaml`, or an operator's own incident
    replay) on each site: every fault shifted by `SCENARIO_WARMUP_S` of healthy operation so
    the model has the history it would have live; the run lasts the scenario's `duration_s`
    (or `hours`) after that. A scenario whose targets are not in a site is a ConfigError
    naming the file and the target."""
    from podwatch.simulators.scenario import Scenario
    from podwatch.site import load_site, read_yaml_file

    specs = []
    for path in paths:
        data = read_yaml_file(path, "scenario file")
        for site_path in sites:
            scenario = Scenario.parse(data, str(path), load_site(site_path))
            length_s = hours * 3600.0 if hours else (scenario.duration_s or 3600.0)
            faults = [dict(fault, onset_s=float(fault["onset_s"]) + SCENARIO_WARMUP_S) for fault in data["faults"]]
            name = path.stem if len(sites) == 1 else f"{path.stem}-{Path(site_path).stem}"
            specs.append(RunSpec(name=name, site_path=site_path, hours=(SCENARIO_WARMUP_S + length_s) / 3600.0,
                                 seed=seed + len(specs), faults=faults))
    return specs


def simulate_all(specs: list[RunSpec], work_dir: Path, echo) -> list[SimRun]:
    runs = []
    for spec in specs:
        t0 = time.perf_counter()
        run = simulate_run(spec, work_dir)
        echo(f"  {spec.name}: {run.features.height} feature rows, {run.breaches.height} breach(es) "
             f"({time.perf_counter() - t0:.1f} s)")
        runs.append(run)
    return runs


def train_from_runs(runs: list[SimRun], horizon_s: int, max_iter: int = 200):
    from podwatch.analytics.thermal import TrainingRun, train_thermal

    return train_thermal([TrainingRun(r.spec.name, r.features, r.breaches) for r in runs], horizon_s=horizon_s,
                         max_iter=max_iter,
                         extra_metadata={"sites": sorted({r.spec.site_path for r in runs}),
                                         "feature_step_s": FEATURE_STEP_S})


def evaluate_sim_runs(model, runs: list[SimRun]):
    from podwatch.analytics.evaluate import EvalRun, evaluate_runs

    return evaluate_runs(model, [EvalRun(r.spec.name, r.features, r.breaches, fault_free=r.spec.fault_free)
                                 for r in runs])


# --------------------------------------------------------------------------- data sources for analyze

def _read_samples(db: Path | None, history: Path | None, since_h: float | None) -> pl.DataFrame:
    if (db is None) == (history is None):
        raise PodwatchError("give exactly one of --db FILE or --history DIR|FILE")
    if history is not None:
        files = sorted(history.rglob("*.parquet")) if history.is_dir() else [history]
        files = [f for f in files if not f.name.startswith("truth_")]
        if not files:
            raise PodwatchError(f"{history}: no Parquet sample files")
        rows = pl.concat([pl.read_parquet(f, columns=["ts", "device", "metric", "value", "quality"]) for f in files],
                         how="vertical_relaxed")
    else:
        import duckdb

        if not db.exists():
            raise PodwatchError(f"{db}: no such DuckDB file")
        try:
            con = duckdb.connect(str(db), read_only=True)
        except duckdb.Error as exc:
            raise PodwatchError(f"cannot open {db} (a running `podwatch serve` holds it: use its API or "
                                f"`podwatch export` + --history): {exc}") from None
        try:
            where = f"WHERE ts >= (SELECT max(ts) FROM samples) - INTERVAL '{float(since_h) * 3600:.0f} seconds'" \
                if since_h else ""
            rows = con.sql(f"SELECT ts, device, metric, value, quality FROM samples {where}").pl()
        finally:
            con.close()
    if since_h and history is not None and not rows.is_empty():
        from datetime import timedelta

        rows = rows.filter(pl.col("ts") >= rows["ts"].max() - timedelta(hours=since_h))
    return rows


def _write_scores_db(db: Path, scores: pl.DataFrame) -> int:
    import duckdb

    from podwatch.analytics.streaming import write_risk_scores
    from podwatch.storage.schema import configure_connection, ensure_shared_tables

    try:
        con = duckdb.connect(str(db))
    except duckdb.Error as exc:
        raise PodwatchError(f"cannot open {db} for writing (is `podwatch serve` running on it?): {exc}") from None
    try:
        configure_connection(con)
        ensure_shared_tables(con)
        return write_risk_scores(con, scores)
    finally:
        con.close()


# --------------------------------------------------------------------------- commands

def register(app: typer.Typer) -> None:
    train_app = _group(app, "train", "Train models on simulated (or recorded) histories.")
    eval_app = _group(app, "eval", "Evaluate models against simulated ground truth.")

    @train_app.command("thermal")
    @user_errors
    def train_thermal_cmd(
        site: list[str] = typer.Option(list(EXAMPLE_SITES), "--site", help="Site file(s) to simulate (repeat)"),
        model_dir: Path = typer.Option(DEFAULT_MODEL_DIR, "--model-dir", help="Where the model and metadata go"),
        history: list[Path] = typer.Option([], "--history", help="Recorded history folder(s) (samples.parquet + "
                                           "truth.json) instead of simulating; uses the first --site"),
        runs_per_site: int = typer.Option(3, "--runs-per-site", min=1, help="Simulated histories per site"),
        hours: float = typer.Option(12.0, "--hours", min=0.5, help="Length of each simulated history"),
        episodes_per_day: float = typer.Option(30.0, "--episodes-per-day", min=0.0, help="Random fault episodes"),
        seed: int = typer.Option(1, "--seed"),
        horizon_s: int = typer.Option(0, "--horizon-s", min=0, help="Risk horizon (0: the site's thermal.risk_horizon_s)"),
        work_dir: Path = typer.Option(Path("build/thermal-train"), "--work-dir", help="Simulated histories go here"),
        per_kind: int = typer.Option(3, "--per-kind", min=0, help="Targeted single-fault runs per fault kind and site"),
        max_iter: int = typer.Option(200, "--max-iter", min=10, help="Boosting iterations"),
    ) -> None:
        """Train the thermal-risk model and save it with its metadata."""
        from podwatch.site import load_site

        horizon = horizon_s or load_site(site[0]).spec.thermal.risk_horizon_s
        t0 = time.perf_counter()
        if history:
            runs = [read_history_run(h, site[0]) for h in history]
        else:
            typer.echo(f"simulating {runs_per_site} x {hours:g} h per site on {', '.join(site)}")
            runs = simulate_all(training_specs(site, runs_per_site, hours, seed, episodes_per_day, per_kind=per_kind),
                                work_dir, typer.echo)
        model = train_from_runs(runs, horizon, max_iter=max_iter)
        model.save(model_dir)
        m = model.metadata
        typer.echo(f"model {model.version}: {m['rows']} rows ({m['positives']} pre-breach) from {len(runs)} runs, "
                   f"horizon {horizon} s, saved to {model_dir} ({time.perf_counter() - t0:.0f} s)")

    @app.command("analyze")
    @user_errors
    def analyze_cmd(
        site: Path = typer.Option(..., "--site", help="Site YAML file"),
        db: Path = typer.Option(None, "--db", help="podwatch DuckDB file: read samples, write risk_scores"),
        history: Path = typer.Option(None, "--history", help="Parquet samples (file or folder)"),
        write_db: Path = typer.Option(None, "--write-db", help="With --history: store risk_scores in this DuckDB file"),
        model_dir: Path = typer.Option(DEFAULT_MODEL_DIR, "--model-dir"),
        last_hours: float = typer.Option(None, "--last-hours", min=0.01, help="Only the newest hours of data"),
        all_rows: bool = typer.Option(False, "--all", help="Store a score for every feature row, not only the newest per rack"),
    ) -> None:
        """Score racks' thermal risk from stored samples and write risk_scores."""
        from podwatch.analytics.features import build_features
        from podwatch.analytics.thermal import ModelError, PhysicsRiskModel, ThermalModel
        from podwatch.site import load_site

        site_model = load_site(site)
        for path in (db, write_db):
            if path is not None:
                from podwatch.storage.topology import check_file_site

                check_file_site(path, site_model.id)
        try:
            model = ThermalModel.load(model_dir)
        except ModelError as exc:
            # the same fallback as the serve process: the physics floor alone, said out loud
            typer.echo(f"note: {exc}; scoring with the physics-only risk", err=True)
            model = PhysicsRiskModel(site_model.spec.thermal.risk_horizon_s)
        rows = _read_samples(db, history, last_hours)
        feats = build_features(rows, site_model, step_s=FEATURE_STEP_S, horizon_s=model.horizon_s)
        feats = feats.filter(pl.col("return_c").is_not_null())
        if feats.is_empty():
            raise PodwatchError("no rack coolant data to score in the given samples")
        if not all_rows:
            feats = feats.group_by("rack").agg(pl.all().sort_by("ts").last())
        scores = model.score(feats).sort("rack", "ts")
        target = db or write_db
        if target is not None:
            n = _write_scores_db(target, scores)
            typer.echo(f"wrote {n} risk score(s) to {target} (risk_scores)")
        latest = scores.group_by("rack").agg(pl.all().sort_by("ts").last()).sort("probability", descending=True)
        typer.echo(f"{'rack':<12} {'time (UTC)':<20} {'risk':>6}  {'level':<9} reasons")
        for r in latest.iter_rows(named=True):
            typer.echo(f"{r['rack']:<12} {r['ts']:%Y-%m-%d %H:%M:%S} {r['probability']:>6.0%}  {r['level']:<9} "
                       f"{'; '.join(r['reasons'])}")

    @eval_app.command("thermal")
    @user_errors
    def eval_thermal_cmd(
        site: list[str] = typer.Option(None, "--site", help="Site file(s) of the held-out scenarios "
                                       "[default: the example sites; with --scenario: examples/sites/demo.yaml]"),
        scenario: list[Path] = typer.Option(None, "--scenario", help="Evaluate on these scenario files (e.g. an "
                                            "incident replay) instead of the generated held-out set; repeatable"),
        history: list[Path] = typer.Option(None, "--history", help="Evaluate on recorded simulator histories "
                                           "(folders with samples.parquet + truth.json); repeatable"),
        model_dir: Path = typer.Option(DEFAULT_MODEL_DIR, "--model-dir"),
        per_kind: int = typer.Option(3, "--per-kind", min=1, help="Held-out scenarios per fault kind and site"),
        compound_per_site: int = typer.Option(None, "--compound-per-site", min=0,
                                              help="Sets of compound two-fault scenarios per site (default per-kind // 2, >= 1)"),
        hours: float = typer.Option(None, "--hours", min=0.5, help="Length of each held-out scenario [default: 3; "
                                    "with --scenario: the scenario's duration_s]"),
        fault_free_hours: float = typer.Option(None, "--fault-free-hours", min=0.0,
                                               help="Fault-free hours per site [default: 24; 0 with --scenario/--history]"),
        seed: int = typer.Option(424242, "--seed", help="Held-out seed (keep it away from training seeds)"),
        work_dir: Path = typer.Option(Path("build/thermal-eval"), "--work-dir"),
        json_out: Path = typer.Option(None, "--json", help="Also write the full report as JSON"),
    ) -> None:
        """Recall at >= 2 min lead, median lead, false alarms per rack-day on held-out scenarios."""
        from podwatch.analytics.thermal import ThermalModel

        own_runs = bool(scenario or history)
        if fault_free_hours is None:
            fault_free_hours = 0.0 if own_runs else 24.0
        if own_runs:
            sites = site or [EXAMPLE_SITES[0]]
            if history and len(sites) != 1:
                raise PodwatchError("--history needs exactly one --site (the site the histories were simulated on)")
            specs = user_scenario_specs(scenario or [], sites, seed, hours)
            specs += [fault_free_spec("eval", site_path, fault_free_hours, seed + 90_000 + i)
                      for i, site_path in enumerate(sites) if fault_free_hours > 0]
        else:
            sites = site or list(EXAMPLE_SITES)
            specs = heldout_specs(sites, per_kind, hours or 3.0, seed, fault_free_hours,
                                  compound_per_site=compound_per_site)
        model = ThermalModel.load(model_dir)
        runs = [read_history_run(path, sites[0]) for path in history or []]
        typer.echo(f"simulating {len(specs)} held-out runs" + (f" (+ {len(runs)} recorded)" if runs else ""))
        runs += simulate_all(specs, work_dir, typer.echo)
        report = evaluate_sim_runs(model, runs)
        typer.echo(f"model {model.version}")
        for line in report.summary_lines():
            typer.echo(line)
        if not own_runs:  # the model's stored scores describe the standard held-out set only
            model.update_scores(model_dir, {n: v for n, _, v, _, _ in report.goals()}
                                | {"median_lead_s": report.median_lead_s,
                                   "recall_predictable_at_2min": report.recall_predictable_at_2min,
                                   "recall_ceiling_at_2min": report.recall_ceiling_at_2min,
                                   "unconfirmed_alarms": report.unconfirmed_alarms,
                                   "by_kind": [asdict(k) for k in report.by_kind]})
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(report.as_dict(), indent=1, default=str))
            typer.echo(f"wrote {json_out}")
