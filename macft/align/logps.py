"""Per-position and per-sequence log-probabilities of a batch's trained tokens, without full logits.

Alignment objectives compare whole answers, so they need log p(answer | prompt) per row, not the
one summed loss SFT trains on. The same memory-lean head paths as ``macft.train.losses`` apply: the
body runs once, only the trained positions go through the output head, a frozen head is applied one
vocabulary slice at a time (its per-position custom backward), a trainable head per chunk.

    select, targets, weights, rows = trained_positions(batch)          # host side
    losses = position_losses(model, batch.inputs, select, targets, weights, chunk_size=512)
    logps = row_sums(-losses, rows, batch.inputs.shape[0])              # [rows]
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from macft.train.losses import (
    auto_vocab_slice,
    body_and_head,
    frozen_head_loss,
    project,
    selected_positions,
    sliced_head,
    token_losses,
)


def trained_positions(targets: mx.array, loss_mask: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """``selected_positions`` plus the row each selected position belongs to."""
    picked, weights, select = selected_positions(targets, loss_mask)
    rows = np.asarray(select) // targets.shape[1]
    return select, picked, weights, mx.array(rows.astype(np.int32))


def position_losses(
    model: nn.Module,
    inputs: mx.array,
    select: mx.array,
    targets: mx.array,
    weights: mx.array,
    *,
    chunk_size: int,
    training: bool = True,
) -> mx.array:
    """−log p(target) × weight at every selected position (zero on padding entries)."""
    split = body_and_head(model)
    if split is None:
        logits = model(inputs)
        logits = logits.reshape(-1, logits.shape[-1])[select]
        return token_losses(logits, targets) * weights
    body, head = split
    hidden = body(inputs, None)
    hidden = hidden.reshape(-1, hidden.shape[-1])[select]
    if sliced_head(head, training):
        rows = auto_vocab_slice(head.weight.shape[0], min(chunk_size, hidden.shape[0]))
        chunk_losses = frozen_head_loss(head, rows, with_gradient=training, per_position=True)
    else:
        chunk_losses = trainable_head_losses(head, checkpoint=training and hidden.shape[0] > chunk_size)
    parts: list[mx.array] = []
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        # Chained as in chunked_loss: one chunk's logits are freed before the next one's exist.
        chunk = hidden[start:end] if not parts else mx.depends(hidden[start:end], parts[-1])
        parts.append(chunk_losses(chunk, targets[start:end], weights[start:end]))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def trainable_head_losses(head: nn.Module, checkpoint: bool):
    """Per-position losses through a head that takes gradients (full fine-tuning)."""

    def run(head_params, h, t, w):
        head.update(head_params)
        return token_losses(project(head, h), mx.stop_gradient(t)) * mx.stop_gradient(w)

    step = mx.checkpoint(run) if checkpoint else run
    return lambda h, t, w: step(head.trainable_parameters(), h, t, w)


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

