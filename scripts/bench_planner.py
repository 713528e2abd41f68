"""Measure the memory planner's predicted peak against real training steps, family by family and length by length.

For every family, a random model of the family's shape at a small size (its record's tiny config,
widened) trains a few steps of LoRA with the trainer's own compiled step (``macft.train.loop``),
loss and memory limit, at each length, with the settings the planner picks for a budget
(``macft.memory.choose_settings``: block attention, checkpointing); the table gives MLX's peak
against the prediction. Run in a fresh process per case, so no case sees another's buffers.

    python scripts/bench_planner.py                                   # every family at 512, 2048, 8192 tokens
    python scripts/bench_planner.py --families gemma3 --lengths 512,32768 --budget 2GiB
    python scripts/bench_planner.py --families qwen3_5 --config '{"linear_num_value_heads": 8, "linear_key_head_dim": 64, "linear_value_head_dim": 64}'
    python scripts/bench_planner.py --out scripts/results/planner.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def case_shape(family: str, hidden: int, layers: int, vocab: int, changes: dict | None = None):
    from macft.models.shape import shape_from_config
    from macft.models.random_init import family_config

    config = {**family_config(family, vocab, hidden=hidden, layers=layers), **(changes or {})}
    return config, shape_from_config(config)


def measure(
    family: str, hidden: int, layers: int, vocab: int, seq: int, batch: int, budget: int, steps: int,
    spec: str | None = None, num_layers: int = -1, checkpoint: bool | None = None, block: int = 0, headroom: float | None = None,
    config: dict | None = None,
) -> dict:
    """One case in this process: the planner's choice and prediction, then the measured peak. With
    ``spec`` the model is that real one; ``checkpoint`` and ``block`` (-1: fused) fix what the
    planner would otherwise choose; ``headroom`` holds MLX's limit at that multiple of the prediction
    instead of the trainer's (a limit at the prediction itself would make any prediction look right)."""
    import dataclasses

    import macft  # noqa: F401  (BLAS before MLX)
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    from macft.config import MethodConfig
    from macft.data import Batch
    from macft.memory import Freedom, Plan, backend_settings, choose_settings, step_budget
    from macft.methods import apply_method
    from macft.models.attention import enable_block_attention
    from macft.train.loop import Steps, enable_grad_checkpoint, kept_memory_limit, one_step
    from macft.models.head import auto_chunk_size
    from macft.objectives.sft import SupervisedLoss

    mx.clear_cache()
    before = mx.get_active_memory()
    if spec:  # a real model, loaded as `macft lora` loads it (float weights)
        from macft.models.shape import loaded_shape
        from macft.models.load import load_model

        loaded = load_model(spec, dequantize=True)
        model, shape = loaded.model, loaded_shape(loaded)
        vocab = shape.vocab
    else:
        config, shape = case_shape(family, hidden, layers, vocab, config)
        model_class, args_class = _get_classes(config)
        mx.random.seed(0)
        model = model_class(args_class.from_dict(config))
        weights = dict(tree_flatten(model.parameters()))
        if shape.tied_embeddings:
            weights.pop("lm_head.weight", None)
        weights = model.sanitize(weights) if hasattr(model, "sanitize") else weights
        model.load_weights(list(weights.items()))
    plan = Plan(method="lora", batch=batch, seq=seq, settings=MethodConfig(name="lora", rank=8, target_modules=TARGETS, num_layers=num_layers), **backend_settings())
    free = Freedom(checkpoint=checkpoint is None, attention=block == 0)
    if checkpoint is not None or block:
        plan = dataclasses.replace(plan, grad_checkpoint=bool(checkpoint), attention_block=block if block > 0 else None)
    choice = choose_settings(shape, plan, budget, free)
    plan = choice.plan
    model = apply_method(model, MethodConfig(name="lora", rank=8, target_modules=TARGETS, num_layers=num_layers))
    if plan.grad_checkpoint:
        enable_grad_checkpoint(model)
    if plan.attention_block:
        enable_block_attention(model, plan.attention_block)
    mx.eval(model.parameters())
    loss = SupervisedLoss(auto_chunk_size(vocab))
    trainer = Steps(model, optim.AdamW(learning_rate=1e-4), loss, grad_clip=1.0, compile=True, memory_budget=step_budget(shape, plan))
    if headroom:
        trainer.memory_budget = lambda rows, length: int(headroom * choice.estimate.total_bytes)
    tokens = mx.random.randint(0, vocab, (plan.batch, seq + 1))
    data = Batch(tokens[:, :-1], tokens[:, 1:], mx.ones((plan.batch, seq)), None, plan.batch * seq, 0.0)
    seconds = []
    with kept_memory_limit():
        for _ in range(steps):  # from the second step on, the optimizer's moments are in place
            mx.reset_peak_memory()
            start = time.perf_counter()
            one_step(trainer, iter([data]), loss, choice.accumulation)
            seconds.append(time.perf_counter() - start)
    measured = mx.get_peak_memory() - before
    predicted = choice.estimate.total_bytes
    return {
        "family": spec or family, "hidden": shape.hidden, "layers": shape.layers, "vocab": vocab, "seq": seq, "batch": batch,
        "budget": budget, "settings": {"micro_batch": plan.batch, "accumulation": choice.accumulation,
                                       "grad_checkpoint": plan.grad_checkpoint, "attention_block": plan.attention_block},
        "reasons": choice.reasons, "predicted": predicted, "measured": measured, "error": (predicted - measured) / measured,
        "step_seconds": seconds[-1],
    }


def main() -> None:
    from macft.models.random_init import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget", default="2GiB", help="the memory budget the planner chooses settings for")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model", help="a real model spec (e.g. gemma3-270m) instead of random family models")
    parser.add_argument("--num-layers", type=int, default=-1, help="LoRA on the last N layers (-1: all)")
    parser.add_argument("--checkpoint", choices=["auto", "on", "off"], default="auto", help="layer checkpointing, or the planner's choice")
    parser.add_argument("--block", type=int, default=0, help="attention block rows; 0: the planner's choice, -1: MLX's fused attention")
    parser.add_argument("--config", type=json.loads, help="config.json values over the family's (JSON), e.g. wider linear-attention heads")
    parser.add_argument("--headroom", type=float, help="hold MLX's limit at this multiple of the prediction (default: the trainer's)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case as JSON: run in this process
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(measure(**json.loads(args.case))), flush=True)
        return
    from macft.units import size_bytes

    rows = []
    print(f"{'model':<12}{'tokens':>8}{'settings':>34}{'predicted':>12}{'measured':>12}{'error':>8}{'step s':>9}")
    checkpoint = {"auto": None, "on": True, "off": False}[args.checkpoint]
    for family in [args.model] if args.model else args.families.split(","):
        for seq in map(int, args.lengths.split(",")):
            case = {"family": family, "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "seq": seq,
                    "batch": args.batch, "budget": size_bytes(args.budget), "steps": args.steps, "spec": args.model,
                    "num_layers": args.num_layers, "checkpoint": checkpoint, "block": args.block, "headroom": args.headroom, "config": args.config}
            done = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True, cwd=ROOT)
            found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if not found:
                print(f"{family:<12}{seq:>8}  failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:120]}", flush=True)
                continue
            row = json.loads(found[0][7:])
            rows.append(row)
            s = row["settings"]
            settings = f"{'ckpt' if s['grad_checkpoint'] else 'no ckpt'}, {'blocks of ' + str(s['attention_block']) if s['attention_block'] else 'fused'}, b{s['micro_batch']}x{s['accumulation']}"
            print(f"{family:<12}{seq:>8}{settings:>34}{row['predicted'] / 2**20:>10.0f}Mi{row['measured'] / 2**20:>10.0f}Mi"
                  f"{row['error']:>+8.1%}{row['step_seconds']:>9.1f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
