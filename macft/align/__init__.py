"""Alignment objectives on the one training engine: DPO/IPO, ORPO, SimPO on preference pairs, GRPO on prompts.

``train.objective`` picks the objective; ``align`` holds its settings. ``macft.train.run`` asks this
package for the data, the batches and the loss, and trains with the same loop, checkpoints, resume
and early stopping as SFT:

    splits = load_alignment_splits(recipe, tokenizer)
    per_epoch, train_batches, valid_batches = alignment_batches(recipe, splits)
    loss_fn = alignment_loss(recipe, model, tokenizer, chunk_size, reference=None)

The reference model of DPO and GRPO is the base with the adapters switched off; full fine-tuning has
no adapters to switch off, so it needs a second, frozen copy of the base (``needs_reference_copy``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import mlx.nn as nn

from macft.align.data import AlignSplits, alignment_order, iterate_alignment_batches, load_alignment_splits
from macft.align.grpo import GRPOLoss
from macft.align.preference import REFERENCE_OBJECTIVES, PreferenceLoss
from macft.align.rewards import load_rewards
from macft.config import Recipe
from macft.data.formats import Record, read_records
from macft.data.preference import parse_pair, parse_prompt

__all__ = [
    "AlignSplits",
    "GRPOLoss",
    "PreferenceLoss",
    "alignment_batches",
    "alignment_loss",
    "demo_records",
    "load_alignment_splits",
    "needs_reference_copy",
]


def needs_reference_copy(recipe: Recipe) -> bool:
    """Full fine-tuning changes the base weights themselves, so DPO/GRPO must keep a frozen copy."""
    return recipe.method.name == "full" and recipe.train.objective in REFERENCE_OBJECTIVES


def reference_note(recipe: Recipe) -> str | None:
    if recipe.train.objective not in REFERENCE_OBJECTIVES:
        return None
    if needs_reference_copy(recipe):
        return f"{recipe.train.objective.upper()} with full fine-tuning keeps a second, frozen copy of the base as its reference (twice the weight memory)."
    return f"{recipe.train.objective.upper()} reference: the base with the adapters switched off (no second copy of the weights)."


def alignment_batches(recipe: Recipe, splits: AlignSplits) -> tuple[int, Callable[[int, int], Any], Callable[[], Any] | None]:
    """(batches per epoch, train_batches(epoch, start), valid_batches() or None) for the loop."""
    cfg, max_len = recipe.train, recipe.data.max_seq_length
    options = {"seed": cfg.seed, "bucket_by_length": recipe.data.bucket_by_length}
    per_epoch = len(alignment_order(splits.train, cfg.batch_size, max_len, epoch=0, **options))

    def train_batches(epoch: int, start: int):
        return iterate_alignment_batches(splits.train, cfg.batch_size, max_len, epoch=epoch, start=start, loop=True, **options)

    def valid_batches():
        return iterate_alignment_batches(splits.valid, cfg.batch_size, max_len, **options)

    return per_epoch, train_batches, valid_batches if splits.valid else None


def alignment_loss(recipe: Recipe, model: nn.Module, tokenizer: Any, chunk_size: int, reference: nn.Module | None = None):
    objective = recipe.train.objective
    if objective == "grpo":
        rewards = load_rewards(recipe.align.rewards, recipe.align.reward_timeout)
        return GRPOLoss(recipe.align, model, tokenizer, rewards, chunk_size, reference)
    return PreferenceLoss(recipe.align, objective, chunk_size, reference)


def demo_records(recipe: Recipe, path: Path) -> list[Record]:
    """Held-out prompts for the base-vs-tuned demo: a pair's prompt expects its chosen answer, a GRPO
    prompt its ``answer`` field (when it has one)."""
    if recipe.train.objective == "grpo":
        prompts = read_records(path, parse_prompt)
        return [dataclasses.replace(p.record, completion=str(p.fields.get("answer", ""))) for p in prompts if p.record.kind == "completion"]
    return [p.chosen for p in read_records(path, parse_pair) if p.chosen.kind == "completion"]
