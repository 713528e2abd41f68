"""Unpaired feedback, the data shape of KTO: single answers labelled good or bad, as apps log them.

    {"prompt": "Where was Ada born?", "completion": " London", "label": true}
    {"system": "...", "prompt": [{"role": "user", "content": "..."}], "completion": [{"role": "assistant", ...}], "label": false}

Each line is tokenized as a supervised prompt/completion (same templates and prompt masking). A
batch holds B labelled examples and, half a batch further, a stand-in row for each: its prompt
followed by the next example's completion (the mismatched pairs KTO estimates the policy's KL
divergence from the reference on). Lanes and ranks split such a batch by whole pairs of rows.

    items = read_records(path, parse_feedback)
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from macft.data.batching import Batch, build_batch
from macft.data.check import length_stats
from macft.data.formats import LineError, Record, json_object, read_records
from macft.data.pairs import answer_record, read_split_items, turns
from macft.data.shapes import DataShape, ShapeReport, Splits, item_batches
from macft.data.splits import SPLITS, DataConfig, data_files, truncate
from macft.data.templates import Encoder, Example
from macft.errors import MacftError
from macft.models.tokenizer_cache import eager

FEEDBACK_SHAPE = '{"prompt", "completion", "label": true|false} (prompt and completion a string or a list of messages, optional "system")'


@dataclass(frozen=True)
class FeedbackRecord:
    source: str
    record: Record
    desirable: bool


@dataclass
class FeedbackExample:
    example: Example
    desirable: bool
    source: str = ""

    @property
    def answer_start(self) -> int:
        """The first trained token: where the prompt ends and the completion begins."""
        return self.example.mask.index(True)


@dataclass
class FeedbackBatch(Batch):
    labels: mx.array | None = None  # [rows] 1.0 for a desirable example, 0.0 for an undesirable one


def parse_feedback(line: str, source: str) -> FeedbackRecord:
    obj = json_object(line, FEEDBACK_SHAPE)
    if not isinstance(obj.get("label"), bool):
        raise LineError(f"'label' must be true (a desirable answer) or false (an undesirable one), not {obj.get('label')!r}")
    prompt = turns(obj, "prompt", "user", FEEDBACK_SHAPE)
    completion = turns(obj, "completion", "assistant", FEEDBACK_SHAPE)
    return FeedbackRecord(source, answer_record(obj, prompt, completion, source, "feedback", "completion"), obj["label"])


def load(data_cfg: DataConfig, tokenizer: Any, settings: Any = None) -> Splits:
    """Read and tokenize every split's labelled examples, cut to ``data.max_seq_length``."""
    encoder = Encoder(eager(tokenizer), use_chat_template=data_cfg.use_chat_template, mask_prompt=True)

    def read(path: Path) -> list[FeedbackExample]:
        return [FeedbackExample(encoder.encode(r.record), r.desirable, r.source) for r in read_records(path, parse_feedback)]

    splits = read_split_items(data_cfg, read)
    for name in SPLITS:
        kept, cut, dropped = [], 0, 0
        for item in getattr(splits, name):
            examples, was_cut, was_dropped = truncate([item.example], data_cfg.max_seq_length)
            cut, dropped = cut + was_cut, dropped + was_dropped
            kept.extend(dataclasses.replace(item, example=e) for e in examples)
        setattr(splits, name, kept)
        splits.truncated[name], splits.dropped[name] = cut, dropped
    if not splits.train:
        raise MacftError(f"No training example fits within data.max_seq_length={data_cfg.max_seq_length}; raise it or shorten the data.")
    return splits


def mismatched(items: list[FeedbackExample], max_seq_length: int) -> list[Example]:
    """Each item's prompt followed by the next item's completion (the last one's by the first's)."""
    rows = []
    for item, other in zip(items, items[1:] + items[:1]):
        prompt = item.example.tokens[: item.answer_start]
        answer = other.example.tokens[other.answer_start :]
        tokens = (prompt + answer)[:max_seq_length]
        rows.append(Example(tokens=tokens, mask=([False] * len(prompt) + [True] * len(answer))[:max_seq_length]))
    return rows


def build_feedback_batch(items: list[FeedbackExample], indices: list[int], max_seq_length: int, epoch: int = 0, index: int = 0) -> FeedbackBatch:
    chosen = [items[i] for i in indices]
    flat = [i.example for i in chosen] + mismatched(chosen, max_seq_length)
    batch = build_batch(flat, [[i] for i in range(len(flat))], max_seq_length, epoch=epoch, index=index)
    labels = mx.array([float(i.desirable) for i in chosen] * 2)
    return FeedbackBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)} | {"pairs": True}, labels=labels)


def batches(splits: Splits, data_cfg: DataConfig, *, batch_size: int, seed: int):
    return item_batches(splits, lambda item: item.example, build_feedback_batch, data_cfg, batch_size, seed)


def demo_records(path: Path) -> list[Record]:
    """A held-out desirable example's prompt, expecting its completion."""
    return [f.record for f in read_records(path, parse_feedback) if f.desirable and f.record.kind == "completion"]


@dataclass
class FeedbackSplitReport:
    examples: int
    source: str
    desirable: int
    undesirable: int
    lengths: dict[str, float]  # min, mean, median, p95, max (tokens, prompt included)
    truncated: int
    dropped: int  # no trained token left after truncation
    duplicates: int


class FeedbackReport(ShapeReport):

    def table(self) -> tuple[list[str], list[list[Any]], set[str]]:
        columns = ["split", "examples", "desirable", "undesirable", "tokens (mean/max)", "truncated", "dropped", "duplicates"]
        rows = [
            [name, s.examples, s.desirable, s.undesirable, f"{s.lengths['mean']:.1f}/{s.lengths['max']}", s.truncated, s.dropped, s.duplicates]
            for name, s in self.splits.items()
        ]
        return columns, rows, {"truncated", "dropped", "duplicates"}


def check(data_cfg: DataConfig, tokenizer: Any, settings: Any = None, batch_size: int = 4) -> FeedbackReport:
    encoder = Encoder(tokenizer, use_chat_template=data_cfg.use_chat_template, mask_prompt=True)
    splits = {}
    for name, path in data_files(data_cfg).items():
        records = read_records(path, parse_feedback)
        examples = [encoder.encode(r.record) for r in records]
        _, truncated, dropped = truncate(examples, data_cfg.max_seq_length)
        desirable = sum(r.desirable for r in records)
        keys = Counter((tuple(e.tokens), r.desirable) for e, r in zip(examples, records))
        splits[name] = FeedbackSplitReport(
            examples=len(records),
            source=str(path),
            desirable=desirable,
            undesirable=len(records) - desirable,
            lengths=length_stats(examples),
            truncated=truncated,
            dropped=dropped,
            duplicates=len(records) - len(keys),
        )
    return FeedbackReport("feedback", data_cfg.max_seq_length, splits)


FEEDBACK = DataShape(
    name="feedback",
    line=FEEDBACK_SHAPE,
    recognises=lambda obj: "label" in obj and "completion" in obj,
    load=load,
    batches=batches,
    check=check,
    demo_records=demo_records,
)
