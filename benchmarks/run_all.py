"""`make bench`: run every benchmark, collect their `BENCH` lines, write docs/performance.md.

Each benchmark runs in its own process with a time limit; one that fails is reported in the table
(with the tail of its output), not hidden. Arguments after `--` go to every benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = [  # (script, extra args, time limit s)
    ("collect_modbus.py", [], 300),
    ("produce.py", [], 300),
    ("ingest.py", ["--rounds", "3"], 1500),  # the raw reference swings ±25 % run to run: median of 3 alternating rounds
    ("simulate.py", [], 600),
    ("alert_latency.py", ["--duration", "30"], 300),
    ("forecast_eval.py", [], 1200),
    ("analytics_eval.py", [], 1500),
]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def run(script: str, args: list[str], limit: float) -> tuple[list[dict], str, str]:
    path = ROOT / "benchmarks" / script
    if not path.exists():
        return [], "missing", ""
    started = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=limit, cwd=ROOT)
        out, status = proc.stdout + proc.stderr, ("ok" if proc.returncode == 0 else f"exit {proc.returncode}")
    except subprocess.TimeoutExpired as exc:
        out, status = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""), f"timeout {limit:.0f}s"
    rows = []
    for line in out.splitlines():
        if line.startswith("BENCH "):
            try:
                rows.append(json.loads(line[6:]))
            except ValueError:
                pass
    print(f"{script}: {status} in {time.monotonic() - started:.0f} s, {len(rows)} figure(s)", flush=True)
    return rows, status, out


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only these scripts")
    parser.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    args = parser.parse_args()
    results, failures = [], []
    for script, extra, limit in BENCHES:
        if args.only and script not in args.only:
            continue
        rows, status, out = run(script, extra, limit)
        results.extend(rows)
        if status != "ok" or not rows:
            failures.append((script, status, "\n".join(out.strip().splitlines()[-15:])))
    store = Path(args.out).with_suffix(".json")
    if args.only and store.exists():  # re-running some benchmarks keeps the others' last figures
        kept = [r for r in json.loads(store.read_text()) if r["benchmark"] not in args.only]
        results = kept + results
    store.write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "# Performance",
        "",
        f"Written by `make bench` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}) on: {machine()}.",
        "Every figure is measured next to a reference in the same run, because these machines are noisy: the ratio",
        "is the figure that travels between machines. Other processes may share the machine while it runs.",
        "",
        "| benchmark | figure | value | unit | reference | reference value | ratio | goal |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | --- |",
    ]
    for r in results:
        lines.append(f"| {r['benchmark']} | {r['figure']} | {fmt(r['value'])} | {r['unit']} | {r.get('reference_label') or ''} | "
                     f"{fmt(r.get('reference'))} | {fmt(r.get('ratio'))} | {r.get('goal') or ''} |")
    notes = [r for r in results if r.get("note")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {r['figure']}: {r['note']}" for r in notes]
    if failures:
        lines += ["", "## Benchmarks that did not report", ""]
        for script, status, tail in failures:
            lines += [f"### {script}: {status}", "", "```", tail, "```", ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}: {len(results)} figures, {len(failures)} problem(s)")


if __name__ == "__main__":
    main()
