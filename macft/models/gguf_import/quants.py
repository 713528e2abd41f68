"""Turn GGUF tensor bytes into MLX arrays: exact affine-quantized weights where MLX can hold the
format, float32 otherwise.

MLX's affine format stores, per group of 32 weights, ``w = scale·q + bias`` with ``q`` packed
LSB-first into uint32. Each type below maps onto it with no rounding at all, so
``mx.dequantize`` returns bit-for-bit what ``gguf.quants.dequantize`` returns:

    Q8_0  d·q            → 8 bits, q + 128, scale d,       bias −128·d
    Q4_0  d·(q − 8)      → 4 bits,          scale d,       bias −8·d
    Q5_0  d·(q − 16)     → 5 bits,          scale d,       bias −16·d
    Q4_1  d·q + m        → 4 bits,          scale d,       bias m
    Q5_1  d·q + m        → 5 bits,          scale d,       bias m
    Q4_K  d·sc·q − dmin·mn (per 32 of 256) → 4 bits, scale d·sc, bias −dmin·mn
    Q5_K  the same with a fifth bit        → 5 bits

Scales and biases are float32: ``d·sc`` of the K-quants and ``d·q`` of the others are exact in
float32 but not in float16. Q6_K (groups of 16) and the remaining types have no exact MLX form
and are dequantized to float32.

    q = quantize_exact(rows, GGMLQuantizationType.Q4_K)   # QuantizedWeight or None
    w = to_float(rows, qtype, shape)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K, dequantize

Q = GGMLQuantizationType
GROUP_SIZE = 32
EXACT_BITS = {Q.Q8_0: 8, Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q4_K: 4, Q.Q5_K: 5}


@dataclass
class QuantizedWeight:
    weight: np.ndarray  # uint32, (rows, columns·bits/32)
    scales: np.ndarray  # float32, (rows, columns/32)
    biases: np.ndarray  # float32, (rows, columns/32)
    bits: int


def quantize_exact(rows: np.ndarray, qtype: GGMLQuantizationType) -> QuantizedWeight | None:
    """Re-pack ``(rows, bytes per row)`` GGUF bytes as MLX affine weights; None if ``qtype`` has no exact form."""
    if qtype not in EXACT_BITS:
        return None
    n_rows = rows.shape[0]
    block_weights, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(rows).reshape(-1, block_bytes)
    # A corrupt scale (inf/NaN half) is the file's fault, named by the per-tensor finiteness check
    # that follows; numpy's warning about it would only be noise above that one line.
    with np.errstate(invalid="ignore", over="ignore"):
        q, scales, biases = _UNPACK[qtype](blocks)
    bits = EXACT_BITS[qtype]
    return QuantizedWeight(
        weight=pack(q.reshape(n_rows, -1), bits),
        scales=scales.reshape(n_rows, -1),
        biases=biases.reshape(n_rows, -1),
        bits=bits,
    )


def to_float(rows: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Any GGUF tensor as float: F16 stays float16, everything else becomes float32 (BF16 exactly;
    numpy has no bfloat16)."""
    if qtype == Q.F32:
        return rows.view(np.float32).reshape(shape)
    if qtype == Q.F16:
        return rows.view(np.float16).reshape(shape)
    if qtype == Q.BF16:
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return dequantize(rows, qtype).astype(np.float32, copy=False).reshape(shape)


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


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Weight j of a 32-block is the low nibble of byte j, weight j + 16 the high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Bit j of a little-endian u32 is the fifth bit of weight j."""
    words = qh.copy().view("<u4")
    return ((words >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q8_0(blocks):
    d = _f16(blocks, 0)
    return blocks[:, 2:] ^ np.uint8(0x80), d, -128 * d


def _q4_0(blocks):
    d = _f16(blocks, 0)
    return _nibbles(blocks[:, 2:18]), d, -8 * d


def _q4_1(blocks):
    return _nibbles(blocks[:, 4:20]), _f16(blocks, 0), _f16(blocks, 2)


def _q5_0(blocks):
    d = _f16(blocks, 0)
    return _nibbles(blocks[:, 6:22]) | (_high_bits(blocks[:, 2:6]) << 4), d, -16 * d


def _q5_1(blocks):
    q = _nibbles(blocks[:, 8:24]) | (_high_bits(blocks[:, 4:8]) << 4)
    return q, _f16(blocks, 0), _f16(blocks, 2)


def _k_scales(blocks):
    """Per 32-weight sub-block scale d·sc and bias −dmin·mn, from the 6-bit packed table."""
    sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])
    return _f16(blocks, 0) * sc.astype(np.float32), -(_f16(blocks, 2) * mn.astype(np.float32))


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Each 32 bytes hold two sub-blocks: the low nibbles, then the high nibbles."""
    chunks = qs.reshape(qs.shape[0], -1, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (chunks & 0x0F).reshape(qs.shape[0], -1)


def _q4_k(blocks):
    scales, biases = _k_scales(blocks)
    return _k_nibbles(blocks[:, 16:144]), scales, biases


def _q5_k(blocks):
    scales, biases = _k_scales(blocks)
    # bit j of byte l is the fifth bit of weight l of sub-block j
    qh = blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    high = (qh & 1).reshape(blocks.shape[0], -1)
    return _k_nibbles(blocks[:, 48:176]) | (high << 4), scales, biases


_UNPACK = {Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k}
