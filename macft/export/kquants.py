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
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

QK_K = 256
_CHUNK_ELEMENTS = 1 << 21  # bounds the temporaries (a few dozen float32 copies of one chunk)
_EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS


def quantize(rows: np.ndarray, qtype: Q) -> np.ndarray:
    """Quantize a 2-D float32 array row by row; returns the packed blocks, one byte row per row."""
    if qtype not in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return gguf_quants.quantize(rows, qtype)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_cols = rows.shape
    if n_cols % QK_K:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {QK_K}, got {n_cols}")
    encode = {Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}[qtype]
    step = max(1, _CHUNK_ELEMENTS // n_cols)
    parts = [encode(rows[i : i + step].reshape(-1, QK_K)) for i in range(0, n_rows, step)]
    return np.concatenate(parts).reshape(n_rows, -1)


# ---------------------------------------------------------------------------- shared helpers


def _nearest(values: np.ndarray) -> np.ndarray:
    # ggml rounds with the float "+ 1.5·2^23" trick: round half to even, as np.rint does.
    return np.rint(values)


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

    iscale = nmax_f / span(lo)
    scale = f32(1) / iscale
    levels = np.clip(_nearest(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    best = (w * np.square(scale[:, None] * levels + lo[:, None] - x)).sum(axis=1)
    for step in range(nstep + 1):
        # The search moves its origin with each improvement, as the reference does.
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + nmax_f) / span(lo)
        trial = np.clip(_nearest(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        wl = w * trial
        sum_l = wl.sum(axis=1)
        sum_l2 = (wl * trial).sum(axis=1)
        sum_xl = (wl * x).sum(axis=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        solvable = det > 0
        det = np.where(solvable, det, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        this_min = np.where(positive, f32(0), this_min)
        err = (w * np.square(this_scale[:, None] * trial + this_min[:, None] - x)).sum(axis=1)
        better = solvable & (err < best)
        levels = np.where(better[:, None], trial, levels)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    levels = np.where(flat[:, None], 0, levels)
    scale = np.where(flat, f32(0), scale)
    return levels, scale.astype(f32), (-lo).astype(f32)


def _scale_min_k4(x: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The Q4_K/Q5_K super-block header and levels for blocks ``x`` (nb, 256)."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
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


def _low_nibbles(levels: np.ndarray) -> np.ndarray:
    # Each 64-weight chunk stores weight j in the low nibble and weight j+32 in the high one.
    pairs = (levels & 0xF).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


# ---------------------------------------------------------------------------- the three types


def _q4_k(x: np.ndarray) -> np.ndarray:
    header, levels = _scale_min_k4(x, nmax=15, rmin=-1.0, nstep=20)
    return np.concatenate([header, _low_nibbles(levels)], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    header, levels = _scale_min_k4(x, nmax=31, rmin=-0.5, nstep=15)
    high = (levels >> 4).reshape(-1, 4, 2, 32).astype(np.uint8)
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)
    qh = (high << shifts[None, :, :, None]).sum(axis=(1, 2), dtype=np.uint8)
    return np.concatenate([header, qh, _low_nibbles(levels)], axis=1)


def _qx(x: np.ndarray, nmax: int):
    """``make_qx_quants`` with rmse_type 1 (weights x²) on every row of ``x`` (n, 16)."""
    f32 = np.float32
    rows = np.arange(x.shape[0])
    amax_at = np.abs(x).argmax(axis=1)
    peak = x[rows, amax_at]
    tiny = np.abs(peak) < _EPS
    peak = np.where(tiny, f32(1), peak)
    w = x * x

    def trial(iscale):
        lv = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1)
        wl = w * lv
        return lv, (wl * x).sum(axis=1), (wl * lv).sum(axis=1)

    levels, sumlx, suml2 = trial(-f32(nmax) / peak)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lv, sumlx, suml2 = trial(-(f32(nmax) + f32(0.1) * f32(step)) / peak)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = np.where(better[:, None], lv, levels)
        scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, f32(1)), scale)
        best = np.where(better, scale * sumlx, best)
    levels = np.where(tiny[:, None], 0, levels + nmax)
    return levels, np.where(tiny, f32(0), scale).astype(f32)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    levels, scales = _qx(x.reshape(nb * 16, 16), nmax=32)
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
