"""Per-sequence log-probabilities of a batch's trained tokens, without full logits.

Objectives that compare whole answers (pairs, completions) need log p(answer | prompt) per row, not
the one summed loss supervised training uses. ``macft.models.head.position_losses`` gives the loss at
every trained position through the memory-lean head; this module sums them per row.

    select, targets, weights, rows = trained_positions(batch.targets, batch.loss_mask)    # host side
    logps, tokens = sequence_logps(model, (batch.inputs, select, targets, weights, rows), chunk_size=512)
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from macft.models.head import position_losses, selected_positions


def trained_positions(targets: mx.array, loss_mask: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """``selected_positions`` plus the row each selected position belongs to."""
    picked, weights, select = selected_positions(targets, loss_mask)
    rows = np.asarray(select) // targets.shape[1]
    return select, picked, weights, mx.array(rows.astype(np.int32))


def row_sums(values: mx.array, rows: mx.array, num_rows: int) -> mx.array:
    """Sum ``values`` (one per selected position) into their rows."""
    owner = (rows[None, :] == mx.arange(num_rows, dtype=rows.dtype)[:, None]).astype(values.dtype)
    return owner @ values


def sequence_logps(model: nn.Module, arrays: tuple, chunk_size: int, training: bool = True) -> tuple[mx.array, mx.array]:
    """(log p of each row's trained tokens, trained tokens per row) for prepared
    ``(inputs, select, targets, weights, rows)``."""
    inputs, select, targets, weights, rows = arrays[:5]
    losses = position_losses(model, inputs, select, targets, weights, chunk_size=chunk_size, training=training)
    return row_sums(-losses, rows, inputs.shape[0]), row_sums(weights, rows, inputs.shape[0])


def log_sigmoid(x: mx.array) -> mx.array:
    return -nn.softplus(-x)
