"""Peak-forecast backtest: rolling origin over >= 60 simulated days of the demo site.

Generates a simulator history (`podwatch.simulators.history.generate_history`, 5-minute
resolution, no fault scenarios) unless --history points at one, builds every node's design load,
and runs the rolling-origin backtest of `podwatch.analytics.backtest` for the 24 h and 7 day peak
horizons. The reference, scored in the same run on the same (origin, node) pairs, is seasonal
naive with each node's own empirical residual quantiles (the standard, stronger variant); the
variant with residual quantiles pooled over all nodes (the baseline before 2026-11-22) is printed
beside it.

Goals (issue 5): P95 pinball loss >= 25 % better than seasonal naive; P95 coverage 93-97 %.

    .venv/bin/python benchmarks/forecast_eval.py                 # 70 simulated days
    .venv/bin/python benchmarks/forecast_eval.py --days 90 --out /tmp/forecast-eval
    .venv/bin/python benchmarks/forecast_eval.py --synthetic     # built-in synthetic load instead
"""

from __future__ import annotations

import sys as _sys
_sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent))
from _report import record  # noqa: E402

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", default=str(ROOT / "examples" / "sites" / "demo.yaml"))
    parser.add_argument("--days", type=float, default=70.0, help="simulated days (>= 60)")
    parser.add_argument("--resolution-s", type=int, default=300)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--history", help="use this Parquet history folder instead of simulating")
    parser.add_argument("--synthetic", action="store_true", help="built-in synthetic load instead of the simulator")
    parser.add_argument("--calibration", choices=("cqr", "median"), default="cqr")
    parser.add_argument("--out", help="write the backtest figures here")
    args = parser.parse_args()

    from podwatch.analytics.backtest import backtest_figures, rolling_origin_backtest, synthetic_history
    from podwatch.analytics.forecast import ForecastConfig
    from podwatch.analytics.load import load_from_source, node_loads
    from podwatch.site import load_site

    site = load_site(args.site)
    started = time.perf_counter()
    if args.synthetic:
        source = f"built-in synthetic load, {args.days:g} days at {args.resolution_s} s"
        load = node_loads(site, synthetic_history(site, args.days, args.resolution_s, seed=args.seed), args.resolution_s)
    else:
        folder = args.history
        if folder is None:
            from podwatch.simulators.history import generate_history

            folder = tempfile.mkdtemp(prefix="forecast-eval-")
            result = generate_history(site, args.days, args.resolution_s, seed=args.seed, out_dir=folder)
            source = (f"simulator history, {args.days:g} days at {args.resolution_s} s, seed {args.seed} "
                      f"({result.rows:,} samples in {result.seconds:.1f} s)")
        else:
            source = f"history {folder}"
        load = load_from_source(site, history=folder, bucket_s=args.resolution_s)
    prepared = time.perf_counter()
    hourly = load.hourly_peaks()
    result = rolling_origin_backtest(hourly, site.spec.site.timezone, ForecastConfig(calibration=args.calibration),
                                     node_info=load.node_info())
    done = time.perf_counter()

    print(f"site {site.id}: {len(load.nodes)} load series (power nodes incl. rack feeds, CDUs); {source}")
    print(f"data prepared in {prepared - started:.1f} s; backtest (refit weekly) in {done - prepared:.1f} s")
    for line in result.summary_lines():
        print(line)
    print()
    print(f"{'horizon':<8} {'P95 pinball model':>18} {'naive/node':>11} {'better by':>10} {'naive/pooled':>13} "
          f"{'better by':>10} {'goal':>7}   {'P95 coverage model':>19} {'naive/node':>11} {'goal':>9}")
    met: dict[str, tuple[bool, bool]] = {}
    for horizon, s in result.scores.items():
        better = s.improvement(0.95) * 100
        better_pooled = s.improvement_pooled(0.95) * 100
        cov = s.coverage_model[0.95] * 100
        print(f"{horizon:<8} {s.pinball_model[0.95]:>18.5f} {s.pinball_naive[0.95]:>11.5f} {better:>9.1f}% "
              f"{s.pinball_naive_pooled[0.95]:>13.5f} {better_pooled:>9.1f}% {'>=25%':>7}   "
              f"{cov:>18.1f}% {s.coverage_naive[0.95] * 100:>10.1f}% {'93-97%':>9}")
        calibrated = 93.0 <= cov <= 97.0
        met[horizon] = (better >= 25.0 and calibrated, better_pooled >= 25.0 and calibrated)
        record(f"{horizon} peak forecast: P95 pinball loss", s.pinball_model[0.95], "kW-scaled", reference=s.pinball_naive[0.95],
               reference_label="seasonal-naive (per-node residual quantiles), same backtest",
               goal="<= 0.75 x naive (25 % better)", higher_is_better=False)
        record(f"{horizon} peak forecast: P95 pinball loss vs pooled naive", s.pinball_model[0.95], "kW-scaled",
               reference=s.pinball_naive_pooled[0.95], reference_label="seasonal-naive (pooled residual quantiles), same backtest",
               goal="<= 0.75 x naive (25 % better)", higher_is_better=False)
        record(f"{horizon} peak forecast: P95 interval coverage", cov, "%", reference=s.coverage_naive[0.95] * 100,
               reference_label="seasonal-naive coverage", goal="93-97 %")
    if args.out:
        for path in backtest_figures(result, args.out):
            print(f"wrote {path}")
    for horizon, (vs_node, vs_pooled) in met.items():
        print(f"{horizon} goals: {'met' if vs_node else 'NOT met'} against the per-node naive, "
              f"{'met' if vs_pooled else 'NOT met'} against the pooled naive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
