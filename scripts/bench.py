"""Benchmark macft against mlx_lm.lora on the same model, data and settings, in the same run.

Each system trains in its own fresh process (so BLAS choice and peak memory are its own) on
../shared/data/wikisql with identical batch size, sequence length, LoRA rank/scale, layers,
learning rate and number of steps. Printed per system: trained tokens/s (steps after the first,
which compiles), MLX peak memory, process peak RSS, time to the first finished step, final loss,
and ratios against each mlx_lm.lora row. Results go to a JSON file.

Systems:
  macft          macft lora (OpenBLAS, float32 compute on CPU, chunked loss, compiled step)
  macft-qlora    the same with the base quantized to 4 bits at load
  mlx_lm         mlx_lm.lora given the same BLAS and float32 weights as macft
  mlx_lm-stock   mlx_lm.lora as a user installs it: reference BLAS, the model's own dtype

    python scripts/bench.py                                   # Gemma 3 270M, 20 steps, batch 4, seq 256
    python scripts/bench.py --model tiny-llama --steps 30
    python scripts/bench.py --scaling --systems macft,mlx_lm  # tokens/s and memory vs batch size
    python scripts/bench.py --seq-scaling --systems macft,mlx_lm --steps 3   # ... vs sequence length
    python scripts/bench.py --grad-checkpoint --systems macft,macft-qlora,mlx_lm-stock
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIKISQL = ROOT.parent / "shared" / "data" / "wikisql"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- workers (child processes)


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def summarise(reports: list[dict], started: float) -> dict:
    """Throughput over the steps after the first (compilation), from (time, step, tokens, loss) reports."""
    first, last = reports[0], reports[-1]
    steady_tokens = last["tokens"] - first["tokens"]
    steady_seconds = last["train_seconds"] - first["train_seconds"]
    return {
        "tokens_per_second": steady_tokens / steady_seconds if steady_seconds > 0 else float("nan"),
        "time_to_first_step_s": first["wall"] - started,
        "final_loss": last["loss"],
        "steps": last["step"],
    }


def worker_macft(cfg: dict, started: float) -> dict:
    import macft  # noqa: F401  (OpenBLAS before mlx)
    import mlx.core as mx

    from macft.config import load_recipe
    from macft.train.loop import Callback
    from macft.train.run import run_training

    overrides = [
        f"model.path={cfg['model_dir']}",
        f"data.train={cfg['data']}",
        f"data.max_seq_length={cfg['seq']}",
        f"data.packing={str(cfg.get('packing', False)).lower()}",
        "data.mask_prompt=false",
        f"method.rank={cfg['rank']}",
        f"method.alpha={cfg['scale'] * cfg['rank']}",
        f"method.num_layers={cfg['layers']}",
        f"method.target_modules=[{','.join(ALL_LINEAR)}]",
        f"train.iters={cfg['steps']}",
        f"train.batch_size={cfg['batch']}",
        f"train.learning_rate={cfg['lr']}",
        "train.lr_schedule=constant",
        "train.grad_clip=0",
        "train.eval_every=0",
        "train.eval_batches=1",
        f"train.save_every={10**9}",
        "train.report_every=1",
        f"output.runs_dir={cfg['scratch']}",
        f"output.name={cfg['system']}-b{cfg['batch']}-s{cfg['seq']}",
        "demo.count=0",
        f"train.grad_checkpoint={str(cfg.get('grad_checkpoint', False)).lower()}",
    ]
    if cfg.get("quantize_bits"):
        overrides.append(f"model.quantize_bits={cfg['quantize_bits']}")
    reports: list[dict] = []
    totals = {"tokens": 0, "seconds": 0.0}

    class Recorder(Callback):
        def on_train_report(self, info: dict) -> None:
            # Step time only (validation and checkpoints excluded), as mlx_lm reports it.
            totals["seconds"] += (info["tokens"] - totals["tokens"]) / info["tokens_per_second"]
            totals["tokens"] = info["tokens"]
            reports.append(
                {"wall": time.perf_counter(), "step": info["step"], "tokens": info["tokens"],
                 "loss": info["train_loss"], "train_seconds": totals["seconds"]}
            )

    mx.reset_peak_memory()
    outcome = run_training(load_recipe(None, overrides), Recorder())
    result = summarise(reports, started)
    result["peak_memory_bytes"] = int(mx.get_peak_memory())
    result["fast_paths"] = outcome.summary.fast_paths
    return result


def worker_mlx_lm(cfg: dict, started: float) -> dict:
    if cfg["blas"] == "openblas":
        import macft  # noqa: F401  (gives mlx_lm the same OpenBLAS that macft uses)
    import mlx.core as mx
    from mlx_lm import lora
    from mlx_lm.tuner.callbacks import TrainingCallback

    args = dict(lora.CONFIG_DEFAULTS)
    args.update(
        model=cfg["model_dir"],
        train=True,
        data=cfg["data"],
        iters=cfg["steps"],
        batch_size=cfg["batch"],
        max_seq_length=cfg["seq"],
        num_layers=cfg["layers"],
        lora_parameters={"rank": cfg["rank"], "scale": cfg["scale"], "dropout": 0.0},
        learning_rate=cfg["lr"],
        steps_per_report=1,
        steps_per_eval=10**9,
        val_batches=1,
        save_every=10**9,
        adapter_path=str(Path(cfg["scratch"]) / "mlx_lm"),
        seed=0,
        grad_checkpoint=cfg.get("grad_checkpoint", False),
    )
    reports: list[dict] = []
    totals = {"tokens": 0, "seconds": 0.0}

    class Recorder(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            totals["tokens"] = info["trained_tokens"]
            totals["seconds"] += 1.0 / info["iterations_per_second"]
            reports.append(
                {"wall": time.perf_counter(), "step": info["iteration"], "tokens": totals["tokens"],
                 "loss": info["train_loss"], "train_seconds": totals["seconds"]}
            )

    import types

    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load

    # mlx_lm.lora.run() drops a callback passed to it, so this is its body with ours kept.
    args = types.SimpleNamespace(**args)
    mx.reset_peak_memory()
    model, tokenizer = load(args.model)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    lora.train_model(args, model, train_set, valid_set, Recorder())
    result = summarise(reports, started)
    result["peak_memory_bytes"] = int(mx.get_peak_memory())
    return result


def run_worker(system: str, cfg: dict) -> None:
    started = time.perf_counter() - float(os.environ.get("BENCH_SPAWN_SECONDS", "0"))
    result = worker_macft(cfg, started) if system.startswith("macft") else worker_mlx_lm(cfg, started)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print("BENCH_RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent


def prepare_models(name: str, scratch: Path) -> dict[str, str]:
    """Model directories: the model as a user has it, and a float32 copy for the same-dtype runs."""
    import macft  # noqa: F401
    import mlx.core as mx

    from macft.models.load import resolve_model_dir
    from macft.models.random_init import build_random_model

    if name == "tiny-llama":
        native = build_random_model("llama", scratch / "tiny-llama", hidden=256, layers=4, dtype="bfloat16")
    elif Path(name).is_dir():
        native = Path(name)
    else:
        native, _ = resolve_model_dir(name, dequantize=True)
    fp32 = scratch / "model-fp32"
    if not fp32.exists():
        fp32.mkdir(parents=True)
        for item in native.iterdir():
            if item.suffix == ".safetensors":
                weights = mx.load(str(item))
                mx.save_safetensors(str(fp32 / item.name), {k: v.astype(mx.float32) for k, v in weights.items()})
            elif item.is_file() and not item.name.startswith("."):
                (fp32 / item.name).write_bytes(item.read_bytes())
    return {"native": str(native), "float32": str(fp32)}


def joined_rows(source: Path, per_row: int, out: Path) -> Path:
    """A copy of a text dataset (train and valid) whose rows each join ``per_row`` consecutive rows."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        texts = [json.loads(line)["text"] for line in (source / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        rows = ["\n\n".join(texts[i : i + per_row]) for i in range(0, len(texts), per_row)]
        (out / f"{split}.jsonl").write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    return out


def spawn(system: str, cfg: dict) -> dict:
    env = dict(os.environ)
    if system == "mlx_lm-stock":
        env["MACFT_OPENBLAS"] = "0"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", system, "--worker-config", json.dumps(cfg)],
        capture_output=True, text=True, env=env,
    )
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT "):])
            result["wall_seconds"] = wall
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": " | ".join(tail)}


def system_config(system: str, base: dict, models: dict) -> dict:
    cfg = dict(base, system=system)
    cfg["model_dir"] = models["native"] if system == "mlx_lm-stock" else models["float32"]
    cfg["blas"] = "reference" if system == "mlx_lm-stock" else "openblas"
    if system == "mlx_lm-stock":
        cfg["steps"] = min(cfg["steps"], cfg.pop("stock_steps"))  # ~2 tokens/s: a few steps measure it
    cfg.pop("stock_steps", None)
    if system == "macft-qlora":
        cfg["quantize_bits"] = 4
    if system == "macft-packed":
        cfg["packing"] = True
    return cfg


def gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def print_table(rows: list[dict], reference_names: list[str]) -> None:
    header = f"{'system':<14}{'tok/s':>9}{'MLX peak GiB':>14}{'RSS GiB':>9}{'1st step s':>11}{'loss':>8}"
    print(header)
    for row in rows:
        r = row["result"]
        if "error" in r:
            print(f"{row['system']:<14} failed: {r['error']}")
            continue
        print(
            f"{row['system']:<14}{r['tokens_per_second']:>9.1f}{gib(r['peak_memory_bytes']):>14}"
            f"{gib(r['peak_rss_bytes']):>9}{r['time_to_first_step_s']:>11.1f}{r['final_loss']:>8.3f}"
        )
    for reference in reference_names:
        ref = next((row["result"] for row in rows if row["system"] == reference and "error" not in row["result"]), None)
        if ref is None:
            continue
        for row in rows:
            r = row["result"]
            if row["system"].startswith("macft") and "error" not in r:
                print(
                    f"  {row['system']} vs {reference}: {r['tokens_per_second'] / ref['tokens_per_second']:.2f}x tokens/s, "
                    f"{r['peak_memory_bytes'] / ref['peak_memory_bytes']:.2f}x MLX peak memory, "
                    f"{r['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}x RSS"
                )


def run_all(args: argparse.Namespace, scratch: Path) -> dict:
    """Every setting × system, each system in its own process; the report to write."""
    models = prepare_models(args.model, scratch)
    systems = args.systems.split(",")
    base = {"data": str(args.data), "steps": args.steps, "batch": args.batch, "seq": args.seq, "rank": args.rank,
            "scale": args.scale, "layers": args.layers, "lr": args.lr, "scratch": str(scratch),
            "stock_steps": args.stock_steps, "grad_checkpoint": args.grad_checkpoint}
    settings = [] if args.seq_scaling else [dict(base)]
    if args.scaling:
        settings += [dict(base, batch=b) for b in (2, 8) if b != args.batch]
    if args.seq_scaling:
        # WikiSQL rows are 58-210 tokens long, so a longer maximum alone changes nothing: each
        # row here joins enough consecutive examples to fill about that many tokens.
        for seq in (256, 512, 1024):
            data = joined_rows(args.data, max(1, seq // 100), scratch / f"rows-{seq}")
            settings.append(dict(base, seq=seq, batch=1, data=str(data)))

    report = {"machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores", "model": args.model,
              "date": time.strftime("%Y-%m-%d"), "runs": []}
    for setting in settings:
        print(f"\n== {args.model}: batch {setting['batch']}, seq {setting['seq']}, rank {setting['rank']}, "
              f"{setting['layers']} layers, {setting['steps']} steps" + (", gradient checkpointing" if args.grad_checkpoint else ""))
        rows = []
        for system in systems:
            result = spawn(system, system_config(system, setting, models))
            rows.append({"system": system, "result": result})
            print(f"  {system}: {json.dumps(result)[:160]}", flush=True)
        print_table(rows, [s for s in ("mlx_lm", "mlx_lm-stock") if s in systems])
        report["runs"].append({"settings": {k: v for k, v in setting.items() if k != "scratch"}, "rows": rows})
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m", help="gemma3-270m, tiny-llama, or a model folder")
    parser.add_argument("--systems", default="macft,macft-qlora,mlx_lm,mlx_lm-stock")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--stock-steps", type=int, default=3, help="steps for mlx_lm-stock, which is ~10x slower")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--data", type=Path, default=WIKISQL)
    parser.add_argument("--grad-checkpoint", action="store_true", help="recompute each layer in the backward pass (all systems)")
    parser.add_argument("--scaling", action="store_true", help="also sweep the batch size (2/4/8)")
    parser.add_argument(
        "--seq-scaling", action="store_true",
        help="instead sweep the maximum length (256/512/1024, batch 1) over rows of joined examples that fill it",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "bench.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args.worker, json.loads(args.worker_config))

    scratch = Path(tempfile.mkdtemp(prefix="macft-bench-"))
    try:
        report = run_all(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # a float32 copy of the model lives there
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
