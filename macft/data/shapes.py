"""The shapes training data comes in, one record each, read by the objectives that train on them.

Supervised examples (``macft.data.examples``), preference pairs (``macft.data.pairs``), GRPO prompts
(``macft.data.prompts``) and KTO's labelled completions (``macft.data.feedback``) each declare a
``DataShape``: how a line looks, how its files become splits of tokenized items, how those become
batches, what ``macft data check`` reports about them and which held-out records the demo answers.

    shape = objective.data                                  # macft.objectives: the objective's data shape
    splits = shape.load(recipe.data, tokenizer, recipe.align)
    batches = shape.batches(splits, recipe.data, batch_size=4, seed=0)
    for batch in batches.train(epoch=0, start=0): ...       # global batches, looping over epochs

Batch plans are deterministic functions of (seed, epoch), so a resumed run sees the same batches.
Items other than supervised examples are planned by the length of the example standing for them
(``proxy``), through the same ``macft.data.batching.batch_order``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from macft.data.batching import batch_order
from macft.data.templates import Example


@dataclass
class Splits:
    """A dataset's items (examples, pairs, prompts...) per split, and what loading did to them."""

    train: list
    valid: list
    test: list
    truncated: dict[str, int] = field(default_factory=dict)  # split -> items cut to max_seq_length
    dropped: dict[str, int] = field(default_factory=dict)  # split -> items left with nothing to train on
    files: dict[str, str] = field(default_factory=dict)  # split -> file it came from ("held out" for split_valid)
    notes: list[str] = field(default_factory=list)  # what else loading left out or changed, for the user

    @property
    def counts(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in ("train", "valid", "test")}


@dataclass
class ShapeReport:
    """``macft data check`` on a data shape other than supervised examples: a report per split.
    Each shape's report adds ``table()``: (columns, a row per split, the columns whose non-zero
    counts deserve a look)."""

    kind: str  # the shape's name
    max_seq_length: int
    splits: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Batches:
    """How a run walks its data: batches per epoch, the training batches from (epoch, index) on
    (looping into later epochs), and the validation batches (None without validation data)."""

    per_epoch: int
    train: Callable[[int, int], Iterator]
    valid: Callable[[], Iterator] | None


@dataclass(frozen=True)
class DataShape:
    name: str  # "examples", "pairs", "prompts", "feedback"
    line: str  # the JSONL line it reads, as messages show it
    recognises: Callable[[dict], bool]  # whether a file's first JSON object is of this shape
    load: Callable[[Any, Any, Any], Splits]  # (DataConfig, tokenizer, align settings) -> splits of items
    batches: Callable[..., Batches]  # (splits, DataConfig, batch_size=, seed=) -> Batches
    check: Callable[..., Any]  # (DataConfig, tokenizer, align settings, batch_size=) -> a report with to_dict()
    demo_records: Callable[[Any], list]  # (path) -> held-out macft.data.formats.Record the demo answers
    packing: bool = False  # whether several items may share a row


def content(item: Any) -> Any:
    """What an item holds, without where it came from: two items with the same content are the same
    example, whichever file or line they were read from."""
    if dataclasses.is_dataclass(item):
        return tuple(content(getattr(item, f.name)) for f in dataclasses.fields(item) if f.name not in ("source", "format"))
    if isinstance(item, (list, tuple)):
        return tuple(content(v) for v in item)
    if isinstance(item, dict):
        return tuple(sorted((k, repr(v)) for k, v in item.items()))
    return item


def item_order(proxies: list[Example], batch_size: int, max_seq_length: int, *, seed: int, epoch: int, bucket_by_length: bool) -> list[list[int]]:
    """One epoch's plan for items that take a row each: batches of item indices, planned by the
    length of each item's ``proxy`` example."""
    plan = batch_order(proxies, batch_size, max_seq_length, bucket_by_length=bucket_by_length, seed=seed, epoch=epoch)
    return [[i for row in rows for i in row] for rows in plan]


def item_batches(
    items: Splits, proxy: Callable[[Any], Example], build: Callable[[list, list[int], int, int, int], Any],
    data_cfg: Any, batch_size: int, seed: int,
) -> Batches:
    """``Batches`` of items that take a row each: ``proxy(item)`` stands for its length in the plan,
    ``build(items, indices, max_seq_length, epoch, index)`` makes one batch."""
    max_len = data_cfg.max_seq_length

    def walk(split: list, epoch: int, start: int, loop: bool) -> Iterator:
        proxies = [proxy(item) for item in split]
        while True:
            plan = item_order(proxies, batch_size, max_len, seed=seed, epoch=epoch, bucket_by_length=data_cfg.bucket_by_length)
            for index in range(start, len(plan)):
                yield build(split, plan[index], max_len, epoch, index)
            if not loop:
                return
            epoch, start = epoch + 1, 0

    per_epoch = len(item_order([proxy(i) for i in items.train], batch_size, max_len, seed=seed, epoch=0, bucket_by_length=data_cfg.bucket_by_length))
    valid = (lambda: walk(items.valid, 0, 0, loop=False)) if items.valid else None
    return Batches(per_epoch, lambda epoch, start: walk(items.train, epoch, start, loop=True), valid)
