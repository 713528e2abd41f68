"""Long sequences: macft against mlx_lm.lora, each through its own command, at 1k to 32k tokens per sequence.

Every system trains the same model (a float32 copy of Gemma 3 270M by default), on the same rows of
long text (ship's logs from scripts/make_long_context_data.py joined to fill each length), one
sequence per batch, with the same LoRA rank, scale, layers and target modules, for a few steps:

  macft          `macft lora`, its planner free to choose (and --memory-budget when given)
  mlx_lm         `mlx_lm.lora`
  mlx_lm-gc      `mlx_lm.lora` with its grad_checkpoint option

For each run: peak resident memory (VmHWM), MLX's peak (mx.get_peak_memory(), read at exit by
scripts/bench.py's probe), tokens/s of the second step (the first compiles; with --steps 1, the first
step's own report), and macft's memory plan with the planner's predicted peak. A run killed past
--rss-cap (or by the kernel) is "out of memory"; one killed past --time-cap minutes is "not
finished", with the resident peak seen until then. macft trains without a validation split (the
validation pass would add a forward pass at the same length). Runs go one at a time; memory is what
this benchmark is about, so it takes /tmp/macft-bigmem.lock itself (shared machines: one big job at
a time; do not wrap it in flock; --no-lock for a run small enough to go beside a big one).

    python scripts/bench_long.py                                          # 1k, 2k, 4k, 8k tokens; 3 systems
    python scripts/bench_long.py --lengths 4096 --systems macft --memory-budget 5GiB
    python scripts/bench_long.py --lengths 32768 --systems macft --memory-budget 16GiB --steps 1
    python scripts/bench_long.py --out scripts/results/bench-long-gemma3-270m.json
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (scripts/bench.py: models, probe, command lines, process measurement)

ROOT = Path(__file__).resolve().parent.parent
LOCK = Path("/tmp/macft-bigmem.lock")
SYSTEMS = ("macft", "mlx_lm", "mlx_lm-gc")


def long_rows(scratch: Path, length: int, rows: int) -> Path:
    """A text dataset (train and valid) whose rows each hold more than ``length`` Gemma tokens of logs;
    ``train-only/`` beside them holds the same train.jsonl alone."""
    from make_long_context_data import make_splits

    per_row = max(1, length // 2800 + 1)  # a 60-160-entry log is about 1,100-3,100 tokens
    splits = make_splits(seed=5, sizes={"train": rows * per_row, "valid": per_row}, entries=(150, 160))
    out = scratch / f"rows-{length}"
    out.mkdir(parents=True, exist_ok=True)
    for split, examples in splits.items():
        texts = [e["prompt"] + e["completion"] for e in examples]
        joined = ["\n\n".join(texts[i : i + per_row]) for i in range(0, len(texts), per_row)]
        (out / f"{split}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in joined))
    (out / "train-only").mkdir(exist_ok=True)
    (out / "train-only" / "train.jsonl").write_text((out / "train.jsonl").read_text())
    return out


def command(system: str, cfg: dict, run_dir: Path, tools: dict) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment of one run."""
    if system == "macft":
        line = bench.macft_command(dict(cfg, system="macft", grad_checkpoint=False, data=str(Path(cfg["data"]) / "train-only")), run_dir)
        # The planner chooses checkpointing and attention blocks: drop bench.py's fixed setting.
        at = line.index("train.grad_checkpoint=false")
        line[at - 1 : at + 1] = []
        if cfg["memory_budget"]:
            line += ["--memory-budget", cfg["memory_budget"]]
        return line, {"PYTHONPATH": str(ROOT)}
    from macft.backend import preload_environment

    config = bench.mlx_lm_config(dict(cfg, system="mlx_lm", grad_checkpoint=system == "mlx_lm-gc"), run_dir)
    env = preload_environment(tools["openblas"]) if tools.get("openblas") else {}
    return [tools["mlx_lm"], "--config", str(config)], env


def macft_plan(run_dir: Path) -> dict:
    """What macft's planner chose, from the run's recipe, and the peak it predicts for it."""
    path = run_dir / "recipe.yaml"
    if not path.exists():
        return {}
    from macft.config import load_recipe
    from macft.memory import estimate
    from macft.train.plan import config_shape, memory_budget, memory_plan

    recipe = load_recipe(path)
    train = recipe.train
    predicted = estimate(config_shape(recipe), memory_plan(recipe), memory_budget(recipe)).total_bytes
    return {"grad_checkpoint": train.grad_checkpoint, "attention_block": train.attention_block, "batch_size": train.batch_size,
            "grad_accumulation": train.grad_accumulation, "memory_budget": train.memory_budget, "predicted_peak_bytes": predicted}


def step_tokens_per_second(result: dict, length: int) -> float | None:
    """Tokens of one sequence over the wall time of the second step: the first also compiles, and
    mlx_lm validates before its last. With one step, the step's own report (compiling included)."""
    steps = result.get("steps") or []
    if len(steps) == 1:
        return steps[0]["own_tps"]
    if len(steps) < 2:
        return None
    return length / (steps[1]["time"] - steps[0]["time"])


def run_all(args: argparse.Namespace, scratch: Path) -> dict:
    systems = args.systems.split(",")
    tools = {"mlx_lm": str(Path(sys.executable).with_name("mlx_lm.lora")), "openblas": bench.openblas_path()}
    models = bench.prepare_models(args.model, scratch)
    probe_dir = scratch / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(bench.PROBE)
    report = {"machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores", "model": args.model,
              "date": time.strftime("%Y-%m-%d %H:%M"), "load_before": os.getloadavg(),
              "mlx_bfs_max_width": os.environ.get("MLX_BFS_MAX_WIDTH", "macft's default (backend.EVAL_ORDER_WIDTH on a CPU)"), "rss_cap": args.rss_cap, "runs": []}
    print(f"{'tokens':>7} {'system':<11}{'RSS GiB':>9}{'MLX GiB':>9}{'tok/s':>8}  plan / outcome", flush=True)
    for length in map(int, args.lengths.split(",")):
        data = long_rows(scratch, length, args.steps)
        cfg = {"model_dir": models["float32"], "data": str(data), "steps": args.steps, "batch": 1, "seq": length, "rank": args.rank,
               "scale": args.scale, "layers": args.layers, "lr": 1e-4, "memory_budget": args.memory_budget}
        if "macft" in systems:
            bench.fill_macft_caches(models["float32"], str(data))
        for system in systems:
            run_dir = scratch / "runs" / f"{system}-{length}"
            run_dir.parent.mkdir(exist_ok=True)
            line, env = command(system, cfg, run_dir, tools)
            pattern = bench.MACFT_STEP if system == "macft" else bench.MLX_LM_STEP
            with LOCK.open("w") as lock:
                if args.lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                result = bench.run_command(line, env, pattern, run_dir, probe_dir, macft=system == "macft",
                                           rss_cap=int(args.rss_cap * 2**30), time_cap=args.time_cap * 60, min_steps=args.steps)
            row = {"system": system, "tokens": length, "rss_peak_bytes": result.get("rss_peak_bytes"),
                   "mlx_peak_bytes": result.get("mlx_peak_bytes"), "tokens_per_second": None, "outcome": "ok",
                   "plan": macft_plan(run_dir) if system == "macft" else None, "wall_seconds": result["wall_seconds"],
                   "load": result["load_end"], "steps": result.get("steps")}
            if "error" in result:
                row["outcome"] = result["error"]
            else:
                row["tokens_per_second"] = step_tokens_per_second(result, length)
            report["runs"].append(row)
            if args.out:  # after every run: a long benchmark stopped midway keeps what it measured
                write(args.out, report)
            gib = lambda v: f"{v / 2**30:9.2f}" if v else f"{'-':>9}"  # noqa: E731
            tps = f"{row['tokens_per_second']:8.1f}" if row["tokens_per_second"] else f"{'-':>8}"
            print(f"{length:>7} {system:<11}{gib(row['rss_peak_bytes'])}{gib(row['mlx_peak_bytes'])}{tps}  "
                  f"{row['outcome'] if row['outcome'] != 'ok' else json.dumps(row['plan']) if row['plan'] else 'ok'}", flush=True)
    report["load_after"] = os.getloadavg()
    return report


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m", help="gemma3-270m, tiny-llama, or a model folder")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated: {', '.join(SYSTEMS)}")
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="tokens per sequence, comma-separated")
    parser.add_argument("--steps", type=int, default=3, help="steps per run (the second is timed; 1: memory only)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument("--layers", type=int, default=16, help="LoRA on the last N layers")
    parser.add_argument("--memory-budget", help="macft's --memory-budget (default: the machine's memory)")
    parser.add_argument("--rss-cap", type=float, default=20.0, help="GiB of resident memory past which a run counts as out of memory")
    parser.add_argument("--no-lock", dest="lock", action="store_false", help="run without taking the lock (a small run beside a big one)")
    parser.add_argument("--time-cap", type=float, default=60.0, help="minutes after which a run is stopped and reported as not finished")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    scratch = Path(tempfile.mkdtemp(prefix="macft-bench-long-"))
    try:
        report = run_all(args, scratch)
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        write(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
