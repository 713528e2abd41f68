"""Supervised fine-tuning (instruction tuning): maximise the likelihood of each example's trained tokens.

The loss is the masked next-token cross-entropy summed over trained positions and divided by their
number (over every accumulated batch, lane and rank), through the memory-lean output head of
``macft.models.head``; packed rows keep attention inside each example.

    loss = SupervisedLoss(chunk_size=512)
    loss_sum, tokens = loss(model, *loss.prepare(batch))
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from macft.data.batching import split_rows
from macft.data.examples import EXAMPLES
from macft.data.packing import packing_cache
from macft.models.head import position_losses, selected_positions
from macft.objectives.base import LossContext, Objective


def supervised_loss(model: nn.Module, inputs: mx.array, select: mx.array, targets: mx.array, weights: mx.array, **options: Any) -> tuple[mx.array, mx.array]:
    """(sum of the weighted token losses, trained tokens): ``position_losses`` (same keywords) summed."""
    return position_losses(model, inputs, select, targets, weights, **options).sum(), weights.sum()


class SupervisedLoss:
    """The loop's loss for supervised batches (see ``macft.objectives.base``)."""

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    def prepare(self, batch: Any) -> tuple[mx.array, ...]:
        targets, weights, select = selected_positions(batch.targets, batch.loss_mask)
        arrays = (batch.inputs, select, targets, weights)
        return arrays if batch.segment_ids is None else (*arrays, batch.segment_ids)

    def __call__(
        self, model: nn.Module, inputs: mx.array, select: mx.array, targets: mx.array, weights: mx.array, segment_ids: mx.array | None = None
    ) -> tuple[mx.array, mx.array]:
        cache = packing_cache(model, segment_ids)
        return supervised_loss(model, inputs, select, targets, weights, chunk_size=self.chunk_size, cache=cache)

    @staticmethod
    def split(batch: Any, parts: int) -> list:
        """The batch's rows in ``parts`` (the loop's lanes)."""
        return split_rows(batch, parts)

    def evaluate(self, model: nn.Module, *arrays: mx.array) -> tuple[mx.array, mx.array]:
        """The same loss without the work only gradients need."""
        inputs, select, targets, weights, *segment_ids = arrays
        cache = packing_cache(model, segment_ids[0] if segment_ids else None)
        return supervised_loss(model, inputs, select, targets, weights, chunk_size=self.chunk_size, cache=cache, training=False)

    @staticmethod
    def metrics(stats: list[float], count: float) -> dict[str, float]:
        return {}


OBJECTIVE = Objective(
    name="sft",
    title="supervised fine-tuning",
    when="you have examples of the answers you want: prompt/completion pairs, chats, instructions or plain text",
    options=(),
    data=EXAMPLES,
    loss=lambda context: SupervisedLoss(context.chunk_size),
    planned_step=True,
)
