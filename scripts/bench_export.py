"""CPU time of a guided export against a plain one of the same run (``macft export gguf --adapter RUN``).

    python scripts/bench_export.py --run runs/quickstart-20261130 --quant q4_k_m --rounds 2

Each round runs the whole export (load and fuse, importance matrix and deltas for the guided one,
plan, quantize, write; no fidelity report) once plain and once guided, interleaved, and records the
process's CPU time (every thread's), the wall time, and the cores other processes used meanwhile
(``bench.Watch``, from /proc/stat). The importance matrix is
computed before the first round (it is computed once per run and then read from the run), so the
rounds time what a user waits for on every export. On a shared machine wall time says little; the
CPU-time ratio is the figure to read, and an export is marked ``busy`` when other processes used
more than ``--busy-cores`` cores while it ran.
Results go to ``scripts/results/bench-export-<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench import Watch

from macft.export.pipeline import export_gguf


def timed_export(run: Path, quant: str, plain: bool, out: Path, busy_cores: float) -> dict:
    watch = Watch()
    report = export_gguf(adapter=str(run), quant=quant, out=out, plain=plain, force=True, fidelity_examples=0)
    cpu, wall = time.process_time() - watch.self_start, time.perf_counter() - watch.started
    others = watch.others_cores(0.0)  # the export runs in this process: its CPU time is ours
    out.unlink()
    return {
        "cpu_seconds": round(cpu, 1),
        "wall_seconds": round(wall, 1),
        "other_cores": None if others is None else round(others, 2),
        "load_before": round(watch.load_start[0], 2),
        "busy": others is None or others > busy_cores,
        "size_bytes": report.gguf["size_bytes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--quant", default="q4_k_m")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--name", default=None)
    parser.add_argument("--busy-cores", type=float, default=0.25, help="busy when other processes use more cores than this")
    args = parser.parse_args()
    out = args.run / f"bench-{args.quant}.gguf"
    export_gguf(adapter=str(args.run), quant=args.quant, out=out, force=True, fidelity_examples=0)  # computes the imatrix once
    out.unlink()
    rounds = []
    for _ in range(args.rounds):
        row = {kind: timed_export(args.run, args.quant, kind == "plain", out, args.busy_cores) for kind in ("plain", "guided")}
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
