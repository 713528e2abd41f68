"""Batches for training and evaluation, deterministic for a (seed, epoch) so a run can resume exactly.

An epoch's plan is ``batch_order(...)``: a list of batches, each a list of rows, each a list of
example indices (one per row unless packing). ``build_batch`` turns one planned batch into arrays,
so resuming at batch ``k`` of epoch ``e`` costs one plan, not ``k`` batches:

    for batch in iterate_batches(splits.train, 4, 512, seed=0, epoch=e, start=k, loop=True):
        logits = model(batch.inputs, cache=packing_cache(model, batch.segment_ids))

``inputs`` are ``tokens[:-1]``, ``targets`` are ``tokens[1:]`` and ``loss_mask`` is aligned with
the targets. Rows are padded to a multiple of ``PAD_MULTIPLE`` positions so a compiled step
sees few distinct shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
import numpy as np

from macft.data.packing import pack_rows
from macft.data.templates import Example
from macft.errors import MacftError

PAD_MULTIPLE = 8
BUCKET_WINDOW = 64  # bucketing sorts this many batches' worth of shuffled examples at a time


@dataclass
class Batch:
    inputs: mx.array  # [B, L] int32
    targets: mx.array  # [B, L] int32
    loss_mask: mx.array  # [B, L] float32, 1 where the target is trained on
    segment_ids: mx.array | None  # [B, L] int32 when packed: 0 = padding, 1..n = example within the row
    num_tokens: int  # trained target tokens
    padding_fraction: float  # share of the B*L positions that hold no example
    epoch: int = 0
    index: int = 0  # position of this batch in its epoch's plan
    # Row i pairs with row i + B/2 (a preference pair's chosen and rejected answers, or an example
    # and its stand-in): lanes and ranks split such a batch by whole pairs.
    pairs: bool = False


def positions(example: Example, max_seq_length: int) -> int:
    """Input positions an example takes once truncated to ``max_seq_length`` tokens."""
    return min(len(example.tokens), max_seq_length) - 1


def padded_width(fill: int) -> int:
    return -(-fill // PAD_MULTIPLE) * PAD_MULTIPLE


def batch_order(
    examples: list[Example],
    batch_size: int,
    max_seq_length: int,
    *,
    packing: bool = False,
    bucket_by_length: bool = True,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
) -> list[list[list[int]]]:
    """The plan of one epoch: batches -> rows -> example indices.

    Rows are one shuffled example each or, with ``packing``, shuffled rows of up to
    ``max_seq_length`` positions packed with examples. With ``bucket_by_length`` rows are sorted by
    length within windows of ``BUCKET_WINDOW`` batches, so a batch holds similar lengths while its
    members still change from epoch to epoch. The batch order is shuffled.
    ``drop_last`` drops a final smaller batch (when there is at least one full batch).
    """
    if not examples:
        raise MacftError("There are no examples to batch; check that the data file is not empty.")
    if batch_size < 1:
        raise MacftError("train.batch_size must be at least 1.")
    rng = np.random.default_rng([seed, epoch])
    lengths = [positions(e, max_seq_length) for e in examples]
    order = rng.permutation(len(examples)).tolist()
    if packing:
        packed = pack_rows(lengths, max_seq_length, order)
        rows = [packed[i] for i in rng.permutation(len(packed))]
    else:
        rows = [[i] for i in order]
    if bucket_by_length:
        window = batch_size * BUCKET_WINDOW

        def fill(row: list[int]) -> int:
            return sum(lengths[i] for i in row)

        rows = [row for s in range(0, len(rows), window) for row in sorted(rows[s : s + window], key=fill)]
    batches = [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return [batches[i] for i in rng.permutation(len(batches))]


def build_batch(
    examples: list[Example],
    rows: list[list[int]],
    max_seq_length: int,
    *,
    packing: bool = False,
    epoch: int = 0,
    index: int = 0,
) -> Batch:
    """Arrays for one planned batch (a list of rows of example indices)."""
    fills = [sum(positions(examples[i], max_seq_length) for i in row) for row in rows]
    shape = (len(rows), padded_width(max(fills)))
    inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    loss_mask, segments = np.zeros(shape, np.float32), np.zeros(shape, np.int32)
    for r, row in enumerate(rows):
        at = 0
        for segment, i in enumerate(row, start=1):
            tokens = examples[i].tokens[:max_seq_length]
            n = len(tokens) - 1
            inputs[r, at : at + n] = tokens[:-1]
            targets[r, at : at + n] = tokens[1:]
            loss_mask[r, at : at + n] = examples[i].mask[1 : n + 1]
            segments[r, at : at + n] = segment
            at += n
    return Batch(
        inputs=mx.array(inputs),
        targets=mx.array(targets),
        loss_mask=mx.array(loss_mask),
        segment_ids=mx.array(segments) if packing else None,
        num_tokens=int(loss_mask.sum()),
        padding_fraction=1.0 - sum(fills) / (shape[0] * shape[1]),
        epoch=epoch,
        index=index,
    )


def row_arrays(batch: Batch) -> dict[str, mx.array]:
    """The batch's arrays with a value per row (an objective's batch may add its own, such as labels)."""
    rows = batch.inputs.shape[0]
    fields = ((f.name, getattr(batch, f.name)) for f in dataclasses.fields(batch))
    return {name: value for name, value in fields if isinstance(value, mx.array) and value.ndim and value.shape[0] == rows}


def take_rows(batch: Batch, rows: list[int]) -> Batch:
    """The batch of ``rows`` of ``batch`` (the same width, epoch and index; the padding share is the whole batch's)."""
    index = mx.array(rows)
    taken = {name: value[index] for name, value in row_arrays(batch).items()}
    return dataclasses.replace(batch, **taken, num_tokens=int(taken["loss_mask"].sum().item()))


def units(batch: Batch) -> int:
    """What a batch is split by: its rows, or its pairs of rows."""
    return batch.inputs.shape[0] // 2 if batch.pairs else batch.inputs.shape[0]


def unit_rows(batch: Batch, chosen: list[int]) -> list[int]:
    """The rows of the units ``chosen``, in the batch's layout (a pair's two rows stay half a batch apart)."""
    return chosen + [i + units(batch) for i in chosen] if batch.pairs else chosen


def split_rows(batch: Batch, parts: int) -> list[Batch]:
    """``batch`` as at most ``parts`` batches of consecutive rows (whole pairs for a pair batch), as
    even as the count allows."""
    chunks = [c.tolist() for c in np.array_split(np.arange(units(batch)), min(parts, units(batch)))]
    return [take_rows(batch, unit_rows(batch, chunk)) for chunk in chunks]


def iterate_batches(
    examples: list[Example],
    batch_size: int,
    max_seq_length: int,
    *,
    packing: bool = False,
    bucket_by_length: bool = True,
    seed: int = 0,
    epoch: int = 0,
    loop: bool = False,
    start: int = 0,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """Yield the batches of ``epoch`` from batch index ``start`` on; with ``loop``, continue into
    the following epochs forever (each batch carries its ``epoch`` and ``index``)."""
    while True:
        plan = batch_order(
            examples,
            batch_size,
            max_seq_length,
            packing=packing,
            bucket_by_length=bucket_by_length,
            seed=seed,
            epoch=epoch,
            drop_last=drop_last,
        )
        for index in range(start, len(plan)):
            yield build_batch(examples, plan[index], max_seq_length, packing=packing, epoch=epoch, index=index)
        if not loop:
            return
        epoch, start = epoch + 1, 0


def plan_padding(examples: list[Example], plan: list[list[list[int]]], max_seq_length: int) -> float:
    """Padding share of a whole epoch's plan, computed from lengths alone (no arrays built)."""
    used = total = 0
    for rows in plan:
        fills = [sum(positions(examples[i], max_seq_length) for i in row) for row in rows]
        used += sum(fills)
        total += len(rows) * padded_width(max(fills))
    return 1.0 - used / total
