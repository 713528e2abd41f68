"""Q4_K, Q5_K and Q6_K: super-blocks of 256 weights, encoded in numpy by ggml's reference algorithms.

llama.cpp's ``llama-quantize`` without an importance matrix calls ggml's ``quantize_row_q*_K_ref``;
the encoders here implement the same algorithms, vectorised over every super-block of a chunk:

* Q4_K / Q5_K: 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min found by
  ``make_qkx2_quants``, both scaled by the super-block's float16 d and dmin;
* Q6_K: 16 sub-blocks of 16 with an int8 scale found by ``make_qx_quants`` (weights x², 19 trial
  scales around the max-abs one).

With importance, the weighted searches use per-weight weights importance·sqrt(σ² + x²) (σ² the
super-block's mean square: keeps small weights in play), a finer and wider grid of trial scales for
Q4_K / Q5_K, and their 6-bit scales and mins fitted by a weighted search (``_qp``) instead of
rounding max/63. Decoding is gguf-py's. Q4_K and Q5_K map exactly onto the affine form per 32
weights (scale d·sc, bias −dmin·mn); Q6_K's groups of 16 have none.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from macft.quants.base import QuantType, f16_at, f16_bytes, gguf_py_decoder, nearest
from macft.quants.searches import EPS, make_qkx2_quants, make_qx_quants, search_weights

QK_K = 256


def _scale_min_k4(x: np.ndarray, nmax: int, rmin: float, nstep: int, importance: np.ndarray | None = None):
    """The Q4_K/Q5_K super-block header and levels for blocks ``x`` (nb, 256).

    Without ``importance`` this is ggml's reference; with it (nb, 256), the weighted search."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    if importance is None:
        av_x = np.sqrt((sub * sub).sum(axis=1) / np.float32(32))
        weights = av_x[:, None] + np.abs(sub)
        levels, scales, mins = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        max_scale = np.maximum(scales.max(axis=1), 0)
        max_min = np.maximum(mins.max(axis=1), 0)
        inv_scale = np.where(max_scale > 0, np.float32(63) / np.where(max_scale > 0, max_scale, 1), 0).astype(np.float32)
        inv_min = np.where(max_min > 0, np.float32(63) / np.where(max_min > 0, max_min, 1), 0).astype(np.float32)
        ls = np.clip(nearest(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
        lm = np.clip(nearest(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
        d = (max_scale / np.float32(63)).astype(np.float16)
        dmin = (max_min / np.float32(63)).astype(np.float16)
    else:
        weights = search_weights(x, importance.reshape(nb, 256), 2 * np.square(x).mean(axis=1)).reshape(nb * 8, 32)
        levels, scales, mins = make_qkx2_quants(sub, weights, nmax, -0.9, 0.1, 18)
        sub_weight = weights.sum(axis=1).reshape(nb, 8)
        ls, d = _qp(scales.reshape(nb, 8), 63, sub_weight)
        lm, dmin = _qp(mins.reshape(nb, 8), 63, sub_weight)
        d, dmin = d.astype(np.float16), dmin.astype(np.float16)
    # Re-derive the levels from the rounded 6-bit scales, exactly as the decoder will see them.
    d_sub = d.astype(np.float32)[:, None] * ls
    m_sub = dmin.astype(np.float32)[:, None] * lm
    x8 = x.reshape(nb, 8, 32)
    safe = np.where(d_sub != 0, d_sub, 1)[..., None]
    fresh = np.clip(nearest((x8 + m_sub[..., None]) / safe), 0, nmax)
    levels = np.where((d_sub != 0)[..., None], fresh, levels.reshape(nb, 8, 32)).astype(np.uint8)
    packed = np.empty((nb, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    header = np.concatenate([f16_bytes(d), f16_bytes(dmin), packed], axis=1)
    return header, levels.reshape(nb, 256)


def _k_scales(blocks: np.ndarray):
    """Per 32-weight sub-block scale d·sc and bias −dmin·mn, from the header's 6-bit table."""
    sc, mn = gguf_quants.Q4_K.get_scale_min(blocks[:, 4:16])
    return f16_at(blocks, 0) * sc.astype(np.float32), -(f16_at(blocks, 2) * mn.astype(np.float32))


def _qp(values: np.ndarray, nmax: int, weights: np.ndarray):
    """Non-negative ``values`` (n, k) as levels 0..nmax times one scale per row, by weighted search
    over trial scales around max/nmax, then the least-squares scale for the chosen levels."""
    f32 = np.float32
    top = values.max(axis=1)
    empty = top < EPS
    top = np.where(empty, f32(1), top)

    def levels_for(iscale):
        return np.minimum(nmax, nearest(iscale[:, None] * values))

    def error(iscale):
        return (weights * np.square(values - levels_for(iscale) / iscale[:, None])).sum(axis=1)

    best_iscale = f32(nmax) / top
    best = error(best_iscale)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale = (f32(0.1) * f32(step) + f32(nmax)) / top
        err = error(iscale)
        better = err < best
        best_iscale = np.where(better, iscale, best_iscale)
        best = np.where(better, err, best)
    levels = levels_for(best_iscale)
    wl = weights * levels
    suml2 = (wl * levels).sum(axis=1)
    scale = np.where(suml2 > 0, (wl * values).sum(axis=1) / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    return np.where(empty[:, None], 0, levels).astype(np.uint8), np.where(empty, f32(0), scale).astype(f32)


def _pack_low_nibbles(levels: np.ndarray) -> np.ndarray:
    # Each 64-weight chunk stores weight j in the low nibble and weight j+32 in the high one.
    pairs = (levels & 0xF).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Each 32 bytes hold two sub-blocks: the low nibbles, then the high nibbles."""
    chunks = qs.reshape(qs.shape[0], -1, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (chunks & 0x0F).reshape(qs.shape[0], -1)


# ---------------------------------------------------------------------------- Q4_K


def _q4_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    header, levels = _scale_min_k4(x, nmax=15, rmin=-1.0, nstep=20, importance=importance)
    return np.concatenate([header, _pack_low_nibbles(levels)], axis=1)


def _q4_k_affine(blocks: np.ndarray):
    scales, biases = _k_scales(blocks)
    return _unpack_low_nibbles(blocks[:, 16:144]), scales, biases


# ---------------------------------------------------------------------------- Q5_K


def _q5_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    header, levels = _scale_min_k4(x, nmax=31, rmin=-0.5, nstep=15, importance=importance)
    high = (levels >> 4).reshape(-1, 4, 2, 32).astype(np.uint8)
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = (high << shifts[None, :, :, None]).sum(axis=(1, 2), dtype=np.uint8)
    return np.concatenate([header, qh, _pack_low_nibbles(levels)], axis=1)


def _q5_k_affine(blocks: np.ndarray):
    scales, biases = _k_scales(blocks)
    # bit j of byte l is the fifth bit of weight l of sub-block j
    qh = blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    high = (qh & 1).reshape(blocks.shape[0], -1)
    return _unpack_low_nibbles(blocks[:, 48:176]) | (high << 4), scales, biases


# ---------------------------------------------------------------------------- Q6_K


def _q6_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    weights = None if importance is None else importance.reshape(nb * 16, 16)
    levels, scales = make_qx_quants(x.reshape(nb * 16, 16), nmax=32, w=weights)
    scales = scales.reshape(nb, 16)
    rows = np.arange(nb)
    max_scale = scales[rows, np.abs(scales).argmax(axis=1)]
    empty = np.abs(max_scale) < EPS
    iscale = np.float32(-128) / np.where(empty, np.float32(1), max_scale)
    d = (np.float32(1) / iscale).astype(np.float16)
    sc = np.minimum(127, nearest(iscale[:, None] * scales)).astype(np.int8)
    d_sub = d.astype(np.float32)[:, None] * sc
    x16 = x.reshape(nb, 16, 16)
    fresh = np.clip(nearest(x16 / np.where(d_sub != 0, d_sub, 1)[..., None]), -32, 31) + 32
    levels = np.where((d_sub != 0)[..., None], fresh, levels.reshape(nb, 16, 16)).astype(np.uint8)
    quarters = levels.reshape(nb, 2, 4, 32)  # two 128-weight halves, each in four runs of 32
    low = quarters & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    high = quarters >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    block = np.concatenate(
        [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), f16_bytes(d)], axis=1
    )
    block[empty] = 0
    return block


def _k_type(qtype: Q, block_bytes: int, encode_blocks, fallback: Q, affine=None, bits: int = 0) -> QuantType:
    """The record of a K-quant whose encoder ``encode_blocks(x, importance=None)`` works on super-blocks."""

    def encode(rows: np.ndarray) -> np.ndarray:
        return encode_blocks(rows.reshape(-1, QK_K)).reshape(rows.shape[0], -1)

    def encode_weighted(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
        return encode_blocks(rows.reshape(-1, QK_K), np.ascontiguousarray(importance).reshape(-1, QK_K)).reshape(rows.shape[0], -1)

    return QuantType(
        qtype,
        block_size=QK_K,
        block_bytes=block_bytes,
        decode=gguf_py_decoder(qtype),
        encode=encode,
        encode_weighted=encode_weighted,
        affine=affine,
        affine_bits=bits,
        fallback=fallback,
    )


TYPES = (
    _k_type(Q.Q4_K, 144, _q4_k, fallback=Q.Q5_0, affine=_q4_k_affine, bits=4),
    _k_type(Q.Q5_K, 176, _q5_k, fallback=Q.Q5_1, affine=_q5_k_affine, bits=5),
    _k_type(Q.Q6_K, 210, _q6_k, fallback=Q.Q8_0),
)
