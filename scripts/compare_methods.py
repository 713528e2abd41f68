"""Train every fine-tuning method for the same steps on the same data and compare them.

Each method (LoRA, QLoRA, DoRA, prompt tuning, prefix tuning, P-tuning, bottleneck adapters) runs
through the library's own ``run_training`` on the embedded Gemma 3 270M and WikiSQL, with the
same steps, batch size, sequence length and seed; only the learning rate follows the method (soft
prompts and prefixes need far larger steps than LoRA). It prints a table and the same numbers as
JSON: trainable parameters, peak memory, training tokens/s and the final validation loss, with
the untrained base model's validation loss as the first row.

    python scripts/compare_methods.py                                  # 30 steps, batch 4, seq 256
    python scripts/compare_methods.py --methods prompt,ptuning --json out.json   # re-run two rows of out.json
    python scripts/compare_methods.py --model path/to/tiny-model --steps 2 --json results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import macft  # noqa: F401  (loads OpenBLAS before mlx is imported)
from macft.config import DEFAULT_MODEL, Recipe, apply_overrides, validate
from macft.methods import method_spec
from macft.paths import PROJECT_ROOT, atomic_path

# method -> (recipe method name, 4-bit base, method options). Each trains at its registry learning rate
# (macft.methods: the method's usual order of magnitude, not tuned on this data); soft prompts
# start from the words of an instruction, as prompt-tuning practice recommends over random tokens.
INSTRUCTION = "Translate the question about the table into an SQL query."
METHODS = {
    "lora": ("lora", False, {}),
    "qlora": ("lora", True, {}),
    "dora": ("dora", False, {}),
    "prompt": ("prompt", False, {"init_text": INSTRUCTION}),
    "prefix": ("prefix", False, {}),
    "ptuning": ("ptuning", False, {"init_text": INSTRUCTION}),
    "adapter": ("adapter", False, {}),
}
BASE = "base"  # the untrained model's validation loss, for reference
DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data" / "wikisql"


def method_recipe(key: str, args: argparse.Namespace, stamp: str) -> Recipe:
    name, quantized, options = METHODS[key]
    recipe = Recipe(name=f"compare-{key}").replace(
        model={"path": args.model, "dequantize": True, "quantize_bits": 4 if quantized else None},
        data={"train": str(args.data), "max_seq_length": args.seq},
        method={"name": name, **options},
        train={
            "iters": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": method_spec(name).learning_rate,
            "eval_every": 0,  # validate once, after the last step
            "save_every": 0,
            "seed": args.seed,
        },
        output={"runs_dir": str(args.runs_dir), "name": f"{key}-{stamp}"},
    )
    return validate(apply_overrides(recipe, args.set) if args.set else recipe)


def base_row(args: argparse.Namespace) -> dict:
    """The untrained base model's loss on the validation batches every method is scored on."""
    from macft.data.examples import EXAMPLES
    from macft.models.head import auto_chunk_size, vocab_size
    from macft.objectives.sft import SupervisedLoss
    from macft.train.loop import evaluate
    from macft.train.plan import load_base

    recipe = method_recipe("lora", args, "base")
    print(f"[{BASE}] validation loss of the untrained model ...", flush=True)
    loaded = load_base(recipe)
    splits = EXAMPLES.load(recipe.data, loaded.tokenizer, recipe.align)
    batches = EXAMPLES.batches(splits, recipe.data, batch_size=recipe.train.batch_size, seed=recipe.train.seed).valid()
    loss = SupervisedLoss(auto_chunk_size(vocab_size(loaded.model), recipe.train.loss_chunk_size))
    val_loss = evaluate(loaded.model, batches, loss, recipe.train.eval_batches)
    return {"method": BASE, "trainable_parameters": 0, "peak_memory_bytes": None, "tokens_per_second": None,
            "val_loss": val_loss, "train_loss": None, "learning_rate": None, "run_dir": None}


def compare(args: argparse.Namespace) -> list[dict]:
    from macft.train.run import run_training

    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for key in args.methods:
        if key == BASE:
            rows.append(base_row(args))
            continue
        recipe = method_recipe(key, args, stamp)
        rate = recipe.train.learning_rate
        print(f"[{key}] training {recipe.train.iters} steps (learning rate {rate:g}) ...", flush=True)
        summary = run_training(recipe).summary
        rows.append(
            {
                "method": key,
                "trainable_parameters": summary.trainable_parameters,
                "peak_memory_bytes": summary.peak_memory_bytes,
                "tokens_per_second": summary.tokens_per_second,
                "val_loss": summary.final_val_loss,
                "train_loss": summary.final_train_loss,
                "learning_rate": recipe.train.learning_rate,
                "run_dir": summary.run_dir,
            }
        )
    return rows


def merged(previous: list[dict], rows: list[dict]) -> list[dict]:
    """The rows of an earlier results file, with the methods run now replaced, in table order."""
    by_method = {r["method"]: r for r in previous} | {r["method"]: r for r in rows}
    order = [BASE, *METHODS]
    return sorted(by_method.values(), key=lambda r: order.index(r["method"]))


def table(rows: list[dict]) -> str:
    header = ("method", "trainable params", "peak memory", "tokens/s", "val loss", "train loss")
    lines = [
        (
            r["method"],
            f"{r['trainable_parameters']:,}",
            "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB",
            "-" if r["tokens_per_second"] is None else f"{r['tokens_per_second']:,.0f}",
            "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}",
            "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        # The method name reads left-aligned, the numbers right-aligned.
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, lines)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model spec (default: the embedded Gemma 3 270M)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.jsonl and valid.jsonl")
    parser.add_argument(
        "--methods", default=",".join([BASE, *METHODS]), help="comma-separated subset of " + ", ".join([BASE, *METHODS])
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="data.max_seq_length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / "compare")
    parser.add_argument(
        "--json", type=Path, help="also write the results to this file (rows of methods not run now are kept from it)"
    )
    parser.add_argument(
        "--set", action="append", default=[], help="recipe override for every run, e.g. train.grad_checkpoint=true"
    )
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m != BASE and m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join([BASE, *METHODS])}")
    return args


def main(argv: list[str] | None = None) -> int:
    from macft.errors import MacftError

    args = parse_args(argv)
    try:
        rows = compare(args)
    except MacftError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    if args.json and args.json.exists():
        rows = merged(json.loads(args.json.read_text()), rows)
    print()
    print(table(rows))
    text = json.dumps(rows, indent=2)
    print(text)
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
