"""GGUF tensor types: one record per type (``QuantType``), its encoder and decoder side by side,
declared by the module of its kind in this folder and found here.

| module | types |
|---|---|
| ``floats`` | F32, F16, BF16 |
| ``q8_0`` | Q8_0 |
| ``legacy`` | Q4_0, Q4_1, Q5_0, Q5_1 |
| ``kquants`` | Q4_K, Q5_K, Q6_K (ggml's reference encoders, in numpy) |
| ``read_only`` | the types a GGUF import decodes and macft never writes (Q2_K, Q3_K, the IQ types, ...) |
| ``searches`` | ggml's trial-scale searches the encoders share |

    packed = quantize(rows, Q.Q4_K)                       # float32 (rows, n) -> uint8 (rows, bytes per row)
    packed = quantize(rows, Q.Q4_K, importance=imatrix)   # one weight per column (``macft.export.imatrix``)
    values = decode(packed, Q.Q4_K)                       # float32 (F16: float16)
    quant_type(Q.Q4_K).block_size, quant_type(Q.Q4_K).fallback

With ``importance`` (how much each input column matters: the mean of x² of the activations that
meet it) a type with an ``encode_weighted`` minimises ``sum_j importance[j]·(w_j − ŵ_j)²`` per block,
the expected squared change of the layer's output on those activations. A weighted search is a
heuristic, so every block keeps whichever of the weighted and the plain encoding has the smaller
weighted error: an importance matrix never makes a block worse by the measure it is meant to improve.

Adding a type: declare its ``QuantType`` in a module here (``TYPES``); ``tests/test_quant_types.py``
checks every registered type against gguf-py and ggml.
"""

from __future__ import annotations

import importlib
import pkgutil

import numpy as np
from gguf import GGMLQuantizationType as Q

from macft.errors import MacftError
from macft.quants.base import QuantType

_HELPERS = ("base", "searches")  # modules that declare no type
_CHUNK_ELEMENTS = 1 << 21  # bounds the encoders' temporaries (a few dozen float32 copies of one chunk)
# Decoding goes by smaller chunks: their temporaries stay in the CPU cache, and they are still large
# enough that Python's cost per chunk vanishes.
_DECODE_ELEMENTS = 1 << 18

QUANT_TYPES: dict[Q, QuantType] = {}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _HELPERS:
        for _record in importlib.import_module(f"{__name__}.{_module.name}").TYPES:
            if _record.qtype in QUANT_TYPES:
                raise RuntimeError(f"{_record.name} is declared twice in macft/quants/")
            QUANT_TYPES[_record.qtype] = _record


def quant_type(qtype: Q) -> QuantType:
    if qtype not in QUANT_TYPES:
        known = ", ".join(q.name for q in QUANT_TYPES)
        raise MacftError(f"GGUF tensor type {qtype.name} is not supported; quantize the model to one of {known}.")
    return QUANT_TYPES[qtype]


def quantize(rows: np.ndarray, qtype: Q, importance: np.ndarray | None = None) -> np.ndarray:
    """Encode a 2-D float32 array row by row; returns the packed blocks, one uint8 row per row.

    ``importance``: one non-negative weight per column (see the module docstring), or None.
    """
    record = quant_type(qtype)
    if record.encode is None:
        raise ValueError(f"macft does not write {record.name}")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_cols = rows.shape
    if n_cols % record.block_size:
        raise ValueError(f"{record.name} needs rows that are a multiple of {record.block_size}, got {n_cols}")
    if importance is not None and record.encode_weighted is not None:
        return _quantize_weighted(rows, record, _check_importance(importance, n_cols))
    step = max(1, _CHUNK_ELEMENTS // n_cols)
    parts = [record.encode(rows[i : i + step]) for i in range(0, n_rows, step)]
    return np.concatenate(parts).reshape(n_rows, -1)


def decode(rows: np.ndarray, qtype: Q) -> np.ndarray:
    """The values of packed ``(rows, bytes per row)``: float32, F16 as float16."""
    record = quant_type(qtype)
    if record.is_float:
        return record.decode(rows)  # a view of the bytes: nothing to bound
    step = max(1, _DECODE_ELEMENTS // (rows.shape[1] // record.block_bytes * record.block_size))
    return np.concatenate([record.decode(rows[i : i + step]) for i in range(0, rows.shape[0], step)])


def weighted_error(rows: np.ndarray, packed: np.ndarray, qtype: Q, importance: np.ndarray) -> np.ndarray:
    """Per block of ``qtype``: sum over its weights of importance·(w − ŵ)², shape (rows, blocks per row)."""
    record = quant_type(qtype)
    restored = record.decode(packed).reshape(rows.shape)
    err = np.square(restored - rows) * np.asarray(importance, dtype=np.float32)[None, :]
    return err.reshape(rows.shape[0], -1, record.block_size).sum(axis=2)


def _check_importance(importance: np.ndarray, n_cols: int) -> np.ndarray:
    importance = np.asarray(importance, dtype=np.float32).reshape(-1)
    if importance.shape[0] != n_cols or not np.isfinite(importance).all() or (importance < 0).any():
        raise ValueError(f"importance needs {n_cols} finite non-negative values, got shape {importance.shape}")
    return importance


def _quantize_weighted(rows: np.ndarray, record: QuantType, importance: np.ndarray) -> np.ndarray:
    n_rows, n_cols = rows.shape
    # Columns no activation reached still carry some weight in the search (never none at all),
    # so a block of them is not flattened to zero; the final choice uses the importance as given.
    mean = float(importance.mean())
    search = np.maximum(importance, np.float32(1e-3 * mean)) if mean > 0 else np.ones_like(importance)
    step = max(1, _CHUNK_ELEMENTS // n_cols)
    parts = []
    for i in range(0, n_rows, step):
        chunk = rows[i : i + step]
        plain = record.encode(chunk)
        guided = record.encode_weighted(chunk, np.broadcast_to(search, chunk.shape))
        better = weighted_error(chunk, guided, record.qtype, importance) < weighted_error(chunk, plain, record.qtype, importance)
        blocks = plain.reshape(chunk.shape[0], -1, record.block_bytes).copy()
        blocks[better] = guided.reshape(blocks.shape)[better]
        parts.append(blocks.reshape(chunk.shape[0], -1))
    return np.concatenate(parts)
