"""Packing: several examples per row, and the attention mask that keeps them apart.

``pack_rows`` assigns examples to rows of a fixed number of positions (best-fit decreasing).
``packing_cache(model, segment_ids)`` gives an mlx-lm model a per-layer "cache"
(``macft.models.attention.MaskSource``) whose only job is to supply a block-diagonal causal mask
(sliding-window where the layer asks for one): a token attends only to earlier tokens of its own
example. With block attention on (``enable_block_attention``) the mask is described, not built, so
long packed rows never hold an L × L array. The cache leaves keys and values untouched and has
offset 0, so RoPE positions run across the row; RoPE scores depend only on the distance between
tokens, so every example sees exactly the attention scores it would see unpacked.

    logits = model(batch.inputs, cache=packing_cache(model, batch.segment_ids))
"""

from __future__ import annotations

import bisect
from typing import Any

import mlx.core as mx

from macft.errors import MacftError
from macft.models.attention import MaskSource, block_rows, masks_cache


def has_recurrent_blocks(model: Any) -> bool:
    """Whether some blocks keep a recurrent state (Qwen3.5's linear attention) instead of attending over a KV cache."""
    return any(not hasattr(layer, "self_attn") for layer in model.layers)


def pack_rows(lengths: list[int], capacity: int, order: list[int]) -> list[list[int]]:
    """Group example indices into rows holding at most ``capacity`` positions each.

    Longest first, each into the fullest row it still fits (best fit); ``order`` breaks ties
    between equal lengths, so a shuffled order gives a different but equally tight packing.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free positions, row index), sorted
    rank = {index: position for position, index in enumerate(order)}
    for index in sorted(order, key=lambda i: (-lengths[i], rank[i])):
        size = min(lengths[index], capacity)
        slot = bisect.bisect_left(free, (size, -1))
        if slot == len(free):
            rows.append([index])
            remaining, row = capacity - size, len(rows) - 1
        else:
            remaining, row = free.pop(slot)
            rows[row].append(index)
            remaining -= size
        if remaining > 0:
            bisect.insort(free, (remaining, row))
    return rows


def packing_cache(model: Any, segment_ids: mx.array | None) -> list[MaskSource | None] | None:
    """The ``cache=`` argument that makes ``model`` attend within packed segments only; ``None``
    (the model's own causal mask) when the batch is not packed."""
    if segment_ids is None:
        return None
    if has_recurrent_blocks(model):
        raise MacftError("This model's linear-attention blocks carry their state from one packed example into the next; set data.packing: false.")
    return masks_cache(model, segment_ids, block_rows(model))
