"""`python -m bench [--quick] [--only 1,3]`: run the workloads, print a table, keep JSON."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import machine
from bench.workloads import WORKLOADS

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench")


def table(rows: list[dict]) -> str:
    lines = ["| workload | n | lower bound s | service s | efficiency | baseline s (done) | service/baseline | "
             "CPU ms/gen | peak RSS MB | threads | targets |", "|" + "---|" * 11]
    for r in rows:
        s, b = r.get("service", {}), r.get("baseline")
        if r["workload"].startswith("5"):
            lines.append(f"| {r['workload']} | {r['n']} | – | p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms | – | "
                         f"direct p50 {r['direct']['p50_ms']} ms, p99 {r['direct']['p99_ms']} ms | "
                         f"added p50 {r['added']['p50_ms']} ms, p99 {r['added']['p99_ms']} ms | – | – | – | "
                         f"{_targets(r)} |")
            continue
        base = f"{b['seconds']} ({b['completed']}/{b['total']})" if b else "–"
        ratio = r.get("service_over_baseline_time", "baseline incomplete" if b else "–")
        if "lean_client" in r:  # a reference, not the baseline
            lean = r["lean_client"]
            base = f"lean client {lean['seconds']} ({lean['completed']}/{lean['total']}, {lean['efficiency']})"
        lines.append(f"| {r['workload']} | {r['n']} | {r['lower_bound_s']} | {s['seconds']} ({s['completed']}) | "
                     f"{r['efficiency']} | {base} | {ratio} | {s['cpu_ms_per_generation']} | {s['peak_rss_mb']} | "
                     f"{s['peak_threads']} | {_targets(r)} |")
    return "\n".join(lines)


def _targets(row: dict) -> str:
    return "; ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in row.get("targets", {}).items())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true",
                        help="smaller runs and 10 s windows (a smoke run, not the figures)")
    parser.add_argument("--only", default=",".join(WORKLOADS), help="workloads to run, e.g. 1,3")
    args = parser.parse_args(argv)
    rows = []
    for key in args.only.split(","):
        log.info("workload %s ...", key)
        with tempfile.TemporaryDirectory() as workdir:
            rows.append(WORKLOADS[key.strip()](Path(workdir), args.quick))
        log.info("%s", json.dumps(rows[-1]))
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "quick": args.quick, "results": rows}
    RESULTS.mkdir(exist_ok=True)
    name = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + ("-quick" if args.quick else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    sys.stdout.write(f"\nMachine: {report['machine']}\n\n{table(rows)}\n\nSaved bench/results/{name}.json\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
