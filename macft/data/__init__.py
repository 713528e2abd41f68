"""The data pipeline: JSONL lines -> token ids and loss masks -> splits -> batches (padded or packed).

Each shape of training data is one module declaring a ``macft.data.shapes.DataShape``: supervised
examples (``examples``), preference pairs (``pairs``), GRPO prompts (``prompts``) and KTO feedback
(``feedback``); ``DataConfig`` is the recipe's ``data`` section.

    from macft.data import load_splits, iterate_batches, packing_cache
    splits = load_splits(recipe.data, tokenizer)
    for batch in iterate_batches(splits.train, 4, recipe.data.max_seq_length, packing=True, seed=0):
        logits = model(batch.inputs, cache=packing_cache(model, batch.segment_ids))
"""

from macft.data.batching import Batch, batch_order, build_batch, iterate_batches, plan_padding
from macft.data.formats import Record, read_records
from macft.data.packing import packing_cache
from macft.data.shapes import Splits
from macft.data.splits import DataConfig, load_splits
from macft.data.templates import Encoder, Example

__all__ = [
    "Batch",
    "DataConfig",
    "Encoder",
    "Example",
    "Record",
    "Splits",
    "batch_order",
    "build_batch",
    "iterate_batches",
    "load_splits",
    "packing_cache",
    "plan_padding",
    "read_records",
]
