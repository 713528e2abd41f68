"""``macft data check`` for preference pairs and GRPO prompt sets.

Per split: how many pairs, token lengths of the chosen and rejected sequences, pairs with a side cut
at ``max_seq_length`` (and those left with nothing to train on), pairs whose two answers are
identical (they teach nothing), and exact duplicates. For prompt sets: prompts, their lengths, and
which fields the rewards will see.

    report = check_alignment_data(DataConfig(train="pairs/"), tokenizer, kind="pairs")
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Any

from macft.align.data import prompt_tokens, truncate_pairs
from macft.config import DataConfig
from macft.data.check import length_stats
from macft.data.formats import read_records
from macft.data.preference import encode_pair, parse_pair, parse_prompt
from macft.data.splits import data_files
from macft.data.templates import Encoder, Example


@dataclass
class PairSplitReport:
    pairs: int
    source: str
    chosen_lengths: dict[str, float]  # min, mean, median, p95, max (tokens, prompt included)
    rejected_lengths: dict[str, float]
    truncated: int  # pairs with the chosen or rejected sequence cut at max_seq_length
    dropped: int  # pairs left with no trained token on a side
    identical: int  # chosen == rejected
    duplicates: int


@dataclass
class PromptSplitReport:
    prompts: int
    source: str
    lengths: dict[str, float]
    fields: dict[str, int]  # field -> prompts that have it


@dataclass
class AlignDataReport:
    kind: str  # "pairs" or "prompts"
    max_seq_length: int
    splits: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_alignment_data(data_cfg: DataConfig, tokenizer: Any, kind: str) -> AlignDataReport:
    encoder = Encoder(tokenizer, use_chat_template=data_cfg.use_chat_template, mask_prompt=True)
    splits: dict[str, Any] = {}
    for name, path in data_files(data_cfg).items():
        if kind == "pairs":
            pairs = [encode_pair(encoder, r) for r in read_records(path, parse_pair)]
            _, truncated, dropped = truncate_pairs(pairs, data_cfg.max_seq_length)
            keys = [(tuple(p.chosen.tokens), tuple(p.rejected.tokens)) for p in pairs]
            splits[name] = PairSplitReport(
                pairs=len(pairs),
                source=str(path),
                chosen_lengths=length_stats([p.chosen for p in pairs]),
                rejected_lengths=length_stats([p.rejected for p in pairs]),
                truncated=truncated,
                dropped=dropped,
                identical=sum(p.identical for p in pairs),
                duplicates=len(keys) - len(set(keys)),
            )
        else:
            records = read_records(path, parse_prompt)
            tokens = [prompt_tokens(tokenizer, r.record, data_cfg.use_chat_template) for r in records]
            fields = Counter(k for r in records for k in r.fields if k not in ("prompt", "system"))
            splits[name] = PromptSplitReport(
                prompts=len(records),
                source=str(path),
                lengths=length_stats([Example(tokens=t, mask=[]) for t in tokens]),
                fields=dict(fields),
            )
    return AlignDataReport(kind, data_cfg.max_seq_length, splits)
