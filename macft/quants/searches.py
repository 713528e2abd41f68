"""ggml's trial-scale searches, vectorised over every block of a chunk at once.

* ``make_qx_quants``: symmetric levels in [−nmax, nmax) times one scale, the best of 19 trial
  scales around the max-abs one (Q6_K, and the weighted Q8_0 / Q5_0 / Q4_0);
* ``make_qkx2_quants``: levels in [0, nmax] times a scale plus a min, by weighted least squares over
  trial scales (Q4_K / Q5_K, and the weighted Q5_1).

Both must stay bit-identical to the plain loops written out in ``tests/test_kquants.py``.
"""

from __future__ import annotations

import numpy as np

from macft.quants.base import nearest

EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray | None = None):
    """``make_qx_quants`` on every row of ``x`` (n, block): levels in [0, 2·nmax) and the scale.

    The weights ``w`` default to x² (rmse_type 1, the reference for Q6_K)."""
    f32 = np.float32
    rows = np.arange(x.shape[0])
    amax_at = np.abs(x).argmax(axis=1)
    peak = x[rows, amax_at]
    tiny = np.abs(peak) < EPS
    peak = np.where(tiny, f32(1), peak)
    w = x * x if w is None else w
    # The trials reuse three buffers and remember only each row's best inverse scale: the search
    # is memory-bound, and the levels of the winning trial are cheap to recompute once.
    lv, wl, prod = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def trial(iscale):
        levels(x, iscale, -nmax, nmax - 1, out=lv)
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
    found = levels(x, best_iscale, -nmax, nmax - 1, out=lv)
    found = np.where(tiny[:, None], 0, found + nmax)
    return found, np.where(tiny, f32(0), scale).astype(f32)


def levels(x: np.ndarray, iscale: np.ndarray, low: int, high: int, out: np.ndarray | None = None) -> np.ndarray:
    """clip(round(iscale·x)) per row, in place in ``out`` when given."""
    out = np.multiply(iscale[:, None], x, out=out)
    return np.clip(nearest(out, out=out), low, high, out=out)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
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

    # As in ``make_qx_quants``: three reused buffers, and each row remembers only the trial it keeps.
    trial, wl, prod = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    best_iscale, best_origin = nmax_f / span(lo), lo
    scale = f32(1) / best_iscale
    shifted_levels(x, best_origin, best_iscale, nmax, out=trial)
    best = np.multiply(w, np.square(scale[:, None] * trial + lo[:, None] - x, out=prod), out=prod).sum(axis=1)
    for step in range(nstep + 1):
        # The search moves its origin with each improvement, as the reference does.
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + nmax_f) / span(lo)
        shifted_levels(x, lo, iscale, nmax, out=trial)
        np.multiply(w, trial, out=wl)
        sum_l = wl.sum(axis=1)
        sum_l2 = np.multiply(wl, trial, out=prod).sum(axis=1)
        sum_xl = np.multiply(wl, x, out=prod).sum(axis=1)
        solvable, this_scale, this_min = scale_and_min(sum_w, sum_x, sum_l, sum_l2, sum_xl)
        np.multiply(this_scale[:, None], trial, out=prod)
        np.subtract(np.add(prod, this_min[:, None], out=prod), x, out=prod)
        err = np.multiply(w, np.square(prod, out=prod), out=prod).sum(axis=1)
        better = solvable & (err < best)
        best_iscale = np.where(better, iscale, best_iscale)
        best_origin = np.where(better, lo, best_origin)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    found = shifted_levels(x, best_origin, best_iscale, nmax, out=trial)
    found = np.where(flat[:, None], 0, found)
    scale = np.where(flat, f32(0), scale)
    return found, scale.astype(f32), (-lo).astype(f32)


def scale_and_min(sum_w, sum_x, sum_l, sum_l2, sum_xl):
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


def shifted_levels(x: np.ndarray, origin: np.ndarray, iscale: np.ndarray, nmax: int, out: np.ndarray) -> np.ndarray:
    """clip(round(iscale·(x − origin)), 0, nmax) per row, in ``out``."""
    np.subtract(x, origin[:, None], out=out)
    np.multiply(iscale[:, None], out, out=out)
    return np.clip(nearest(out, out=out), 0, nmax, out=out)


# ---------------------------------------------------------------------------- importance-weighted searches


def search_weights(x: np.ndarray, importance: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """importance·sqrt(σ² + x²): the importance, leaning towards the larger weights of each block."""
    return importance * np.sqrt(sigma2[:, None] + x * x)


def per_row_sigma2(rows: np.ndarray, block: int) -> np.ndarray:
    """Each row's mean square, repeated for each of its blocks."""
    return np.repeat(np.square(rows).mean(axis=1), rows.shape[1] // block)


def weighted_blocks_of_32(rows: np.ndarray, importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` as 32-weight blocks and each weight's search weight (σ² of its whole row)."""
    blocks = rows.reshape(-1, 32)
    return blocks, search_weights(blocks, importance.reshape(-1, 32), per_row_sigma2(rows, 32))


def symmetric_weighted(rows: np.ndarray, importance: np.ndarray, nmax: int):
    """The weighted ``make_qx_quants`` on every 32-weight block: levels in [0, 2·nmax) and the scales."""
    blocks, weights = weighted_blocks_of_32(rows, importance)
    found, scale = make_qx_quants(blocks, nmax, w=weights)
    return found.astype(np.int32), scale
