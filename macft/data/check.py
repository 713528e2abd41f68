"""``macft data check``: what a dataset looks like to a model, before any training.

Counts per split and format, token-length statistics, examples truncated at ``max_seq_length``,
exact duplicates and train/valid/test overlap, the padding share of plain, length-bucketed and
packed batching, and one example split into trained and untrained text.

    report = check_data(DataConfig(train="data/"), tokenizer, batch_size=4)
    json.dumps(report.to_dict())
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from macft.data.splits import SPLITS, DataConfig, overlap_count, read_splits, truncate
from macft.data.batching import batch_order, plan_padding
from macft.data.templates import Example


PREVIEW_TOKENS = (384, 128)  # the preview's first and last tokens of a longer example
# the batching strategies whose padding the report compares
PLANS = {"random": {"bucket_by_length": False}, "bucketed": {}, "packed": {"packing": True}}


@dataclass
class SplitReport:
    examples: int
    source: str
    formats: dict[str, int]
    lengths: dict[str, float]  # min, mean, median, p95, max (tokens, before truncation)
    trained_tokens: int  # after truncation
    truncated: int
    dropped: int  # no trained token left after truncation
    duplicates: int  # examples identical to an earlier one in the same split


@dataclass
class DataReport:
    max_seq_length: int
    batch_size: int
    splits: dict[str, SplitReport]
    overlap: dict[str, int]  # "valid"/"test" -> examples also in train
    padding: dict[str, float]  # "random", "bucketed", "packed" -> padding share of the train epoch
    preview: list[tuple[str, bool]] = field(default_factory=list)  # (text, trained) runs of one example
    preview_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_data(data_cfg: DataConfig, tokenizer: Any, *, batch_size: int = 4) -> DataReport:
    examples, sources = read_splits(data_cfg, tokenizer)
    limit = data_cfg.max_seq_length
    kept = {}
    splits = {}
    for name in SPLITS:
        if not examples[name]:
            continue
        kept[name], truncated, dropped = truncate(examples[name], limit)
        splits[name] = SplitReport(
            examples=len(examples[name]),
            source=sources.get(name, ""),
            formats=dict(Counter(e.format for e in examples[name])),
            lengths=length_stats(examples[name]),
            trained_tokens=sum(e.num_trained for e in kept[name]),
            truncated=truncated,
            dropped=dropped,
            duplicates=len(examples[name]) - len({_key(e) for e in examples[name]}),
        )
    overlap = {name: overlap_count(examples["train"], examples[name]) for name in ("valid", "test") if examples[name]}
    train = kept.get("train", [])
    padding = {}
    if train:
        for label, options in PLANS.items():
            plan = batch_order(train, batch_size, limit, **options)
            padding[label] = plan_padding(train, plan, limit)
    report = DataReport(limit, batch_size, splits, overlap, padding)
    if examples["train"]:
        sample = preview_example(examples["train"])
        report.preview = token_runs(sample, tokenizer)
        report.preview_source = sample.source
    return report


def length_stats(examples: list[Example]) -> dict[str, float]:
    lengths = np.array([len(e.tokens) for e in examples])
    return {
        "min": int(lengths.min()),
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
    }


def preview_example(examples: list[Example]) -> Example:
    """The first example that has both trained and untrained tokens (masking is what a preview
    should show), else the first."""
    for example in examples:
        if any(example.mask) and not all(example.mask):
            return example
    return examples[0]


def token_runs(example: Example, tokenizer: Any) -> list[tuple[str, bool]]:
    """The example's text as runs of (text, trained); each run is decoded as a whole so that
    multi-byte characters split across tokens decode correctly. A long example shows its first
    and last ``PREVIEW_TOKENS`` tokens around a note of how many are left out."""
    tokens, mask = example.tokens, example.mask
    head, tail = PREVIEW_TOKENS
    if len(tokens) <= head + tail:
        return _runs(tokens, mask, tokenizer)
    hidden = f" [... {len(tokens) - head - tail:,} tokens not shown ...] "
    return [*_runs(tokens[:head], mask[:head], tokenizer), (hidden, False), *_runs(tokens[-tail:], mask[-tail:], tokenizer)]


def _runs(tokens: list[int], mask: list[bool], tokenizer: Any) -> list[tuple[str, bool]]:
    runs: list[tuple[str, bool]] = []
    start = 0
    for end in range(1, len(tokens) + 1):
        if end == len(tokens) or mask[end] != mask[start]:
            runs.append((tokenizer.decode(tokens[start:end], skip_special_tokens=False), mask[start]))
            start = end
    return runs


def _key(example: Example) -> tuple[int, ...]:
    return tuple(example.tokens)
