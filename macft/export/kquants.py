"""K-quants (Q4_K, Q5_K, Q6_K) computed in numpy, following ggml's reference quantizers.

llama.cpp's ``llama-quantize`` without an importance matrix calls ggml's ``quantize_row_q*_K_ref``;
this module implements the same algorithms, vectorised over every sub-block of a tensor at once:

* Q4_K / Q5_K: super-blocks of 256 weights in 8 sub-blocks of 32, each with a 6-bit scale and a
  6-bit min found by ``make_qkx2_quants`` (a weighted least-squares search over candidate scales);
* Q6_K: 16 sub-blocks of 16 with an int8 scale found by ``make_qx_quants`` (weights x², 19 trial
  scales around the max-abs one).

The other GGUF types (F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1) come from ``gguf.quants.quantize``, which is
bit-exact with ggml already. ``quantize(rows, qtype)`` dispatches to whichever applies:

    packed = quantize(weight.astype(np.float32), GGMLQuantizationType.Q4_K)  # (rows, bytes per row)
    packed = quantize(weight, GGMLQuantizationType.Q4_K, importance=imatrix)  # imatrix: one weight per column

With ``importance`` (how much each input column matters: the mean of x² of the activations that
meet it, ``macft.export.imatrix``) the error each block minimises is ``sum_j importance[j]·(w_j − ŵ_j)²``,
the expected squared change of the layer's output on those activations. The weighted searches:

* Q4_K / Q5_K / Q5_1: the same least-squares scale-and-min search, with per-weight weights
  importance·sqrt(σ² + x²) (σ² the block's mean square: keeps small weights in play), a finer and
  wider grid of trial scales, and the super-block's 6-bit scales and mins themselves fitted by a
  weighted search (``_qp``) instead of rounding max/63;
* Q6_K / Q8_0 / Q5_0 / Q4_0: the symmetric trial-scale search of ``make_qx_quants`` with those weights.

A weighted search is a heuristic, so every block keeps whichever of the weighted and the plain
encoding has the smaller weighted error: an importance matrix never makes a block worse by the
measure it is meant to improve.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

QK_K = 256
_CHUNK_ELEMENTS = 1 << 21  # bounds the temporaries (a few dozen float32 copies of one chunk)
_EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS


WEIGHTED = (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_0)  # the types ``importance`` guides


def quantize(rows: np.ndarray, qtype: Q, importance: np.ndarray | None = None) -> np.ndarray:
    """Quantize a 2-D float32 array row by row; returns the packed blocks, one byte row per row.

    ``importance``: one non-negative weight per column (see the module docstring), or None.
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if importance is not None and qtype in WEIGHTED:
        return _quantize_weighted(rows, qtype, _check_importance(importance, rows.shape[1]))
    if qtype in (Q.F32, Q.F16):
        return gguf_quants.quantize(rows, qtype)
    n_rows, n_cols = rows.shape
    block = GGML_QUANT_SIZES[qtype][0]
    if n_cols % block:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {block}, got {n_cols}")
    encode = _ENCODE_PLAIN.get(qtype) or _gguf_type(qtype).quantize_rows
    step = max(1, _CHUNK_ELEMENTS // n_cols)
    parts = [encode(rows[i : i + step]) for i in range(0, n_rows, step)]
    return np.concatenate(parts).reshape(n_rows, -1)


def weighted_error(rows: np.ndarray, packed: np.ndarray, qtype: Q, importance: np.ndarray) -> np.ndarray:
    """Per block of ``qtype``: sum over its weights of importance·(w − ŵ)², shape (rows, blocks per row)."""
    block = GGML_QUANT_SIZES[qtype][0]
    restored = _gguf_type(qtype).dequantize_rows(packed).reshape(rows.shape)
    err = np.square(restored - rows) * np.asarray(importance, dtype=np.float32)[None, :]
    return err.reshape(rows.shape[0], -1, block).sum(axis=2)


def _gguf_type(qtype: Q):
    """gguf-py's bit-exact codec of ``qtype``. Called on whole chunks: ``gguf.quants.quantize`` and
    ``dequantize`` cut every array into groups of 16 rows, which costs more than the arithmetic."""
    return getattr(gguf_quants, qtype.name)


def _check_importance(importance: np.ndarray, n_cols: int) -> np.ndarray:
    importance = np.asarray(importance, dtype=np.float32).reshape(-1)
    if importance.shape[0] != n_cols or not np.isfinite(importance).all() or (importance < 0).any():
        raise ValueError(f"importance needs {n_cols} finite non-negative values, got shape {importance.shape}")
    return importance


def _quantize_weighted(rows: np.ndarray, qtype: Q, importance: np.ndarray) -> np.ndarray:
    n_rows, n_cols = rows.shape
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    if n_cols % block:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {block}, got {n_cols}")
    # Columns no activation reached still carry some weight in the search (never none at all),
    # so a block of them is not flattened to zero; the final choice uses the importance as given.
    mean = float(importance.mean())
    search = np.maximum(importance, np.float32(1e-3 * mean)) if mean > 0 else np.ones_like(importance)
    step = max(1, _CHUNK_ELEMENTS // n_cols)
    parts = []
    for i in range(0, n_rows, step):
        chunk = rows[i : i + step]
        plain = quantize(chunk, qtype)
        guided = _ENCODE_WEIGHTED[qtype](chunk, np.broadcast_to(search, chunk.shape))
        better = weighted_error(chunk, guided, qtype, importance) < weighted_error(chunk, plain, qtype, importance)
        blocks = plain.reshape(chunk.shape[0], -1, block_bytes).copy()
        blocks[better] = guided.reshape(blocks.shape)[better]
        parts.append(blocks.reshape(chunk.shape[0], -1))
    return np.concatenate(parts)


# ---------------------------------------------------------------------------- shared helpers


def _nearest(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    # ggml rounds with the float "+ 1.5·2^23" trick: round half to even, as np.rint does.
    return np.rint(values, out=out)


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """``make_qkx2_quants`` on every row of ``x`` (n, 32): levels L, scale, and the (positive) min."""
    f32 = np.float32
    nmax_f = f32(nmax)
    lo = np.minimum(x.min(axis=1), 0).astype(f32)
    hi = x.max(axis=1)
    flat = hi == lo
    sum_w = w.sum(axis=1)
    sum_x = (w * x).sum(axis=1)

    def span(low):
        return np.where(flat, f32(1), hi - low)

    # As in ``_qx``: three reused buffers, and each row remembers only the trial it keeps.
    trial, wl, prod = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    best_iscale, best_origin = nmax_f / span(lo), lo
    scale = f32(1) / best_iscale
    _shifted_levels(x, best_origin, best_iscale, nmax, out=trial)
    best = np.multiply(w, np.square(scale[:, None] * trial + lo[:, None] - x, out=prod), out=prod).sum(axis=1)
    for step in range(nstep + 1):
        # The search moves its origin with each improvement, as the reference does.
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + nmax_f) / span(lo)
        _shifted_levels(x, lo, iscale, nmax, out=trial)
        np.multiply(w, trial, out=wl)
        sum_l = wl.sum(axis=1)
        sum_l2 = np.multiply(wl, trial, out=prod).sum(axis=1)
        sum_xl = np.multiply(wl, x, out=prod).sum(axis=1)
        solvable, this_scale, this_min = _scale_and_min(sum_w, sum_x, sum_l, sum_l2, sum_xl)
        np.multiply(this_scale[:, None], trial, out=prod)
        np.subtract(np.add(prod, this_min[:, None], out=prod), x, out=prod)
        err = np.multiply(w, np.square(prod, out=prod), out=prod).sum(axis=1)
        better = solvable & (err < best)
        best_iscale = np.where(better, iscale, best_iscale)
        best_origin = np.where(better, lo, best_origin)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    levels = _shifted_levels(x, best_origin, best_iscale, nmax, out=trial)
    levels = np.where(flat[:, None], 0, levels)
    scale = np.where(flat, f32(0), scale)
    return levels, scale.astype(f32), (-lo).astype(f32)


def _scale_and_min(sum_w, sum_x, sum_l, sum_l2, sum_xl):
    """The weighted least-squares scale and min of x ≈ scale·L + min from the sums over a block;
    a positive min is dropped (the format stores min ≤ 0) and the scale refitted alone."""
    f32 = np.float32
    det = sum_w * sum_l2 - sum_l * sum_l
    solvable = det > 0
    det = np.where(solvable, det, f32(1))
    scale = (sum_w * sum_xl - sum_x * sum_l) / det
    low = (sum_l2 * sum_x - sum_l * sum_xl) / det
    positive = low > 0
    scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), scale)
    return solvable, scale, np.where(positive, f32(0), low)


def _shifted_levels(x: np.ndarray, origin: np.ndarray, iscale: np.ndarray, nmax: int, out: np.ndarray) -> np.ndarray:
    """clip(round(iscale·(x − origin)), 0, nmax) per row, in ``out``."""
    np.subtract(x, origin[:, None], out=out)
    np.multiply(iscale[:, None], out, out=out)
    return np.clip(_nearest(out, out=out), 0, nmax, out=out)


def _scale_min_k4(x: np.ndarray, nmax: int, rmin: float, nstep: int, importance: np.ndarray | None = None):
    """The Q4_K/Q5_K super-block header and levels for blocks ``x`` (nb, 256).

    Without ``importance`` this is ggml's reference; with it (nb, 256), the weighted search."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    if importance is None:
        av_x = np.sqrt((sub * sub).sum(axis=1) / np.float32(32))
        weights = av_x[:, None] + np.abs(sub)
        levels, scales, mins = _qkx2(sub, weights, nmax, rmin, 0.1, nstep)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        max_scale = np.maximum(scales.max(axis=1), 0)
        max_min = np.maximum(mins.max(axis=1), 0)
        inv_scale = np.where(max_scale > 0, np.float32(63) / np.where(max_scale > 0, max_scale, 1), 0).astype(np.float32)
        inv_min = np.where(max_min > 0, np.float32(63) / np.where(max_min > 0, max_min, 1), 0).astype(np.float32)
        ls = np.clip(_nearest(inv_scale[:, None] * scales), 0, 63).astype(np.uint8)
        lm = np.clip(_nearest(inv_min[:, None] * mins), 0, 63).astype(np.uint8)
        d = (max_scale / np.float32(63)).astype(np.float16)
        dmin = (max_min / np.float32(63)).astype(np.float16)
    else:
        weights = _search_weights(x, importance.reshape(nb, 256), 2 * np.square(x).mean(axis=1)).reshape(nb * 8, 32)
        levels, scales, mins = _qkx2(sub, weights, nmax, -0.9, 0.1, 18)
        sub_weight = weights.sum(axis=1).reshape(nb, 8)
        ls, d = _qp(scales.reshape(nb, 8), 63, sub_weight)
        lm, dmin = _qp(mins.reshape(nb, 8), 63, sub_weight)
        d, dmin = d.astype(np.float16), dmin.astype(np.float16)
    # Re-derive the levels from the rounded 6-bit scales, exactly as the decoder will see them.
    d_sub = d.astype(np.float32)[:, None] * ls
    m_sub = dmin.astype(np.float32)[:, None] * lm
    x8 = x.reshape(nb, 8, 32)
    safe = np.where(d_sub != 0, d_sub, 1)[..., None]
    fresh = np.clip(_nearest((x8 + m_sub[..., None]) / safe), 0, nmax)
    levels = np.where((d_sub != 0)[..., None], fresh, levels.reshape(nb, 8, 32)).astype(np.uint8)
    packed = np.empty((nb, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    header = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed], axis=1)
    return header, levels.reshape(nb, 256)


def _search_weights(x: np.ndarray, importance: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """importance·sqrt(σ² + x²): the importance, leaning towards the larger weights of each block."""
    return importance * np.sqrt(sigma2[:, None] + x * x)


def _qp(values: np.ndarray, nmax: int, weights: np.ndarray):
    """Non-negative ``values`` (n, k) as levels 0..nmax times one scale per row, by weighted search
    over trial scales around max/nmax, then the least-squares scale for the chosen levels."""
    f32 = np.float32
    top = values.max(axis=1)
    empty = top < _EPS
    top = np.where(empty, f32(1), top)

    def levels_for(iscale):
        return np.minimum(nmax, _nearest(iscale[:, None] * values))

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


def _low_nibbles(levels: np.ndarray) -> np.ndarray:
    # Each 64-weight chunk stores weight j in the low nibble and weight j+32 in the high one.
    pairs = (levels & 0xF).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


# ---------------------------------------------------------------------------- the three types


def _q4_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    header, levels = _scale_min_k4(x, nmax=15, rmin=-1.0, nstep=20, importance=importance)
    return np.concatenate([header, _low_nibbles(levels)], axis=1)


def _q5_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    header, levels = _scale_min_k4(x, nmax=31, rmin=-0.5, nstep=15, importance=importance)
    high = (levels >> 4).reshape(-1, 4, 2, 32).astype(np.uint8)
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = (high << shifts[None, :, :, None]).sum(axis=(1, 2), dtype=np.uint8)
    return np.concatenate([header, qh, _low_nibbles(levels)], axis=1)


def _qx(x: np.ndarray, nmax: int, w: np.ndarray | None = None):
    """``make_qx_quants`` on every row of ``x`` (n, block): levels in [0, 2·nmax) and the scale.

    The weights ``w`` default to x² (rmse_type 1, the reference for Q6_K)."""
    f32 = np.float32
    rows = np.arange(x.shape[0])
    amax_at = np.abs(x).argmax(axis=1)
    peak = x[rows, amax_at]
    tiny = np.abs(peak) < _EPS
    peak = np.where(tiny, f32(1), peak)
    w = x * x if w is None else w
    # The trials reuse three buffers and remember only each row's best inverse scale: the search
    # is memory-bound, and the levels of the winning trial are cheap to recompute once.
    lv, wl, prod = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def trial(iscale):
        _levels(x, iscale, -nmax, nmax - 1, out=lv)
        np.multiply(w, lv, out=wl)
        sumlx = np.multiply(wl, x, out=prod).sum(axis=1)
        return sumlx, np.multiply(wl, lv, out=prod).sum(axis=1)

    best_iscale = -f32(nmax) / peak
    sumlx, suml2 = trial(best_iscale)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / peak
        sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = np.where(better, iscale, best_iscale)
        scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, f32(1)), scale)
        best = np.where(better, scale * sumlx, best)
    levels = _levels(x, best_iscale, -nmax, nmax - 1, out=lv)
    levels = np.where(tiny[:, None], 0, levels + nmax)
    return levels, np.where(tiny, f32(0), scale).astype(f32)


def _levels(x: np.ndarray, iscale: np.ndarray, low: int, high: int, out: np.ndarray | None = None) -> np.ndarray:
    """clip(round(iscale·x)) per row, in place in ``out`` when given."""
    out = np.multiply(iscale[:, None], x, out=out)
    return np.clip(_nearest(out, out=out), low, high, out=out)


def _q6_k(x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    nb = x.shape[0]
    weights = None if importance is None else importance.reshape(nb * 16, 16)
    levels, scales = _qx(x.reshape(nb * 16, 16), nmax=32, w=weights)
    scales = scales.reshape(nb, 16)
    rows = np.arange(nb)
    max_scale = scales[rows, np.abs(scales).argmax(axis=1)]
    empty = np.abs(max_scale) < _EPS
    iscale = np.float32(-128) / np.where(empty, np.float32(1), max_scale)
    d = (np.float32(1) / iscale).astype(np.float16)
    sc = np.minimum(127, _nearest(iscale[:, None] * scales)).astype(np.int8)
    d_sub = d.astype(np.float32)[:, None] * sc
    x16 = x.reshape(nb, 16, 16)
    fresh = np.clip(_nearest(x16 / np.where(d_sub != 0, d_sub, 1)[..., None]), -32, 31) + 32
    levels = np.where((d_sub != 0)[..., None], fresh, levels.reshape(nb, 16, 16)).astype(np.uint8)
    quarters = levels.reshape(nb, 2, 4, 32)  # two 128-weight halves, each in four runs of 32
    low = quarters & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    high = quarters >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    block = np.concatenate(
        [ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1
    )
    block[empty] = 0
    return block


# ---------------------------------------------------------------------------- weighted encoders


def _per_row_sigma2(rows: np.ndarray, block: int) -> np.ndarray:
    """Each row's mean square, repeated for each of its blocks."""
    return np.repeat(np.square(rows).mean(axis=1), rows.shape[1] // block)


def _symmetric(rows: np.ndarray, importance: np.ndarray, nmax: int):
    blocks = rows.reshape(-1, 32)
    weights = _search_weights(blocks, importance.reshape(-1, 32), _per_row_sigma2(rows, 32))
    levels, scale = _qx(blocks, nmax, w=weights)
    return levels.astype(np.int32), scale


def _nibbles_32(levels: np.ndarray) -> np.ndarray:
    # The legacy 32-weight blocks keep weight j in the low nibble and weight j+16 in the high one.
    low = (levels & 0xF).astype(np.uint8)
    return low[:, :16] | (low[:, 16:] << 4)


def _fifth_bits(levels: np.ndarray) -> np.ndarray:
    bits = ((levels >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)


def _q8_0_weighted(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    levels, scale = _symmetric(rows, importance, 128)
    quants = (levels - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(scale), quants], axis=1).reshape(rows.shape[0], -1)


def _q4_0_weighted(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    levels, scale = _symmetric(rows, importance, 8)
    return np.concatenate([_f16_bytes(scale), _nibbles_32(levels)], axis=1).reshape(rows.shape[0], -1)


def _q5_0_weighted(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    levels, scale = _symmetric(rows, importance, 16)
    packed = [_f16_bytes(scale), _fifth_bits(levels), _nibbles_32(levels)]
    return np.concatenate(packed, axis=1).reshape(rows.shape[0], -1)


def _q5_1_weighted(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    blocks = rows.reshape(-1, 32)
    weights = _search_weights(blocks, importance.reshape(-1, 32), _per_row_sigma2(rows, 32))
    levels, scale, neg_min = _qkx2(blocks, weights, 31, -0.9, 0.1, 18)
    levels = levels.astype(np.int32)
    packed = [_f16_bytes(scale), _f16_bytes(-neg_min), _fifth_bits(levels), _nibbles_32(levels)]
    return np.concatenate(packed, axis=1).reshape(rows.shape[0], -1)


def _k_plain(encode):
    def run(rows: np.ndarray) -> np.ndarray:
        return encode(rows.reshape(-1, QK_K)).reshape(rows.shape[0], -1)

    return run


def _k_weighted(encode):
    def run(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
        return encode(rows.reshape(-1, QK_K), np.ascontiguousarray(importance).reshape(-1, QK_K)).reshape(rows.shape[0], -1)

    return run


_ENCODE_PLAIN = {Q.Q4_K: _k_plain(_q4_k), Q.Q5_K: _k_plain(_q5_k), Q.Q6_K: _k_plain(_q6_k)}  # others: gguf-py


_ENCODE_WEIGHTED = {
    Q.Q4_K: _k_weighted(_q4_k),
    Q.Q5_K: _k_weighted(_q5_k),
    Q.Q6_K: _k_weighted(_q6_k),
    Q.Q8_0: _q8_0_weighted,
    Q.Q5_1: _q5_1_weighted,
    Q.Q5_0: _q5_0_weighted,
    Q.Q4_0: _q4_0_weighted,
}
