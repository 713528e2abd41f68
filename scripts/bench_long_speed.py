"""Speed at long sequences: tokens/s at 8,192 tokens beside 512, attention's share of a step, and what
layer checkpointing costs.

In one process, on Gemma 3 270M in float32 with LoRA (rank 8, every linear layer of the last 16
blocks) and the trainer's own compiled step, loss and memory limit:

  tokens/s       a step at each length with the settings the planner picks for --memory-budget
                 (the second of two steps is timed; the first compiles), in wall and CPU seconds
  attention      the same step's attention alone: block attention's forward and backward pass on
                 q, k, v of each layer's shape (the sliding-window layers see their window), plus the
                 forward pass again where layers are checkpointed; its share of the step's CPU time
  checkpointing  a step at --checkpoint-length with and without layer checkpointing (block
                 attention in both): the extra time checkpointing costs

CPU seconds (``time.process_time``) are the steadier figure on a shared machine; wall seconds are
what a user waits.

    python scripts/bench_long_speed.py
    python scripts/bench_long_speed.py --lengths 512,8192 --checkpoint-length 4096 --out scripts/results/bench-long-speed.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--lengths", default="512,8192")
    parser.add_argument("--checkpoint-length", type=int, default=4096)
    parser.add_argument("--memory-budget", default="16GiB")
    parser.add_argument("--layers", type=int, default=16, help="LoRA on the last N layers")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import macft  # noqa: F401  (BLAS before MLX)
    import mlx.core as mx
    import mlx.optimizers as optim

    from macft.config import MethodConfig
    from macft.units import size_bytes
    from macft.data import Batch
    from macft.memory import Freedom, Plan, backend_settings, choose_settings, step_budget
    from macft.models.shape import loaded_shape
    from macft.methods import apply_method
    from macft.models.attention import BlockMask, block_attention, enable_block_attention
    from macft.models.load import load_model
    from macft.train.loop import Steps, enable_grad_checkpoint, kept_memory_limit, one_step
    from macft.models.head import auto_chunk_size
    from macft.objectives.sft import SupervisedLoss

    loaded = load_model(args.model, dequantize=True)
    shape = loaded_shape(loaded)
    config = {**loaded.config, **loaded.config.get("text_config", {})}
    window, pattern = config.get("sliding_window"), config.get("sliding_window_pattern", 1)
    globals_ = shape.layers // pattern if window else shape.layers
    budget = size_bytes(args.memory_budget)
    model = apply_method(loaded.model, MethodConfig(rank=8, alpha=16, num_layers=args.layers, target_modules=TARGETS))
    loss = SupervisedLoss(auto_chunk_size(shape.vocab))
    rng = mx.random.key(0)

    def step_seconds(plan: Plan) -> tuple[float, float]:
        """The second of two steps of ``plan`` (the first compiles), on this model with its settings."""
        for layer in model.layers:  # undo an earlier case's checkpointing
            if type(layer).__name__.startswith("Checkpointed"):
                layer.__class__ = type(layer).__mro__[1]
        if plan.grad_checkpoint:
            enable_grad_checkpoint(model)
        if plan.attention_block:  # otherwise MLX's fused attention (lengths run shortest first)
            enable_block_attention(model, plan.attention_block)
        steps = Steps(model, optim.AdamW(learning_rate=1e-4), loss, grad_clip=1.0, compile=True, memory_budget=step_budget(shape, plan, cap=budget))
        tokens = mx.random.randint(0, shape.vocab, (1, plan.seq + 1), key=rng)
        batch = Batch(tokens[:, :-1], tokens[:, 1:], mx.ones((1, plan.seq)), None, plan.seq, 0.0)
        with kept_memory_limit():
            one_step(steps, iter([batch]), loss, 1)
            return timed(lambda: one_step(steps, iter([batch]), loss, 1))

    def attention_seconds(plan: Plan) -> float:
        """CPU seconds of the step's attention alone: every layer's forward and backward pass."""
        rows = plan.attention_block or plan.seq
        q, k, v = (mx.random.normal((1, h, plan.seq, shape.head_dim), key=rng) for h in (shape.heads, shape.kv_heads, shape.kv_heads))
        mx.eval(q, k, v)
        total = 0.0
        for kind, count in (("global", globals_), ("sliding", shape.layers - globals_)):
            if not count:
                continue
            mask = BlockMask(rows, None if kind == "global" else window)
            grad = mx.compile(mx.grad(lambda q, k, v: block_attention(q, k, v, 0.0625, mask).sum(), argnums=(0, 1, 2)))
            forward = mx.compile(lambda q, k, v: block_attention(q, k, v, 0.0625, mask))
            mx.eval(grad(q, k, v))
            each = timed(lambda: mx.eval(grad(q, k, v)))[1]
            if plan.grad_checkpoint:  # checkpointed layers run their forward pass once more
                mx.eval(forward(q, k, v))
                each += timed(lambda: mx.eval(forward(q, k, v)))[1]
            total += count * each
        return total

    report = {"model": args.model, "date": time.strftime("%Y-%m-%d %H:%M"), "budget": args.memory_budget, "lengths": [], "checkpointing": None}
    base = Plan(method="lora", batch=1, settings=MethodConfig(rank=8, alpha=16, num_layers=args.layers, target_modules=TARGETS), **backend_settings())
    for length in map(int, args.lengths.split(",")):
        plan = choose_settings(shape, dataclasses.replace(base, seq=length), budget).plan
        wall, cpu = step_seconds(plan)
        attention = attention_seconds(plan)
        row = {"tokens": length, "grad_checkpoint": plan.grad_checkpoint, "attention_block": plan.attention_block,
               "step_wall_s": wall, "step_cpu_s": cpu, "tokens_per_second": length / wall, "tokens_per_cpu_second": length / cpu,
               "attention_cpu_s": attention, "attention_share": attention / cpu}
        report["lengths"].append(row)
        print(f"{length:>6} tokens: {row['tokens_per_second']:.1f} tok/s ({wall:.0f} s wall, {cpu:.0f} s CPU); "
              f"attention {attention:.0f} s CPU = {row['attention_share']:.0%} of the step"
              f"{'; checkpointed' if plan.grad_checkpoint else ''}, blocks of {plan.attention_block or length}", flush=True)
    if args.checkpoint_length:
        plan = choose_settings(shape, dataclasses.replace(base, seq=args.checkpoint_length), budget, Freedom(checkpoint=False)).plan
        plain = step_seconds(dataclasses.replace(plan, grad_checkpoint=False))
        checkpointed = step_seconds(dataclasses.replace(plan, grad_checkpoint=True))
        report["checkpointing"] = {"tokens": args.checkpoint_length, "attention_block": plan.attention_block,
                                   "plain_wall_s": plain[0], "plain_cpu_s": plain[1], "checkpointed_wall_s": checkpointed[0],
                                   "checkpointed_cpu_s": checkpointed[1], "extra_cpu": checkpointed[1] / plain[1] - 1}
        print(f"checkpointing at {args.checkpoint_length} tokens: {plain[1]:.0f} -> {checkpointed[1]:.0f} s CPU "
              f"({report['checkpointing']['extra_cpu']:+.0%}); wall {plain[0]:.0f} -> {checkpointed[0]:.0f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
