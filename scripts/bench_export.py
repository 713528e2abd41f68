"""CPU time of a guided export against a plain one of the same run (``macft export gguf --adapter RUN``).

    python scripts/bench_export.py --run runs/quickstart-20261130 --quant q4_k_m --rounds 2

Each round runs the whole export (load and fuse, importance matrix and deltas for the guided one,
plan, quantize, write; no fidelity report) once plain and once guided, interleaved, and records the
process's CPU time (every thread's), the wall time and the load average. The importance matrix is
computed before the first round (it is computed once per run and then read from the run), so the
rounds time what a user waits for on every export. On a shared machine wall time says little; the
CPU-time ratio is the figure to read, and the result is marked ``busy`` when the load average
exceeded the core count or the process got less than 80% of a core while it ran.
Results go to ``scripts/results/bench-export-<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from macft.export.pipeline import export_gguf


def timed_export(run: Path, quant: str, plain: bool, out: Path) -> dict:
    load_before = os.getloadavg()[0]
    cpu, wall = time.process_time(), time.perf_counter()
    report = export_gguf(adapter=str(run), quant=quant, out=out, plain=plain, force=True, fidelity_examples=0)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    load = max(load_before, os.getloadavg()[0])
    out.unlink()
    return {
        "cpu_seconds": round(cpu, 1),
        "wall_seconds": round(wall, 1),
        "load_average": round(load, 2),
        "busy": load > os.cpu_count() or cpu < 0.8 * wall,
        "size_bytes": report.gguf["size_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--quant", default="q4_k_m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    out = args.run / f"bench-{args.quant}.gguf"
    export_gguf(adapter=str(args.run), quant=args.quant, out=out, force=True, fidelity_examples=0)  # computes the imatrix once
    out.unlink()
    rounds = []
    for _ in range(args.rounds):
        row = {kind: timed_export(args.run, args.quant, kind == "plain", out) for kind in ("plain", "guided")}
        row["cpu_ratio"] = round(row["guided"]["cpu_seconds"] / row["plain"]["cpu_seconds"], 2)
        rounds.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "run": str(args.run),
        "quant": args.quant,
        "cpus": os.cpu_count(),
        "rounds": rounds,
        "busy": any(r[k]["busy"] for r in rounds for k in ("plain", "guided")),
    }
    name = args.name or f"{args.run.resolve().name}-{args.quant}"
    path = Path(__file__).parent / "results" / f"bench-export-{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
