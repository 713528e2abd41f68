"""Splits and batches of preference pairs and GRPO prompts, planned like SFT batches.

A pair batch is an ordinary ``macft.data.Batch`` of 2B rows: the B chosen answers, then the same
pairs' rejected answers, so one forward pass scores both. Batch plans come from
``macft.data.batch_order`` (pairs are bucketed by their longer answer), so the order is the same
deterministic function of (seed, epoch) that exact resume relies on.

    splits = load_alignment_splits(recipe, tokenizer)      # AlignSplits of PairExample or PromptExample
    for batch in iterate_alignment_batches(splits.train, 4, 512, seed=0, loop=True): ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

from macft.align.grpo import PromptBatch, PromptExample
from macft.config import Recipe
from macft.data.batching import batch_order, build_batch
from macft.chat_template import template_tokens
from macft.data.formats import Record, read_records
from macft.data.preference import PairExample, drop_identical, encode_pair, longer, parse_pair, parse_prompt
from macft.data.splits import SPLITS, data_files, hold_out, truncate
from macft.data.templates import Encoder, Example, uses_chat_template
from macft.errors import MacftError


@dataclass
class AlignSplits:
    train: list
    valid: list
    test: list
    truncated: dict[str, int] = field(default_factory=dict)  # split -> pairs with a side cut at max_seq_length
    dropped: dict[str, int] = field(default_factory=dict)  # split -> pairs or prompts left with nothing to train on
    identical: dict[str, int] = field(default_factory=dict)  # split -> pairs left out for chosen == rejected
    total: dict[str, int] = field(default_factory=dict)  # split -> pairs before those were left out
    files: dict[str, str] = field(default_factory=dict)


def prompt_tokens(tokenizer: Any, record: Record, use_chat_template: bool | None) -> list[int]:
    """A GRPO prompt as generation starts from it: through the chat template with the assistant turn
    opened, or the plain prompt (as the SFT encoder renders a prompt/completion record)."""
    if uses_chat_template(tokenizer, use_chat_template):
        return template_tokens(tokenizer, record.as_messages()[:-1], add_generation_prompt=True, where=record.source)
    return list(tokenizer.encode(record.prompt + record.prompt_suffix))


def load_alignment_splits(recipe: Recipe, tokenizer: Any) -> AlignSplits:
    """Read and tokenize the recipe's pairs (dpo/orpo/simpo) or prompts (grpo)."""
    data_cfg = recipe.data
    pairs = recipe.train.objective != "grpo"
    encoder = Encoder(tokenizer, use_chat_template=data_cfg.use_chat_template, mask_prompt=True)
    files = data_files(data_cfg)
    splits = AlignSplits([], [], [], files={k: str(v) for k, v in files.items()})
    for name, path in files.items():
        if pairs:
            items = [encode_pair(encoder, r) for r in read_records(path, parse_pair)]
        else:
            items = [
                PromptExample(prompt_tokens(tokenizer, r.record, data_cfg.use_chat_template), r.fields, r.source)
                for r in read_records(path, parse_prompt)
            ]
        setattr(splits, name, items)
    if "valid" not in files and data_cfg.split_valid > 0:
        splits.train, splits.valid = hold_out(splits.train, data_cfg.split_valid, data_cfg.split_seed)
        splits.files["valid"] = f"{data_cfg.split_valid:g} of train held out (seed {data_cfg.split_seed})"
    limit = data_cfg.max_seq_length
    for name in SPLITS:
        items = getattr(splits, name)
        if pairs:
            kept, splits.truncated[name], splits.dropped[name] = truncate_pairs(items, limit)
            splits.total[name] = len(kept)
            kept, splits.identical[name] = drop_identical(kept, name, recipe.train.objective)
        else:
            room = limit - recipe.align.max_completion_tokens
            kept = [p for p in items if len(p.tokens) <= room]
            splits.truncated[name], splits.dropped[name] = 0, len(items) - len(kept)
        setattr(splits, name, kept)
    if not splits.train:
        what = "pair" if pairs else "prompt (plus align.max_completion_tokens)"
        raise MacftError(f"No training {what} fits within data.max_seq_length={limit}; raise it or shorten the data.")
    return splits


def truncate_pairs(pairs: list[PairExample], max_seq_length: int) -> tuple[list[PairExample], int, int]:
    """Cut both answers to ``max_seq_length`` tokens; drop a pair when either side has no trained
    token left. Returns (kept, pairs with a side cut, dropped)."""
    kept, cut, dropped = [], 0, 0
    for pair in pairs:
        chosen, cut_c, drop_c = truncate([pair.chosen], max_seq_length)
        rejected, cut_r, drop_r = truncate([pair.rejected], max_seq_length)
        cut += bool(cut_c or cut_r)
        if drop_c or drop_r:
            dropped += 1
            continue
        kept.append(dataclasses.replace(pair, chosen=chosen[0], rejected=rejected[0]))
    return kept, cut, dropped


def proxies(items: list, max_seq_length: int) -> list[Example]:
    """The example whose length stands for each item in a batch plan."""
    if items and isinstance(items[0], PairExample):
        return [longer(p) for p in items]
    return [Example(tokens=p.tokens, mask=[]) for p in items]


def build_alignment_batch(items: list, indices: list[int], max_seq_length: int, epoch: int = 0, index: int = 0):
    chosen = [items[i] for i in indices]
    if isinstance(chosen[0], PromptExample):
        return PromptBatch(chosen, epoch, index)
    flat = [p.chosen for p in chosen] + [p.rejected for p in chosen]
    rows = [[i] for i in range(len(flat))]
    return build_batch(flat, rows, max_seq_length, epoch=epoch, index=index)


def alignment_order(items: list, batch_size: int, max_seq_length: int, *, seed: int, epoch: int, bucket_by_length: bool) -> list[list[int]]:
    """One epoch's plan: batches of item indices."""
    plan = batch_order(proxies(items, max_seq_length), batch_size, max_seq_length, bucket_by_length=bucket_by_length, seed=seed, epoch=epoch)
    return [[i for row in rows for i in row] for rows in plan]


def iterate_alignment_batches(
    items: list,
    batch_size: int,
    max_seq_length: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
    loop: bool = False,
    bucket_by_length: bool = True,
) -> Iterator:
    while True:
        plan = alignment_order(items, batch_size, max_seq_length, seed=seed, epoch=epoch, bucket_by_length=bucket_by_length)
        for index in range(start, len(plan)):
            yield build_alignment_batch(items, plan[index], max_seq_length, epoch, index)
        if not loop:
            return
        epoch, start = epoch + 1, 0
