"""Attention over long sequences without the L × L matrices: query blocks, recomputed backward.

MLX's fused attention (``mx.fast.scaled_dot_product_attention``) forms the whole batch × heads ×
L × L score matrix on a CPU, and its backward pass keeps the probabilities of every layer until the
gradients reach it: 1 GiB per layer at 8,192 tokens for Gemma 3 270M's four heads, 16 GiB at 32,768.
``block_attention`` computes the same attention ``rows`` queries at a time, each block against only
the keys it may see (those before it; for a sliding-window layer, only its window), and its backward
pass (a custom VJP) recomputes each block's probabilities from q, k and v instead of keeping them. So
at most one block of scores exists at a time, in the forward pass and in the backward pass, and a
sliding-window layer's work grows linearly with the length.

Nothing of mlx-lm's architectures is re-implemented: ``enable_block_attention(model, rows)`` hands
the model's body a mask source (the ``cache=`` argument, in the place of a KV cache) whose masks are
``BlockMask`` descriptions rather than arrays, and puts a dispatcher in place of
``scaled_dot_product_attention`` in the modules of the model's attention layers: given a
``BlockMask`` it runs ``block_attention``, given anything else mlx-lm's own function, so generation
and every other model are unchanged. Packed rows (``macft.data.packing``) pass their segment ids
through the same mask source, so examples stay apart in blocks too.

    enable_block_attention(model, rows=512)
    hidden = model.model(tokens)                       # block attention, causal (and windowed)
    hidden = model.model(tokens, cache=masks_cache(model, segment_ids))   # packed rows

Per block the scores are computed and normalised exactly as MLX's own composite attention does
(queries scaled first, float32 softmax), so outputs and gradients agree to float rounding.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn


# mlx-lm's attention function, by the module whose global we replaced
_ORIGINALS: dict[str, Callable] = {}


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Which keys each query may see, described instead of materialised: causal, within ``window``
    positions when given, and within the same packed segment when ``segment_ids`` ([B, L]) is given."""

    rows: int  # queries per block
    window: int | None = None
    segment_ids: mx.array | None = None


class MaskSource:
    """A stand-in for an mlx-lm KV cache during a full-sequence forward pass: it stores nothing and
    only answers ``make_mask`` (offset 0, keys and values pass through). With ``rows`` it describes
    masks for ``block_attention``; without, it builds mlx-lm's boolean mask arrays."""

    offset = 0

    def __init__(self, segment_ids: mx.array | None = None, rows: int | None = None):
        self.segment_ids = segment_ids
        self.rows = rows
        self._masks: dict[tuple, Any] = {}

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None) -> Any:
        if self.segment_ids is not None and N != self.segment_ids.shape[1]:
            raise ValueError(f"packed segment ids cover {self.segment_ids.shape[1]} positions, the input has {N}")
        key = (N, return_array, window_size)
        if key not in self._masks:
            if self.rows and not return_array:
                self._masks[key] = BlockMask(self.rows, window_size, self.segment_ids)
            else:
                self._masks[key] = dense_mask(N, window_size, self.segment_ids)
        return self._masks[key]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values


def dense_mask(length: int, window: int | None = None, segment_ids: mx.array | None = None) -> mx.array:
    """The boolean mask a ``BlockMask`` describes, for MLX's fused attention: [L, L], or [B, 1, L, L] with segments.

    Padding (segment 0) attends causally to other padding, so no row of the mask is empty and the
    softmax never produces NaN there (a NaN times a zero loss weight would still be NaN)."""
    mask = allowed(mx.arange(length), mx.arange(length), window, segment_ids, segment_ids)
    return mask if segment_ids is None else mx.expand_dims(mask, 1)


def allowed(q_pos: mx.array, k_pos: mx.array, window: int | None, q_seg: mx.array | None, k_seg: mx.array | None) -> mx.array:
    """[L_q, L_k] (or [B, L_q, L_k] with segments): whether each query may see each key."""
    mask = q_pos[:, None] >= k_pos[None, :]
    if window is not None:
        mask = mask & (q_pos[:, None] < k_pos[None, :] + window)
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
    return mask


def key_range(start: int, end: int, window: int | None) -> tuple[int, int]:
    """The keys queries ``start:end`` may see: from the oldest in the first query's window to the last query."""
    return (0 if window is None else max(0, start - window + 1)), end


def block_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: BlockMask) -> mx.array:
    """softmax(q·kᵀ·scale + mask)·v for q [B, H, L, D] and k, v [B, H_kv, L, D] (H a multiple of
    H_kv: grouped-query heads), ``mask.rows`` queries at a time; the backward pass recomputes."""
    batch, heads, length, dim = queries.shape
    kv_heads, value_dim = keys.shape[1], values.shape[-1]
    if keys.shape[2] != length:
        raise ValueError(f"block attention needs as many keys as queries, got {keys.shape[2]} and {length}")
    repeats = heads // kv_heads
    rows, window, segments = max(1, mask.rows), mask.window, mask.segment_ids
    blocks = [(start, min(start + rows, length)) for start in range(0, length, rows)]

    def grouped(x: mx.array, start: int, end: int) -> mx.array:
        """Queries (or their gradients) ``start:end`` as [B, H_kv, repeats × n, D]: one product per kv head."""
        part = x.reshape(batch, kv_heads, repeats, length, x.shape[-1])[:, :, :, start:end]
        return part.reshape(batch, kv_heads, repeats * (end - start), x.shape[-1])

    def ungrouped(parts: list[mx.array]) -> mx.array:
        """The inverse of ``grouped`` over all blocks, concatenated along the positions."""
        shaped = [p.reshape(batch, kv_heads, repeats, -1, p.shape[-1]) for p in parts]
        whole = shaped[0] if len(shaped) == 1 else mx.concatenate(shaped, axis=3)
        return whole.reshape(batch, heads, length, whole.shape[-1])

    def probabilities(q: mx.array, k: mx.array, start: int, end: int) -> mx.array:
        """The block's attention probabilities, [B, H_kv, repeats × n, keys], as MLX's composite attention forms them."""
        low = key_range(start, end, window)[0]
        scores = (q * mx.array(scale, q.dtype)) @ k[:, :, low:end].swapaxes(-1, -2)
        scores = scores.reshape(batch, kv_heads, repeats, end - start, end - low)
        # Positions built after q's block arrives: otherwise MLX may build every block's mask at
        # once, L² booleans in all.
        q_pos, k_pos = mx.depends([mx.arange(start, end), mx.arange(low, end)], q)
        seen = allowed(
            q_pos,
            k_pos,
            window,
            None if segments is None else segments[:, start:end],
            None if segments is None else segments[:, low:end],
        )
        seen = seen[:, None, None] if segments is not None else seen
        probs = mx.softmax(mx.where(seen, scores, mx.finfo(scores.dtype).min), axis=-1, precise=True)
        return probs.reshape(batch, kv_heads, repeats * (end - start), end - low)

    def forward(q, k, v):
        outs: list[mx.array] = []
        for start, end in blocks:
            # Chained so that one block's scores are freed before the next block's are formed.
            qb = grouped(q, start, end) if not outs else mx.depends(grouped(q, start, end), outs[-1])
            low = key_range(start, end, window)[0]
            outs.append(probabilities(qb, k, start, end) @ v[:, :, low:end])
        return ungrouped(outs)

    @mx.custom_function
    def attend(q, k, v):
        return forward(q, k, v)

    @attend.vjp
    def attend_vjp(primals, cotangent, output):
        q, k, v = primals
        # d(softmax) needs rowsum(P ∘ dP) = rowsum(dO ∘ O), which the output gives without the scores.
        delta_all = (cotangent.astype(mx.float32) * output.astype(mx.float32)).sum(axis=-1, keepdims=True)
        dk = mx.zeros((batch, kv_heads, length, dim), mx.float32)
        dv = mx.zeros((batch, kv_heads, length, value_dim), mx.float32)
        dqs: list[mx.array] = []
        for start, end in blocks:
            low = key_range(start, end, window)[0]
            qb, dob = grouped(q, start, end), grouped(cotangent, start, end)
            if dqs:  # both sides of the block's products wait for the previous block (see forward)
                qb, dob = mx.depends([qb, dob], [dqs[-1], dk, dv])
            probs = probabilities(qb, k, start, end)
            dv[:, :, low:end] = dv[:, :, low:end] + (probs.swapaxes(-1, -2) @ dob.astype(probs.dtype))
            dprobs = dob.astype(mx.float32) @ v[:, :, low:end].astype(mx.float32).swapaxes(-1, -2)
            dscores = probs * (dprobs - grouped(delta_all, start, end))
            dqs.append((dscores @ k[:, :, low:end].astype(mx.float32)) * scale)
            dk[:, :, low:end] = dk[:, :, low:end] + (dscores.swapaxes(-1, -2) @ qb.astype(mx.float32)) * scale
        return ungrouped(dqs).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    return attend(queries, keys, values)


def _dispatching(original: Callable) -> Callable:
    """mlx-lm's ``scaled_dot_product_attention`` that routes a ``BlockMask`` to ``block_attention``."""

    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if isinstance(mask, BlockMask):
            if sinks is not None:
                raise ValueError("block attention does not support attention sinks")
            return block_attention(queries, keys, values, scale, mask)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention.original = original
    return scaled_dot_product_attention


def install_dispatcher(module_name: str) -> None:
    """Route ``BlockMask`` masks in an mlx-lm model module (once; other masks keep mlx-lm's path)."""
    module = sys.modules[module_name]
    current = getattr(module, "scaled_dot_product_attention", None)
    if current is None or hasattr(current, "original"):
        return
    module.scaled_dot_product_attention = _dispatching(current)


def decoder_body(model: nn.Module) -> nn.Module:
    """The module that builds the attention masks and runs the blocks: ``model.model`` (of the text
    model inside a multimodal wrapper), or the original body inside a prompt method's wrapper."""
    if "language_model" in model and "model" not in model:
        model = model["language_model"]
    body = model["model"]
    return getattr(body, "inner", body)


@lru_cache(maxsize=None)
def _block_body_class(base: type) -> type:
    def __call__(self, inputs, cache=None, *args, **kwargs):
        segment_ids = mask_only_segments(cache)
        if segment_ids is not False:
            cache = masks_cache(self, segment_ids, self.block_rows)
        return base.__call__(self, inputs, cache, *args, **kwargs)

    return type(f"Blocked{base.__name__}", (base,), {"__call__": __call__})


def mask_only_segments(cache: list | None) -> mx.array | None | bool:
    """The segment ids a list of mask sources carries (None without packing), or False when
    ``cache`` is a real cache (generation, prefix tuning), which is left alone."""
    if cache is None:
        return None
    sources = [c for c in cache if c is not None]
    if not sources or not all(isinstance(c, MaskSource) for c in sources):
        return False
    return sources[0].segment_ids


def masks_cache(body_or_model: nn.Module, segment_ids: mx.array | None, rows: int | None = None) -> list[MaskSource | None]:
    """The ``cache=`` list that gives every attention layer masks from one ``MaskSource``; blocks
    that attend over no KV cache (linear attention) get None, as without a cache."""
    source = MaskSource(segment_ids, rows)
    return [source if hasattr(layer, "self_attn") else None for layer in body_or_model.layers]


def enable_block_attention(model: nn.Module, rows: int) -> None:
    """Compute ``model``'s attention ``rows`` queries at a time in every full-sequence pass (training,
    scoring) from now on; calls with a generation cache keep mlx-lm's attention. Only this body
    instance changes class; other models of the same architecture are untouched."""
    body = decoder_body(model)
    for _, module in body.named_modules():
        if "self_attn" in module and isinstance(module["self_attn"], nn.Module):
            install_dispatcher(type(module["self_attn"]).__module__)
    if not type(body).__name__.startswith("Blocked"):
        body.__class__ = _block_body_class(type(body))
    object.__setattr__(body, "block_rows", rows)


def block_rows(model: nn.Module) -> int | None:
    """The query rows per block ``enable_block_attention`` set on ``model``, or None."""
    try:
        return getattr(decoder_body(model), "block_rows", None)
    except (KeyError, TypeError, AttributeError):
        return None
