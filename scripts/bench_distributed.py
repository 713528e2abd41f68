"""Data-parallel training: a measurement on this machine and a projection for several Macs.

1. Measured: the same recipe and global batch trained by 1 rank with 2 BLAS threads and by 2 ranks
   (``macft lora --hosts 127.0.0.1,127.0.0.1``, ring backend over loopback) with 1 thread each.
   Each run is its own ``macft lora`` process tree; tokens/s are macft's steady-state figure (steps
   after the first). The CPU that other processes used during each run is measured (``bench.Watch``,
   from /proc/stat, not the load average, which lags a minute behind); a busy machine is reported as
   such and its numbers must not be published as speeds.
2. Computed: the bytes every rank all-reduces per optimizer step (the gradients of the trainable
   parameters, plus the loss and token count) for LoRA, QLoRA and full fine-tuning of 1B-, 8B- and
   70B-class Llama shapes, checked against the tiny model's real parameter count, and from them a
   projected speed-up for 2 and 4 Macs over Thunderbolt 5 and 10 GbE (assumptions in ASSUMED).

    python scripts/bench_distributed.py                      # both parts, 12 steps
    python scripts/bench_distributed.py --steps 30 --hidden 512 --layers 8
    python scripts/bench_distributed.py --projection-only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import Watch  # noqa: E402

# What the projection assumes (stated in the README next to its table).
ASSUMED = {
    # Effective all-reduce bandwidth per link and per-message latency: Thunderbolt 5 is 80 Gb/s per
    # direction; with JACCL (RDMA) we assume 60 Gb/s of it reaches the data. 10 GbE after TCP: 9.4 Gb/s.
    "links": {
        "Thunderbolt 5 (JACCL)": {"bytes_per_second": 60e9 / 8, "latency_s": 20e-6},
        "10 GbE (ring, TCP)": {"bytes_per_second": 9.4e9 / 8, "latency_s": 100e-6},
    },
    # Sustained bfloat16 training throughput of one Mac (about half an M4 Max GPU's peak).
    "flops_per_second": 15e12,
    "global_batch_tokens": 8 * 1024,  # e.g. batch 8 x 1024 tokens
    # Matmul FLOPs per trained token: forward 2P; backward 2P for activation gradients, plus 2P for
    # weight gradients when every weight trains. Attention scores and adapters are left out (small
    # at 1024 tokens for these sizes).
    "flops_per_param_token": {"lora": 4, "qlora": 4, "full": 6},
    "largest_mac_bytes": 512 * 1024**3,  # Mac Studio M3 Ultra
}

# Llama-shaped configurations of the three size classes (Llama 3.2 1B, 3.1 8B, 3.1 70B).
MODELS = {
    "1B": {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True, "model_type": "llama"},
    "8B": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "model_type": "llama"},
    "70B": {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 28672, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False, "model_type": "llama"},
}
SCALARS_BYTES = 2 * 4 + 4  # the step's loss and token sums (float32), and the stop flag (int32)


# ----------------------------------------------------------------------------- bytes and projection


def method_plan(method: str, ranks: int = 1):
    from macft.memory import MAC_SETTINGS, Plan

    # Adapters (LoRA, QLoRA) are float32, so are their gradients; full fine-tuning keeps bfloat16 on a Mac.
    return Plan(method=method, batch=8, seq=1024, ranks=ranks, **MAC_SETTINGS)


def gradient_bytes(shape, method: str) -> int:
    from macft.memory import trainable_params

    plan = method_plan(method)
    per_value = plan.compute_bytes if method == "full" else 4
    return trainable_params(shape, plan) * per_value + SCALARS_BYTES


def ring_allreduce_seconds(nbytes: int, ranks: int, link: dict) -> float:
    """A ring all-reduce sends and receives 2(N-1)/N of the buffer in 2(N-1) messages per rank."""
    steps = 2 * (ranks - 1)
    return steps * link["latency_s"] + steps / ranks * nbytes / link["bytes_per_second"]


def projection() -> list[dict]:
    from macft.memory import estimate, replica_bytes, trainable_params
    from macft.models.shape import shape_from_config

    rows = []
    for size, config in MODELS.items():
        shape = shape_from_config(config, name=f"Llama-class {size}")
        for method in ("lora", "qlora", "full"):
            nbytes = gradient_bytes(shape, method)
            compute = ASSUMED["flops_per_param_token"][method] * shape.params * ASSUMED["global_batch_tokens"] / ASSUMED["flops_per_second"]
            plan = method_plan(method)
            replica = replica_bytes(estimate(shape, plan, available_bytes=1 << 62).parts)
            row = {
                "model": size,
                "method": method,
                "params": shape.params,
                "trainable": trainable_params(shape, method_plan(method)),
                "allreduce_bytes": nbytes,
                "replica_bytes": replica,
                "fits_largest_mac": replica <= ASSUMED["largest_mac_bytes"] * 0.75,
                "one_mac_step_s": compute,
                "speedup": {},
            }
            for link_name, link in ASSUMED["links"].items():
                for ranks in (2, 4):
                    step = compute / ranks + ring_allreduce_seconds(nbytes, ranks, link)
                    row["speedup"][f"{link_name}, {ranks} Macs"] = compute / step
            rows.append(row)
    return rows


def human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def print_projection(rows: list[dict]) -> None:
    columns = list(rows[0]["speedup"])
    print("| model | method | all-reduced per step | one Mac, one step | " + " | ".join(columns) + " |")
    print("|---|---|---|---|" + "---|" * len(columns))
    for r in rows:
        cells = [f"{v:.2f}×" for v in r["speedup"].values()] if r["fits_largest_mac"] else ["does not fit one Mac"] * len(columns)
        print(f"| {r['model']} | {r['method']} | {human(r['allreduce_bytes'])} | {r['one_mac_step_s']:.1f} s | " + " | ".join(cells) + " |")


# ----------------------------------------------------------------------------- measurement


BUSY_CORES = 0.25  # other processes using more than this share of a core make the machine busy


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # includes the ranks mlx.launch waited for
    return usage.ru_utime + usage.ru_stime


def prepare(scratch: Path, hidden: int, layers: int, examples: int) -> Path:
    """A random Llama-shaped model, a synthetic prompt/completion dataset and a recipe; returns the recipe."""
    from macft.config import Recipe, save_recipe
    from macft.models.random_init import build_random_model

    model = build_random_model("llama", scratch / "model", hidden=hidden, layers=layers)
    data = scratch / "data"
    data.mkdir()
    rows = [{"prompt": f"Add {i} and {i * 7 % 13}:", "completion": f" {i + i * 7 % 13} is the sum of {i} and {i * 7 % 13}."} for i in range(examples)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = Recipe(name="dist-bench").replace(
        model={"path": str(model)},
        data={"train": str(data / "train.jsonl"), "max_seq_length": 64},
        method={"rank": 8, "dropout": 0.0},
        train={"batch_size": 8, "learning_rate": 1e-3, "report_every": 1, "eval_every": 0, "save_every": 1000},
        output={"runs_dir": str(scratch / "runs")},
        demo={"count": 0},
    )
    path = scratch / "recipe.yaml"
    save_recipe(recipe, path)
    return path


def measure(recipe: Path, name: str, steps: int, ranks: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "macft.cli", "lora", str(recipe), "--iters", str(steps), "--name", name, "--json"]
    if ranks > 1:
        command += ["--hosts", ",".join(["127.0.0.1"] * ranks)]
    watch, child_cpu, started = Watch(), children_cpu_seconds(), time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    wall, others = time.perf_counter() - started, watch.others_cores(children_cpu_seconds() - child_cpu)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    summary = json.loads(out.stdout[out.stdout.index("{") :])
    return {
        "name": name,
        "ranks": ranks,
        "threads_per_rank": threads,
        "tokens_per_second": summary["tokens_per_second"],
        "train_seconds": summary["train_seconds"],
        "wall_seconds": wall,
        "final_train_loss": summary["final_train_loss"],
        "fast_paths": summary["fast_paths"],
        "other_processes_cores": others,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--projection-only", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "scripts" / "results" / "dist-bench.json"))
    args = parser.parse_args()

    import macft  # noqa: F401  (OpenBLAS before MLX)
    from macft.backend import detect
    from macft.memory import trainable_params
    from macft.models.shape import shape_from_config
    from macft.methods import count_parameters

    results: dict = {"assumed": ASSUMED, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "backend": detect().describe()}}
    rows = projection()
    results["projection"] = rows
    print_projection(rows)

    if not args.projection_only:
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp)
            recipe = prepare(scratch, args.hidden, args.layers, examples=8 * (args.steps + 2))
            # The planner's count of trainable parameters against the real model's, and the bytes that follows.
            from macft.config import load_recipe
            from macft.methods import apply_method
            from macft.models.load import load_model

            loaded = load_model(str(scratch / "model"))
            config = load_recipe(recipe)
            counted, _ = count_parameters(apply_method(loaded.model, config.method, loaded.tokenizer))
            planned = trainable_params(shape_from_config(loaded.config), method_plan("lora"))
            results["tiny_model_trainable"] = {"counted": counted, "planned": planned}
            print(f"tiny model LoRA: {counted:,} trainable parameters counted, {planned:,} planned")

            runs = [measure(recipe, "1rank-2threads", args.steps, 1, 2), measure(recipe, "2ranks-1thread", args.steps, 2, 1)]
        busy = any(r["other_processes_cores"] is None or r["other_processes_cores"] > BUSY_CORES for r in runs)
        results["measured"] = {"runs": runs, "busy_machine": busy}
        for r in runs:
            others = "?" if r["other_processes_cores"] is None else f"{r['other_processes_cores']:.2f}"
            print(f"{r['name']}: {r['tokens_per_second']:.0f} tokens/s, {r['train_seconds']:.1f} s training, "
                  f"{r['wall_seconds']:.1f} s wall, final loss {r['final_train_loss']:.4f}, other processes {others} cores")
        print(f"2 ranks x 1 thread / 1 rank x 2 threads: {runs[1]['tokens_per_second'] / runs[0]['tokens_per_second']:.2f}x")
        if busy:
            print(f"WARNING: the machine was busy (other processes used over {BUSY_CORES} of a core, or it could not be "
                  "measured): these are not speeds to publish.")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
