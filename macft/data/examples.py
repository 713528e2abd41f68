"""Supervised examples, the data shape of instruction tuning: every line a prompt/completion, chat,
Alpaca, ShareGPT or text record (``macft.data.formats``), trained on its completion or assistant turns.

    splits = EXAMPLES.load(recipe.data, loaded.lazy_tokenizer, recipe.align)   # cached tokens need no tokenizer
    batches = EXAMPLES.batches(splits, recipe.data, batch_size=4, seed=0)     # padded, bucketed or packed rows
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from macft.data.batching import batch_order, iterate_batches
from macft.data.check import check_data
from macft.data.formats import Record, read_records
from macft.data.shapes import Batches, DataShape, Splits
from macft.data.splits import DataConfig, load_splits


def batches(splits: Splits, data_cfg: DataConfig, *, batch_size: int, seed: int) -> Batches:
    options = {"packing": data_cfg.packing, "bucket_by_length": data_cfg.bucket_by_length, "seed": seed}
    max_len = data_cfg.max_seq_length
    per_epoch = len(batch_order(splits.train, batch_size, max_len, **options))

    def train(epoch: int, start: int):
        return iterate_batches(splits.train, batch_size, max_len, epoch=epoch, start=start, loop=True, **options)

    def valid():
        return iterate_batches(splits.valid, batch_size, max_len, **options)

    return Batches(per_epoch, train, valid if splits.valid else None)


def demo_records(path: Path) -> list[Record]:
    """The held-out prompt/completion records; other formats have no single answer to compare."""
    return [r for r in read_records(path) if r.kind == "completion"]


EXAMPLES = DataShape(
    name="examples",
    line='{"prompt", "completion"}, {"messages"}, {"instruction", "output"}, {"conversations"} or {"text"}',
    recognises=lambda obj: True,  # the shape every other one is told apart from
    load=lambda data_cfg, tokenizer, settings: load_splits(data_cfg, tokenizer),
    batches=batches,
    check=lambda data_cfg, tokenizer, settings, batch_size=4: check_data(data_cfg, tokenizer, batch_size=batch_size),
    demo_records=demo_records,
    packing=True,
)
