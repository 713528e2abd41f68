"""GGUF tensor bytes as MLX affine-quantized weights, exactly, for every type that has an affine form.

MLX's affine format stores, per group of 32 weights, ``w = scale·q + bias`` with ``q`` packed
LSB-first into uint32. A type's record (``macft.quants``) says whether and how its blocks map onto
that form with no rounding at all (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K), so ``mx.dequantize``
returns bit for bit what ggml computes. Scales and biases stay float32: ``d·sc`` of the K-quants
and ``d·q`` of the others are exact in float32 but not in float16.

    q = quantize_exact(rows, GGMLQuantizationType.Q4_K)   # QuantizedWeight, or None without an affine form
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

from macft.quants import quant_type
from macft.quants.base import AFFINE_GROUP

GROUP_SIZE = AFFINE_GROUP


@dataclass
class QuantizedWeight:
    weight: np.ndarray  # uint32, (rows, columns·bits/32)
    scales: np.ndarray  # float32, (rows, columns/32)
    biases: np.ndarray  # float32, (rows, columns/32)
    bits: int


def quantize_exact(rows: np.ndarray, qtype: GGMLQuantizationType) -> QuantizedWeight | None:
    """Re-pack ``(rows, bytes per row)`` GGUF bytes as MLX affine weights; None if ``qtype`` has no exact form."""
    record = quant_type(qtype)
    if record.affine is None:
        return None
    n_rows = rows.shape[0]
    blocks = np.ascontiguousarray(rows).reshape(-1, record.block_bytes)
    # A corrupt scale (inf/NaN half) is the file's fault, named by the per-tensor finiteness check
    # that follows; numpy's warning about it would only be noise above that one line.
    with np.errstate(invalid="ignore", over="ignore"):
        q, scales, biases = record.affine(blocks)
    return QuantizedWeight(
        weight=pack(q.reshape(n_rows, -1), record.affine_bits),
        scales=scales.reshape(n_rows, -1),
        biases=biases.reshape(n_rows, -1),
        bits=record.affine_bits,
    )


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers ``0 ≤ q < 2**bits`` (rows, columns) LSB-first into uint32 words, as MLX does."""
    n_rows = q.shape[0]
    q = q.astype(np.uint8, copy=False)
    if bits == 8:
        packed = q
    elif bits == 4:
        pairs = q.reshape(n_rows, -1, 2)
        packed = pairs[..., 0] | (pairs[..., 1] << 4)
    else:
        # eight values of `bits` bits fill exactly `bits` bytes
        octets = q.reshape(-1, 8).astype(np.uint64) << (np.arange(8, dtype=np.uint64) * np.uint64(bits))
        words = np.bitwise_or.reduce(octets, axis=1)
        packed = words.view(np.uint8).reshape(-1, 8)[:, :bits]
    return np.ascontiguousarray(packed).reshape(n_rows, -1).view("<u4")
