"""Benchmark macft's DPO against mlx-lm-lora's: same model, pairs and settings, separate processes,
interleaved rounds, on a machine checked to be quiet.

Every round runs both systems once (macft, mlx-lm-lora, macft, mlx-lm-lora, ...), each a fresh process
of its public command: ``macft lora recipes/prefer-city-dpo.yaml`` from this checkout, and
``mlx_lm_lora.train --train-mode dpo`` from its own virtual environment (``pip install mlx-lm-lora``
there, never into macft's). Both train LoRA (rank, scale, the last N blocks, every linear layer of
them, as mlx-lm-lora does) on the same float32 copy of the embedded Gemma 3 270M and the same pairs
(``recipes/data/prefer-city``), rendered through a chat template (mlx-lm-lora always renders DPO
pairs that way; macft is told to; the embedded base model has none, so the copy gets Gemma's turn
format), with the same batch of pairs, maximum length, beta and
steps, no gradient clipping and no validation until the end; mlx-lm-lora is given the OpenBLAS macft
loads (as ``scripts/bench.py`` gives mlx_lm), so the comparison is about the training code. Per run, with ``scripts/bench.py``'s
machinery:

  tokens/s     steps/s × pairs per step × the mean tokens of a pair (chosen and rejected rows,
               prompt included, as mlx-lm-lora counts them), from the wall time between the step
               reports after the first (compiling) one: one formula for both systems
  own tok/s    what each tool printed (macft: trained answer tokens; mlx-lm-lora: all tokens)
  MLX peak     mx.get_peak_memory() at exit (a probe that changes nothing else)
  RSS peak     the process's peak resident memory

mlx-lm-lora 5.10 sets MLX's wired-memory limit from ``mx.device_info()["max_recommended_working_set_size"]``,
a field only Metal reports, so on a CPU its trainer stops before the first step. Its process gets a
``sitecustomize`` that adds that one field (0: no wired memory, which is all a CPU has) and changes
nothing else: the command, its argument parsing, data loading, trainer and reference model are
mlx-lm-lora's own. It reads ``fuse: false`` from a config file (its default would fuse and save the
whole model after training); everything else comes from its command-line flags.

Speed needs a quiet machine: other processes' CPU use is sampled before and during every run, and a
busy machine's results are printed but not written unless ``--allow-busy`` (the file then says
``"busy": true``). About 8 minutes on a quiet 2-core machine with the defaults (2 rounds of 5 steps;
one round of 4 steps took 9 minutes on the loaded VM).

    python scripts/bench_dpo.py                                     # writes scripts/results/bench-dpo-gemma3-270m.json
    python scripts/bench_dpo.py --rounds 1 --steps 4 --allow-busy --out /tmp/bench-dpo.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

from bench import MACFT_STEP, PROBE, busy_processes, openblas_path, prepare_models, print_summary, run_and_write, run_command, summarise

from macft.backend import preload_environment
from macft.models.tokenizer_cache import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "recipes" / "data" / "prefer-city"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEMS = ("macft", "mlx-lm-lora")
DPO_STEP = re.compile(r"Iter (?P<step>\d+): loss (?P<loss>[\d.]+),.*?tok/s (?P<tps>[\d.]+)")
# Only for mlx-lm-lora's process (see the module docstring): the one field Metal reports and a CPU does not.
METAL_FIELD = '''
import mlx.core as _mx
_device_info = _mx.device_info
_mx.device_info = lambda: {"max_recommended_working_set_size": 0, **_device_info()}
'''


# Gemma's turn format, for a model copy without a template (see with_chat_template).
GEMMA_TURNS = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{{ message['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def macft_command(args: argparse.Namespace, model_dir: str, run_dir: Path) -> list[str]:
    command = [sys.executable, "-m", "macft.cli", "lora", str(ROOT / "recipes" / "prefer-city-dpo.yaml"),
               "--out-dir", str(run_dir.parent), "--name", run_dir.name]
    sets = {
        "model.path": model_dir, "model.dequantize": "false", "data.train": args.data, "data.max_seq_length": args.seq,
        "data.use_chat_template": "true", "train.iters": args.steps, "train.batch_size": args.batch,
        "train.learning_rate": args.lr, "train.lr_schedule": "constant", "train.warmup_steps": 0, "train.grad_clip": 0,
        "train.eval_every": 0, "train.eval_batches": 1, "train.save_every": 10**9, "train.report_every": 1,
        "method.rank": args.rank, "method.alpha": args.scale * args.rank, "method.num_layers": args.layers,
        "method.target_modules": f"[{','.join(ALL_LINEAR)}]", "align.beta": args.beta, "demo.count": 0,
    }
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    return command


def mlx_lm_lora_command(args: argparse.Namespace, model_dir: str, run_dir: Path) -> list[str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "config.yaml"
    config.write_text("fuse: false\n")
    return [
        str(Path(args.mlx_lm_lora_venv) / "bin" / "mlx_lm_lora.train"), "--config", str(config),
        "--model", model_dir, "--train", "--train-mode", "dpo", "--data", str(args.data),
        "--iters", str(args.steps), "--batch-size", str(args.batch), "--learning-rate", str(args.lr),
        "--max-seq-length", str(args.seq), "--num-layers", str(args.layers), "--beta", str(args.beta),
        "--steps-per-report", "1", "--steps-per-eval", str(10**9), "--val-batches", "1", "--save-every", str(10**9),
        "--adapter-path", str(run_dir / "adapters"), "--seed", "0",
    ]


def with_chat_template(model_dir: str) -> None:
    """Give the model copy a Gemma-style chat template where it has none (the embedded Gemma 3 270M is
    a base model): mlx-lm-lora renders every DPO pair through one, and macft is told to do the same."""
    config_path = Path(model_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if "chat_template" in config:
        return
    config_path.write_text(json.dumps(dict(config, chat_template=GEMMA_TURNS), indent=2))
    # Refill macft's tokenizer cache for the changed files, as prepare_models filled it for the old ones.
    load_tokenizer(Path(model_dir), eos_token_ids=json.loads((Path(model_dir) / "config.json").read_text()).get("eos_token_id"))


def mean_pair_tokens(model_dir: str, data: Path) -> float:
    """Mean tokens of a training pair's two rows through the chat template, as both systems render them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines() if line.strip()]

    def length(row: dict, answer: str) -> int:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[answer]}]
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))

    return statistics.mean(length(row, "chosen") + length(row, "rejected") for row in rows)


def run_all(args: argparse.Namespace, scratch: Path) -> dict:
    model_dir = prepare_models(args.model, scratch)["float32"]
    with_chat_template(model_dir)
    pair_tokens = mean_pair_tokens(model_dir, args.data)
    probes = {}
    for system in SYSTEMS:
        probes[system] = scratch / f"probe-{system}"
        probes[system].mkdir()
        (probes[system] / "sitecustomize.py").write_text(PROBE + (METAL_FIELD if system == "mlx-lm-lora" else ""))
    # mlx-lm-lora gets the OpenBLAS macft uses, so the comparison is about the training code.
    blas = preload_environment(openblas) if (openblas := openblas_path()) else {}
    before = busy_processes()
    report = {"machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores", "model": args.model,
              "date": time.strftime("%Y-%m-%d %H:%M"), "settings": {k: str(v) for k, v in vars(args).items() if k != "out"},
              "mean_pair_tokens": pair_tokens, "blas_for_mlx_lm_lora": openblas, "busy_before": before, "load_before": os.getloadavg(), "runs": []}
    for round_ in range(1, args.rounds + 1):
        for system in SYSTEMS:
            run_dir = scratch / "runs" / f"{system}-r{round_}"
            run_dir.parent.mkdir(exist_ok=True)
            if system == "macft":
                result = run_command(macft_command(args, model_dir, run_dir), {"PYTHONPATH": str(ROOT)}, MACFT_STEP, run_dir, probes[system], macft=True)
            else:
                result = run_command(mlx_lm_lora_command(args, model_dir, run_dir), blas, DPO_STEP, run_dir, probes[system], macft=False)
            if "step_seconds" in result:
                result["tokens_per_second"] = args.batch * pair_tokens / result["step_seconds"]
            report["runs"].append({"system": system, "round": round_, "result": result})
            shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items() if k not in ("steps", "load_start", "load_end")}
            print(f"  round {round_} {system}: {json.dumps(shown)[:300]}", flush=True)
    summary = summarise(report["runs"], list(SYSTEMS))
    report["summary"] = summary
    ours, theirs = summary["macft"], summary["mlx-lm-lora"]
    report["ratios"] = {
        metric: ours[metric]["median"] / theirs[metric]["median"]
        for metric in ("tokens_per_second", "mlx_peak_bytes", "rss_peak_bytes")
        if metric in ours and metric in theirs and theirs[metric]["median"]
    }
    others = [r["result"]["other_cores"] for r in report["runs"] if r["result"].get("other_cores") is not None]
    report["other_cores_max"] = max(others, default=None)
    report["busy"] = sum(p["cores"] for p in before) > args.busy_cores or any(o > args.busy_cores for o in others)
    print_summary(summary, ["mlx-lm-lora"])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlx-lm-lora-venv", type=Path, default=Path("/work/venvs/align-mlx-lm-lora"),
                        help="a virtual environment where `pip install mlx-lm-lora` put bin/mlx_lm_lora.train")
    parser.add_argument("--model", default="gemma3-270m", help="gemma3-270m, tiny-llama, or a model folder")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each system, interleaved")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=20.0, help="LoRA scale (mlx-lm-lora's default); macft's alpha is scale × rank")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--busy-cores", type=float, default=0.25,
                        help="the machine counts as busy when other processes use more cores than this during a run")
    parser.add_argument("--allow-busy", action="store_true", help="write the results even when the machine was busy")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "bench-dpo-gemma3-270m.json")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 4:
        parser.error("--rounds must be at least 1 and --steps at least 4")
    if not (args.mlx_lm_lora_venv / "bin" / "mlx_lm_lora.train").exists():
        sys.exit(f"mlx-lm-lora: no bin/mlx_lm_lora.train in {args.mlx_lm_lora_venv}; pass --mlx-lm-lora-venv")

    run_and_write(run_all, args, "macft-bench-dpo-")

if __name__ == "__main__":
    main()
