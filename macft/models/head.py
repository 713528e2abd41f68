"""The output head applied to trained positions only: per-position losses without the full logits.

With Gemma 3's 262,144-token vocabulary the logits dwarf everything else a step keeps, and most
positions (prompt tokens, padding) are not trained on anyway. So a loss runs the model's body to
get hidden states, keeps only the trained positions (``selected_positions``, done on the host), and
applies the output head to them ``chunk_size`` rows at a time:

- a frozen head (LoRA and the PEFT methods) goes through ``frozen_head_loss``, which applies the
  head one vocabulary slice at a time with a running log-sum-exp and forms the chunk's gradient with
  respect to the hidden states in the same pass (softmax minus one-hot, times the head weight), so
  at most one block of rows × slice logits exists at a time and nothing is recomputed; a quantized
  head is dequantized (or, on Metal/CUDA, multiplied quantized) one slice at a time as well;
- a trainable head (full fine-tuning) runs each chunk under ``mx.checkpoint`` instead, which frees
  the logits after the forward pass and recomputes them in the backward pass.

Chunks are chained with ``mx.depends`` so that MLX evaluates them one after another. Every
objective (``macft.objectives``) and the importance matrix of an export read their token losses here.

    targets, weights, select = selected_positions(batch.targets, batch.loss_mask)
    losses = position_losses(model, batch.inputs, select, targets, weights, chunk_size=chunk_size)  # one per position

Any module exposes the body/head split either as mlx-lm models do (``model.model`` then ``lm_head``
or the tied ``embed_tokens``) or with a ``body_and_head()`` method; ``full_logits_losses`` covers the rest.
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from macft.backend import detect
from macft.models.quantized import QUANTIZED, float_weight

# Logits elements per block of rows × vocabulary slice (16 MiB in float32). MLX allocates the
# buffers of work it has scheduled ahead of computing it, so several blocks are alive at once:
# small blocks keep that cheap, and the matmuls stay large enough to run at full speed.
LOGITS_BUDGET = 1 << 22
AUTO_CHUNK_ROWS = 512  # trained positions per loss chunk in auto mode
SELECT_MULTIPLE = 64  # pad the selected-position count to this multiple so compiled shapes repeat
SLICE_MULTIPLE = 1024  # vocabulary slices are a multiple of this many rows of the head

# e^x = 2^r · e^g with r = round(x / ln 2) and |g| <= ln(2)/2. ln 2 is split in two (Cody and Waite) so that
# r · LN2_HIGH is exact and g keeps its precision even at r = -126; adding and subtracting ROUNDING
# (1.5 · 2^23) rounds a float32 to an integer without a floor, which would stop the compiler vectorising.
LN2_HIGH, LN2_LOW = 0.693359375, -2.12194440e-4
ROUNDING = 12582912.0
# Degree-5 polynomial for e^g on |g| <= ln(2)/2 with the least maximum relative error (9e-8 exactly,
# 2e-7 in float32) among those with constant term 1, so that e^0, every row's largest term, is exactly 1.
EXP_POLYNOMIAL = (1.0, 0.9999997071868425, 0.4999914952509256, 0.1666763619952564, 0.04189793004555571, 0.008290314725612632)


def auto_chunk_size(vocab: int | None, requested: int = 0) -> int:
    if requested > 0:
        return requested
    if vocab is None:  # the full-logits fallback does not chunk
        return 1 << 30
    return AUTO_CHUNK_ROWS


def auto_vocab_slice(vocab: int, rows: int) -> int:
    """Head rows per slice so that one block of logits stays within ``LOGITS_BUDGET``."""
    size = max(SLICE_MULTIPLE, LOGITS_BUDGET // max(rows, 1) // SLICE_MULTIPLE * SLICE_MULTIPLE)
    return min(vocab, size)


def vocab_size(model: nn.Module) -> int | None:
    split = body_and_head(model)
    return split[1].weight.shape[0] if split else None


def body_and_head(model: nn.Module) -> tuple[Callable[[mx.array, Any], mx.array], nn.Module] | None:
    """(body(inputs, cache) -> hidden states, output head module), or None when not exposed."""
    if hasattr(model, "body_and_head"):
        return model.body_and_head()
    if isinstance(model, dict) and "model" not in model and isinstance(model.get("language_model"), nn.Module):
        model = model["language_model"]  # mlx-lm's multimodal wrappers (qwen3_5) hold the text model here
    body = model.get("model") if isinstance(model, dict) else None
    if body is None:
        return None
    if "lm_head" in model:
        return body, model["lm_head"]
    if "embed_tokens" in body:
        return body, body["embed_tokens"]
    return None


def project(head: nn.Module, hidden: mx.array) -> mx.array:
    """Logits from hidden states; a quantized head is dequantized first where that is faster."""
    if isinstance(head, QUANTIZED) and detect().dequantize_for_matmul:
        logits = hidden @ float_weight(head).astype(hidden.dtype).T
        return logits + head.bias if "bias" in head else logits
    if isinstance(head, (nn.Embedding, nn.QuantizedEmbedding)):
        return head.as_linear(hidden)
    return head(hidden)


def selected_positions(targets: mx.array, loss_mask: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """The trained positions of a batch, flattened: (targets, weights, indices), padded with
    zero-weight entries to a multiple of ``SELECT_MULTIPLE`` (the last chunk may be shorter)."""
    mask = np.asarray(loss_mask).reshape(-1)
    index = np.flatnonzero(mask > 0).astype(np.int32)
    padded = max(SELECT_MULTIPLE, -(-len(index) // SELECT_MULTIPLE) * SELECT_MULTIPLE)
    select = np.zeros(padded, np.int32)
    select[: len(index)] = index
    weights = np.zeros(padded, np.float32)
    weights[: len(index)] = mask[index]
    flat_targets = np.asarray(targets).reshape(-1)
    return mx.array(flat_targets[select]), mx.array(weights), mx.array(select)


def token_losses(logits: mx.array, targets: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def position_losses(
    model: nn.Module,
    inputs: mx.array,
    select: mx.array,
    targets: mx.array,
    weights: mx.array,
    *,
    chunk_size: int,
    vocab_slice: int = 0,
    cache: Any = None,
    training: bool = True,
) -> mx.array:
    """−log p(target) × weight at every selected position (zero on padding entries). SFT sums them;
    alignment objectives sum them per answer (``macft.objectives.sequences``). ``training=False`` skips the
    gradient work of the frozen-head path (for validation and reference passes); ``vocab_slice`` is
    the head rows per slice (0: ``auto_vocab_slice``)."""
    split = body_and_head(model)
    if split is None:
        return full_logits_losses(model, inputs, select, targets, weights, cache=cache)
    body, head = split
    hidden = body(inputs, cache)
    hidden = hidden.reshape(-1, hidden.shape[-1])[select]

    if sliced_head(head, training):
        rows = vocab_slice or auto_vocab_slice(head.weight.shape[0], min(chunk_size, hidden.shape[0]))
        chunk_losses = frozen_head_loss(head, rows, with_gradient=training)
    else:
        chunk_losses = plain_head_loss(head, checkpoint=training and hidden.shape[0] > chunk_size)
    parts: list[mx.array] = []
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        # Chained so that one chunk's logits are freed before the next chunk's are computed; MLX
        # would otherwise be free to schedule all chunks at once.
        chunk = hidden[start:end] if not parts else mx.depends(hidden[start:end], parts[-1])
        parts.append(chunk_losses(chunk, targets[start:end], weights[start:end]))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def sliced_head(head: nn.Module, training: bool = True) -> bool:
    """Whether the loss applies ``head`` in vocabulary slices: a plain or quantized matrix that takes
    no gradient (frozen, or any matrix head when only scoring)."""
    matrix_head = isinstance(head, (nn.Linear, nn.Embedding, *QUANTIZED))
    return matrix_head and not (training and tree_flatten(head.trainable_parameters()))


def describe_loss(model: nn.Module, chunk_size: int) -> str:
    """How training applies this model's loss, for the run summary."""
    split = body_and_head(model)
    if split is None:
        return "loss over the full logits (the model exposes no output head)"
    if not sliced_head(split[1]):
        return f"chunked loss over trained positions only ({chunk_size} rows per chunk)"
    smallest = auto_vocab_slice(split[1].weight.shape[0], chunk_size)
    return f"chunked loss over trained positions only (up to {chunk_size} rows × vocabulary slices of at least {smallest} tokens)"


def head_slice(head: nn.Module, start: int, end: int, after: mx.array) -> tuple[mx.array, mx.array | None, dict | None]:
    """Rows ``start:end`` of a matrix head: (float weight or packed weight, bias, quantized-matmul
    arguments). The float weight is dequantized unless the backend multiplies quantized weights
    directly, in which case the packed rows and their scales come back instead. A dequantization
    waits for ``after`` (the previous slice's result): otherwise MLX may dequantize every slice,
    the whole head, before using the first."""
    bias = head.bias[start:end] if "bias" in head else None
    if isinstance(head, QUANTIZED) and not detect().dequantize_for_matmul:
        quantized = {
            "scales": head.scales[start:end],
            "biases": head["biases"][start:end] if "biases" in head else None,
            "group_size": head.group_size,
            "bits": head.bits,
            "mode": head.mode,
        }
        return head.weight[start:end], bias, quantized
    packed = mx.depends(head.weight, after) if isinstance(head, QUANTIZED) else None
    return float_weight(head, packed=packed, rows=(start, end)), bias, None


@mx.compile
def exp_nonpositive(x: mx.array) -> mx.array:
    """e^x for float32 x <= 0 (shifted logits, rescale factors) from multiply-adds, for backends whose
    ``mx.exp`` is slow (``Backend.scalar_transcendentals``): compiled, the chain fuses into a few
    kernels the C++ compiler vectorises. Relative error below 3e-7 (``mx.exp``'s own reaches 4e-6 near -88, from
    rounding x / ln 2); it underflows to exactly 0 below about -87.7, as ``mx.exp`` does below -88."""
    x = mx.maximum(x, -88.0)  # r >= -127, whose exponent field 0 makes 2^r exactly 0
    r = (x * 1.4426950408889634 + ROUNDING) - ROUNDING
    g = (x - r * LN2_HIGH) - r * LN2_LOW
    c, g2 = EXP_POLYNOMIAL, g * g
    # Estrin's scheme rather than Horner's: a shallower chain, which MLX fuses into fewer kernels.
    poly = (c[0] + c[1] * g) + g2 * ((c[2] + c[3] * g) + g2 * (c[4] + c[5] * g))
    two_to_r = mx.view(mx.left_shift(r.astype(mx.int32) + 127, 23), mx.float32)  # r written into the exponent field
    return poly * two_to_r


def frozen_head_loss(head: nn.Module, vocab_slice: int, with_gradient: bool = True) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    """Weighted cross-entropy of each row of one chunk through a frozen matrix head, with a custom backward.

    The head is applied ``vocab_slice`` rows at a time with a running log-sum-exp (as flash
    attention does over keys), so neither the chunk's full logits nor a dequantized copy of a
    quantized head ever exist. The same pass also accumulates d(loss)/d(hidden) =
    (softmax − one-hot) · w · W, rescaled whenever the running maximum grows, and returns it as a
    second output; the backward pass only scales it. So a slice costs two matmuls with the head,
    and nothing is recomputed.
    """
    vocab = head.weight.shape[0]
    exp = exp_nonpositive if detect().scalar_transcendentals else mx.exp  # its arguments are all <= 0

    def times_head(x: mx.array, weight: mx.array, quantized: dict | None, transpose: bool) -> mx.array:
        if quantized is not None:
            return mx.quantized_matmul(x, weight, transpose=transpose, **quantized)
        return x @ (weight.astype(x.dtype).T if transpose else weight.astype(x.dtype))

    def forward(h, t, w):
        peak = norm = grad = None
        for start in range(0, vocab, vocab_slice):
            if norm is not None:  # finish the previous slice first: one slice alive at a time
                h = mx.depends(h, norm if grad is None else grad)
            weight, bias, quantized = head_slice(head, start, min(start + vocab_slice, vocab), after=h)
            logits = times_head(h, weight, quantized, transpose=True).astype(mx.float32)
            if bias is not None:
                logits = logits + bias
            new_peak = logits.max(axis=-1) if peak is None else mx.maximum(peak, logits.max(axis=-1))
            shifted = exp(logits - new_peak[:, None])
            if peak is None:
                norm = shifted.sum(axis=-1)
            else:
                rescale = exp(peak - new_peak)
                norm = norm * rescale + shifted.sum(axis=-1)
            if with_gradient:
                part = times_head(shifted.astype(h.dtype), weight, quantized, transpose=False)
                grad = part if grad is None else grad * rescale[:, None].astype(h.dtype) + part
            peak = new_peak
        target_rows = float_weight(head, packed=mx.depends(head.weight, peak), index=t).astype(h.dtype)
        picked = (h * target_rows).sum(axis=-1).astype(mx.float32)
        if "bias" in head:
            picked = picked + head.bias[t]
        losses = (peak + mx.log(norm) - picked) * w
        if not with_gradient:
            return losses, None
        hidden_grad = (grad / norm[:, None].astype(h.dtype) - target_rows) * w[:, None].astype(h.dtype)
        return losses, hidden_grad

    if not with_gradient:
        return lambda h, t, w: forward(h, t, w)[0]

    @mx.custom_function
    def loss_and_hidden_grad(h, t, w):
        return forward(h, t, w)

    @loss_and_hidden_grad.vjp
    def backward(primals, cotangents, outputs):
        _, t, w = primals
        # Targets and loss weights are data: they get zero cotangents.
        return cotangents[0][:, None] * outputs[1], mx.zeros_like(t), mx.zeros_like(w)

    return lambda h, t, w: loss_and_hidden_grad(h, t, w)[0]


def plain_head_loss(head: nn.Module, checkpoint: bool) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    """Weighted cross-entropy of each row of one chunk through any head, differentiated by MLX (under
    ``mx.checkpoint`` when several chunks must not keep their logits for the backward pass)."""

    def chunk_loss(head_params, h, t, w):
        # The head's trainable weights are passed in (not closed over) so they get their gradient
        # through the checkpoint; targets and weights need none.
        head.update(head_params)
        t, w = mx.stop_gradient(t), mx.stop_gradient(w)
        return token_losses(project(head, h), t) * w

    # One chunk has nothing to free early, so recomputing its logits would be wasted work.
    run = mx.checkpoint(chunk_loss) if checkpoint else chunk_loss
    return lambda h, t, w: run(head.trainable_parameters(), h, t, w)


def full_logits_losses(
    model: nn.Module, inputs: mx.array, select: mx.array, targets: mx.array, weights: mx.array, *, cache: Any = None
) -> mx.array:
    """The same per-position losses from the model's full logits, for modules without a body/head split."""
    logits = model(inputs, cache=cache)
    logits = logits.reshape(-1, logits.shape[-1])[select]
    return token_losses(logits, targets) * weights
