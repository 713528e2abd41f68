"""Held-out numbers of an alignment run, base (adapters off) against tuned, for the README.

- Preference runs (dpo/orpo/simpo): preference accuracy, the share of held-out pairs where the model
  gives the chosen answer a higher log-probability than the rejected one; the mean log-probability
  margin; and the greedy answers to the first prompts.
- GRPO runs: the mean reward of greedy answers to the held-out prompts, and the share that score
  the maximum.

    python scripts/align_before_after.py runs/prefer-city-dpo-… [--split test] [--out results.json]
    python scripts/align_before_after.py RUN --adapter RUN/checkpoints/best     # a checkpoint of the run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import macft  # noqa: F401  (loads OpenBLAS before mlx)
import numpy as np

from macft.align.data import iterate_alignment_batches, load_alignment_splits
from macft.align.grpo import sample
from macft.align.logps import sequence_logps, trained_positions
from macft.align.rewards import load_rewards, score
from macft.config import load_recipe
from macft.methods import adapters_disabled, load_adapter
from macft.train.run import load_base


def pair_scores(model, pairs, max_len: int) -> np.ndarray:
    """log p(chosen) − log p(rejected) for every pair."""
    margins = []
    for batch in iterate_alignment_batches(pairs, 8, max_len, bucket_by_length=False):
        arrays = (batch.inputs, *trained_positions(batch.targets, batch.loss_mask))
        logps, _ = sequence_logps(model, arrays, chunk_size=512, training=False)
        half = logps.shape[0] // 2
        margins.extend(np.array(logps[:half] - logps[half:]).tolist())
    return np.array(margins)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--adapter", type=Path, help="adapter folder (default: the run's own)")
    parser.add_argument("--split", default="test", choices=["valid", "test"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    recipe = load_recipe(args.run_dir / "recipe.yaml").replace(output={"resume": None})
    loaded = load_base(recipe)
    model, _ = load_adapter(loaded.model, args.adapter or args.run_dir)
    splits = load_alignment_splits(recipe, loaded.tokenizer)
    items = getattr(splits, args.split)
    result = {"run": str(args.adapter or args.run_dir), "objective": recipe.train.objective, "split": args.split, "count": len(items)}
    if recipe.train.objective == "grpo":
        rewards = load_rewards(recipe.align.rewards)

        def greedy_rewards():
            completions = sample(model, loaded.tokenizer, [p.tokens for p in items], recipe.align.max_completion_tokens, 0.0)
            texts = [loaded.tokenizer.decode([t for t in c if t != loaded.tokenizer.eos_token_id]) for c in completions]
            return score(rewards, texts, [p.fields for p in items], [p.source for p in items]), texts

        tuned, tuned_texts = greedy_rewards()
        with adapters_disabled(model):
            base, base_texts = greedy_rewards()
        best = max(base.max(), tuned.max())
        result.update(
            base_mean_reward=float(base.mean()), tuned_mean_reward=float(tuned.mean()),
            base_full_marks=float((base == best).mean()), tuned_full_marks=float((tuned == best).mean()),
            examples=[{"answer": p.fields.get("answer"), "base": b, "tuned": t} for p, b, t in list(zip(items, base_texts, tuned_texts))[:4]],
        )
    else:
        tuned = pair_scores(model, items, recipe.data.max_seq_length)
        with adapters_disabled(model):
            base = pair_scores(model, items, recipe.data.max_seq_length)
        prompts = [p.chosen.tokens[: p.chosen.mask.index(True)] for p in items[:4]]

        def greedy() -> list[str]:
            return [loaded.tokenizer.decode(c) for c in sample(model, loaded.tokenizer, prompts, 4, 0.0)]

        tuned_answers = greedy()
        with adapters_disabled(model):
            base_answers = greedy()
        result.update(
            base_accuracy=float((base > 0).mean()), tuned_accuracy=float((tuned > 0).mean()),
            base_mean_margin=float(base.mean()), tuned_mean_margin=float(tuned.mean()),
            examples=[
                {"prompt": loaded.tokenizer.decode(q), "base": b, "tuned": t} for q, b, t in zip(prompts, base_answers, tuned_answers)
            ],
        )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
