"""Benchmark macft's DPO against mlx-lm-lora's on the same model, data and settings, in the same run.

Each system trains in its own process, one after the other: macft (`macft lora` with
``train.objective: dpo``) from this checkout, and mlx-lm-lora's ``mlx_lm_lora.train --train-mode dpo``
from its own virtual environment (``pip install mlx-lm-lora`` there, never into macft's). Same base
(the embedded Gemma 3 270M, float weights), same pairs (``recipes/data/prefer-city``), batch size,
maximum length, LoRA rank and layers, learning rate, beta and number of steps. Per system: optimizer
steps/s over the steps after the first (compiling) one, which compares the same batches; tokens/s as
each system counts them (macft: trained answer tokens; mlx-lm-lora: prompt and answer tokens of both
sides); its reported MLX peak memory; and the process's peak RSS (``/usr/bin/time``).

Speed numbers need a quiet machine: the script records the load average before and after each run
and marks the report ``"busy": true`` when the machine was busier than half its cores; busy numbers
are for checking the script, not for publishing.

    python scripts/bench_dpo.py --mlx-lm-lora-python /work/venvs/align-mlx-lm-lora/bin/python --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import prepare_models

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "recipes" / "data" / "prefer-city"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# mlx-lm-lora sets MLX's wired limit from a Metal-only device field; off a Mac that field is missing,
# so its trainer stops before the first step. The launcher supplies it (0: no wired memory) and runs
# the trainer's own main() unchanged.
LAUNCH_MLX_LM_LORA = (
    "import sys, mlx.core as mx; info = mx.device_info; "
    "mx.device_info = lambda: {'max_recommended_working_set_size': 0, **info()}; "
    "from mlx_lm_lora.train import main; sys.argv[0] = 'mlx_lm_lora.train'; main()"
)


def busy(load: float) -> bool:
    return load > 0.5 * (os.cpu_count() or 1)


def timed(command: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, int, float, float]:
    """(finished process, its peak RSS in bytes, seconds, 1-minute load average while it ran)."""
    loads = [os.getloadavg()[0]]
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", *command], capture_output=True, text=True, env=env)
    loads.append(os.getloadavg()[0])
    match = re.search(r"MAXRSS_KB (\d+)", proc.stderr)
    return proc, int(match.group(1)) * 1024 if match else 0, time.perf_counter() - started, max(loads)


def blas_path() -> str | None:
    from macft.backend import load_openblas

    return load_openblas()


def run_macft(args: argparse.Namespace, model_dir: str, scratch: Path) -> dict:
    overrides = [
        f"model.path={model_dir}", "model.dequantize=false", f"data.train={args.data}", f"data.max_seq_length={args.seq}",
        f"train.iters={args.steps}", f"train.batch_size={args.batch}", f"train.learning_rate={args.lr}",
        "train.eval_every=0", "train.save_every=0", "train.report_every=1", f"method.rank={args.rank}",
        f"method.num_layers={args.layers}", f"align.beta={args.beta}", "demo.count=0", "train.warmup_steps=0",
        "train.lr_schedule=constant",
    ]
    command = [sys.executable, "-m", "macft.cli", "lora", str(ROOT / "recipes" / "prefer-city-dpo.yaml"), "--json",
               "--out-dir", str(scratch / "runs"), "--name", "macft"]
    for item in overrides:
        command += ["--set", item]
    proc, rss, seconds, load = timed(command, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:], "load": load}
    # macft counts trained (answer) tokens; steps/s compares the same batches whatever is counted.
    tokens_per_step = summary["tokens_seen"] / summary["steps"]
    return {"steps_per_second": summary["tokens_per_second"] / tokens_per_step, "tokens_per_second": summary["tokens_per_second"],
            "peak_memory_bytes": summary["peak_memory_bytes"], "peak_rss_bytes": rss, "wall_seconds": seconds,
            "final_loss": summary["final_train_loss"], "load": load}


def run_mlx_lm_lora(args: argparse.Namespace, model_dir: str, scratch: Path) -> dict:
    command = [
        args.mlx_lm_lora_python, "-c", LAUNCH_MLX_LM_LORA, "--model", model_dir, "--train", "--train-mode", "dpo", "--data", str(args.data),
        "--iters", str(args.steps), "--batch-size", str(args.batch), "--learning-rate", str(args.lr),
        "--max-seq-length", str(args.seq), "--num-layers", str(args.layers), "--beta", str(args.beta),
        "--steps-per-report", "1", "--steps-per-eval", str(args.steps * 10), "--val-batches", "1",
        "--adapter-path", str(scratch / "mlx-lm-lora-adapters"),
    ]
    env = dict(os.environ)
    if blas_path():  # the same BLAS as macft, so the comparison is about the training code
        env["LD_PRELOAD"] = blas_path()
    proc, rss, seconds, load = timed(command, env=env)
    out = proc.stdout + proc.stderr
    reports = re.findall(r"Iter \d+: loss ([\d.]+),.*?it/s ([\d.]+), tok/s ([\d.]+), peak_mem ([\d.]+)GB", out)
    if proc.returncode != 0 or not reports:
        return {"error": out.strip().splitlines()[-3:], "load": load}
    steady = reports[1:] or reports  # the first report includes compilation
    return {
        "steps_per_second": sum(float(r[1]) for r in steady) / len(steady),
        "tokens_per_second": sum(float(r[2]) for r in steady) / len(steady),  # its count: prompt and answer tokens of both sides
        "peak_memory_bytes": int(max(float(r[3]) for r in reports) * 1e9),
        "peak_rss_bytes": rss,
        "wall_seconds": seconds,
        "final_loss": float(reports[-1][0]),
        "load": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlx-lm-lora-python", default="/work/venvs/align-mlx-lm-lora/bin/python",
                        help="the python of a virtual environment with mlx-lm-lora installed")
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "bench-dpo.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="macft-bench-dpo-") as tmp:
        scratch = Path(tmp)
        model_dir = prepare_models(args.model, scratch)["float32"]
        rows = {"macft": run_macft(args, model_dir, scratch), "mlx-lm-lora": run_mlx_lm_lora(args, model_dir, scratch)}
    loaded = any(busy(r["load"]) for r in rows.values())
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "busy": loaded, "blas": blas_path(),
              "settings": {k: str(v) for k, v in vars(args).items() if k != "out"}, "rows": rows}
    ours, theirs = rows["macft"], rows["mlx-lm-lora"]
    if "error" not in ours and "error" not in theirs:
        report["steps_per_second_ratio"] = ours["steps_per_second"] / theirs["steps_per_second"]
        report["peak_memory_ratio"] = ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]
        report["peak_rss_ratio"] = ours["peak_rss_bytes"] / theirs["peak_rss_bytes"]
    print(json.dumps(report, indent=2))
    if loaded:
        print(f"The machine was busy (1-minute load up to {max(r['load'] for r in rows.values()):.1f} on "
              f"{os.cpu_count()} cores): these speeds are not fit to publish.", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
