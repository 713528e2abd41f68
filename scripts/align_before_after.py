"""Held-out numbers of an alignment run, base (adapters off) against tuned, for the README.

- Preference runs (dpo/orpo/simpo): preference accuracy, the share of held-out pairs where the model
  gives the chosen answer a higher log-probability than the rejected one; the mean log-probability
  margin; and the greedy answers to the first prompts.
- GRPO runs: the mean reward of greedy answers to the held-out prompts, and the share that score
  the maximum.
- KTO runs: each held-out answer's log-ratio log π_tuned(answer) − log π_base(answer), averaged over
  the desirable and the undesirable answers, and their margin (0 before training).

    python scripts/align_before_after.py runs/prefer-city-dpo-… [--split test] [--out results.json]
    python scripts/align_before_after.py RUN --adapter RUN/checkpoints/best     # a checkpoint of the run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import macft  # noqa: F401  (loads OpenBLAS before mlx)
import numpy as np

from macft.adapters.files import load_adapter
from macft.config import load_recipe
from macft.data.batching import build_batch
from macft.data.pairs import build_pair_batch
from macft.methods import adapters_disabled
from macft.objectives import objective_named
from macft.objectives.grpo import sample
from macft.objectives.rewards import load_rewards, score
from macft.objectives.sequences import sequence_logps, trained_positions
from macft.train.plan import load_base


def row_logps(model, batch) -> np.ndarray:
    arrays = (batch.inputs, *trained_positions(batch.targets, batch.loss_mask))
    logps, _ = sequence_logps(model, arrays, chunk_size=512, training=False)
    return np.array(logps)


def pair_scores(model, pairs, max_len: int) -> np.ndarray:
    """log p(chosen) − log p(rejected) for every pair."""
    margins = []
    for start in range(0, len(pairs), 8):
        logps = row_logps(model, build_pair_batch(pairs, list(range(start, min(start + 8, len(pairs)))), max_len))
        half = len(logps) // 2
        margins.extend((logps[:half] - logps[half:]).tolist())
    return np.array(margins)


def answer_logps(model, items, max_len: int) -> np.ndarray:
    """log p(answer | prompt) of every labelled example."""
    out = []
    for start in range(0, len(items), 8):
        examples = [i.example for i in items[start : start + 8]]
        out.extend(row_logps(model, build_batch(examples, [[i] for i in range(len(examples))], max_len)).tolist())
    return np.array(out)


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
    splits = objective_named(recipe.train.objective).data.load(recipe.data, loaded.tokenizer, recipe.align)
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
    elif recipe.train.objective == "kto":
        tuned = answer_logps(model, items, recipe.data.max_seq_length)
        with adapters_disabled(model):
            base = answer_logps(model, items, recipe.data.max_seq_length)
        good = np.array([i.desirable for i in items])
        ratio = tuned - base
        result.update(
            desirable=int(good.sum()), undesirable=int((~good).sum()),
            desirable_log_ratio=float(ratio[good].mean()), undesirable_log_ratio=float(ratio[~good].mean()),
            log_ratio_margin=float(ratio[good].mean() - ratio[~good].mean()),
            base_logp_margin=float(base[good].mean() - base[~good].mean()), tuned_logp_margin=float(tuned[good].mean() - tuned[~good].mean()),
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
