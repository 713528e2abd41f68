"""Every GGUF type registered in ``macft.quants`` against gguf-py's and ggml's own codecs: a type
is tested by being registered.

For each record: its block sizes are ggml's; its decoder gives gguf-py's values bit for bit; its
encoder's bytes are gguf-py's where gguf-py encodes the type, and otherwise lose no more than ggml's
own quantizer; its importance-weighted encoder never makes a block worse by the weighted error;
its affine form rebuilds the decoded values exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

import macft.quants
from macft.errors import MacftError
from macft.quants import QUANT_TYPES, decode, quant_type, quantize
from macft.quants.base import AFFINE_GROUP

TYPES = list(QUANT_TYPES.values())
COLUMNS = 512  # a whole number of blocks of every type macft writes


def by_name(record) -> str:
    return record.name


def sample_rows() -> np.ndarray:
    """Rows of very different scales, with the blocks that break careless encoders."""
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((8, COLUMNS)) * rng.uniform(0.01, 3, size=(8, 1))).astype(np.float32)
    rows[0] = 0  # all zeros
    rows[1] = 0.25  # constant
    rows[2] = 0
    rows[2, 17] = -3.0  # a single spike
    rows[3] = 1e-20 * rng.standard_normal(COLUMNS)  # below ggml's epsilon
    rows[4] *= np.linspace(0.01, 10, COLUMNS, dtype=np.float32)  # sub-blocks of very different scales
    rows[5] = np.abs(rows[5]) + 1  # all positive: a min far from zero
    return rows


def heavy_tailed_importance(n_cols: int) -> np.ndarray:
    """Like a real imatrix: log-normal column weights, a few outliers, a run of columns never reached."""
    rng = np.random.default_rng(1)
    importance = np.exp(1.5 * rng.standard_normal(n_cols)).astype(np.float32)
    importance[rng.choice(n_cols, 4, replace=False)] *= 100
    importance[32:64] = 0
    return importance


def gguf_py_encoding(rows: np.ndarray, qtype: Q) -> np.ndarray | None:
    try:
        return np.asarray(gguf_quants.quantize(rows, qtype)).view(np.uint8).reshape(rows.shape[0], -1)
    except NotImplementedError:
        return None


def test_every_type_gguf_py_decodes_is_registered():
    """A GGUF import reads every type it read before the records existed."""
    decodable = {Q.F32, Q.F16} | {q for q in Q if q in GGML_QUANT_SIZES and hasattr(gguf_quants, q.name)}
    assert decodable <= set(QUANT_TYPES), sorted(q.name for q in decodable - set(QUANT_TYPES))
    with pytest.raises(MacftError, match="Q8_K is not supported"):
        quant_type(Q.Q8_K)  # ggml's dot-product type: no file stores it


def test_every_type_an_export_chooses_has_an_encoder():
    from macft.export.quant_plan import SCHEMES, higher_types

    chosen = {s.base for s in SCHEMES.values()} | {Q.F32, Q.F16, Q.Q6_K, Q.Q8_0}  # 1-D tensors, mixtures
    chosen |= {*higher_types(Q.Q4_K, 256), *higher_types(Q.Q4_0, 32)}  # a guided plan's upgrades
    chosen |= {quant_type(q).fallback for q in chosen if quant_type(q).fallback}
    assert all(quant_type(q).encode for q in chosen), [q.name for q in chosen if not quant_type(q).encode]


@pytest.mark.parametrize("record", TYPES, ids=by_name)
def test_sizes_are_ggml_s(record):
    assert (record.block_size, record.block_bytes) == GGML_QUANT_SIZES[record.qtype]
    assert record.nbytes(3 * record.block_size) == 3 * record.block_bytes
    if record.affine is not None:
        assert record.block_size % AFFINE_GROUP == 0 and 1 <= record.affine_bits <= 8
    if record.fallback is not None:
        fallback = quant_type(record.fallback)
        assert fallback.encode is not None and record.block_size % fallback.block_size == 0


@pytest.mark.parametrize("record", TYPES, ids=by_name)
def test_decode_equals_gguf_py(record, monkeypatch):
    rng = np.random.default_rng(int(record.qtype))
    raw = rng.integers(0, 256, size=(6, 4 * record.block_bytes), dtype=np.uint8)  # any bits, NaN scales too
    monkeypatch.setattr(macft.quants, "_DECODE_ELEMENTS", 8 * record.block_size)  # chunks of 2 rows
    with np.errstate(all="ignore"):
        expected = gguf_quants.dequantize(raw, record.qtype)
        got = decode(raw, record.qtype)
    assert got.dtype in (np.float32, np.float16) and got.shape == expected.shape == (6, 4 * record.block_size)
    np.testing.assert_array_equal(got.astype(np.float32).view(np.uint32), expected.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("record", [r for r in TYPES if r.encode], ids=by_name)
def test_encode_matches_gguf_py_or_ggml(record, request):
    rows = sample_rows()
    packed = quantize(rows, record.qtype)
    assert packed.dtype == np.uint8 and packed.shape == (rows.shape[0], record.nbytes(COLUMNS))
    restored = gguf_quants.dequantize(packed, record.qtype)
    assert np.isfinite(restored).all() and not restored[0].any()
    reference = gguf_py_encoding(rows, record.qtype)
    if reference is not None:
        np.testing.assert_array_equal(packed, reference)  # gguf-py's encoders are bit-exact with ggml
        return
    # gguf-py cannot encode this type: ggml's own quantizer is the reference
    theirs = gguf_quants.dequantize(request.getfixturevalue("ggml")(rows, record.qtype), record.qtype)
    for ours_row, theirs_row, row in zip(restored, theirs, rows):
        ours, reference_error = np.sqrt(np.mean((ours_row - row) ** 2)), np.sqrt(np.mean((theirs_row - row) ** 2))
        assert ours <= 1.02 * reference_error + 1e-30, (ours, reference_error)


@pytest.mark.parametrize("record", [r for r in TYPES if r.encode_weighted], ids=by_name)
def test_importance_never_makes_a_block_worse(record, request):
    rows, importance = sample_rows(), heavy_tailed_importance(COLUMNS)
    plain, weighted = quantize(rows, record.qtype), quantize(rows, record.qtype, importance=importance)
    assert weighted.shape == plain.shape

    def block_errors(packed):  # decoded by gguf-py, summed by numpy in float64
        err = (gguf_quants.dequantize(packed, record.qtype).astype(np.float64) - rows) ** 2 * importance
        return err.reshape(rows.shape[0], -1, record.block_size).sum(axis=2)

    ours, unweighted = block_errors(weighted), block_errors(plain)
    assert (ours <= unweighted * (1 + 1e-6)).all()  # macft chooses by float32 sums
    assert ours.sum() < 0.95 * unweighted.sum()
    # ggml's own importance-weighted quantizer: macft's rounding is as good, give or take the search
    ggml = request.getfixturevalue("ggml")
    reference = ggml(rows, record.qtype, importance)
    if not np.array_equal(reference, ggml(rows, record.qtype)):  # ggml ignores the importance of some types (Q8_0)
        assert ours.sum() <= 1.1 * block_errors(reference).sum(), (ours.sum(), block_errors(reference).sum())


@pytest.mark.parametrize("record", [r for r in TYPES if r.affine], ids=by_name)
def test_affine_form_rebuilds_the_decoded_values(record):
    rows = sample_rows()
    for packed in (quantize(rows, record.qtype), quantize(rows, record.qtype, importance=heavy_tailed_importance(COLUMNS))):
        blocks = packed.reshape(-1, record.block_bytes)
        q, scales, biases = record.affine(blocks)
        assert 0 <= q.min() and q.max() < 2**record.affine_bits
        assert scales.dtype == biases.dtype == np.float32
        groups = (blocks.shape[0], record.block_size // AFFINE_GROUP, -1)
        values = q.reshape(groups).astype(np.float32) * scales.reshape(groups) + biases.reshape(groups)
        # equal as numbers (gguf-py's d·(q − 16) can be −0.0 where d·q − 16·d gives +0.0)
        np.testing.assert_array_equal(values.reshape(rows.shape), gguf_quants.dequantize(packed, record.qtype))
