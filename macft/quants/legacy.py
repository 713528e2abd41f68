"""Q4_0, Q4_1, Q5_0 and Q5_1: ggml's first block types, 32 weights each with a float16 scale d.

    Q4_0  d·(q − 8)     q: 4 bits          Q4_1  d·q + m   q: 4 bits, float16 min m
    Q5_0  d·(q − 16)    q: 5 bits          Q5_1  d·q + m   q: 5 bits, float16 min m

A block stores weight j in the low nibble of byte j and weight j + 16 in its high nibble; the fifth
bits sit in one little-endian 32-bit word, bit j for weight j. Plain rounding is gguf-py's (bit-exact
with ggml). With importance, Q4_0 and Q5_0 take the weighted ``make_qx_quants`` scale and Q5_1 the
weighted ``make_qkx2_quants`` scale and min. Every one maps exactly onto the affine form
w = scale·q + bias: the scale is d and the bias −8·d, −16·d or m.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

from macft.quants.base import QuantType, f16_at, f16_bytes, gguf_py_decoder, gguf_py_encoder
from macft.quants.searches import make_qkx2_quants, symmetric_weighted, weighted_blocks_of_32


def _pack_nibbles(levels: np.ndarray) -> np.ndarray:
    low = (levels & 0xF).astype(np.uint8)
    return low[:, :16] | (low[:, 16:] << 4)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _pack_fifth_bits(levels: np.ndarray) -> np.ndarray:
    bits = ((levels >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)


def _unpack_fifth_bits(qh: np.ndarray) -> np.ndarray:
    words = qh.copy().view("<u4")
    return ((words >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


# ---------------------------------------------------------------------------- Q4_0


def _q4_0_weighted(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    found, scale = symmetric_weighted(rows, importance, 8)
    return np.concatenate([f16_bytes(scale), _pack_nibbles(found)], axis=1).reshape(rows.shape[0], -1)


def _q4_0_affine(blocks: np.ndarray):
    d = f16_at(blocks, 0)
    return _unpack_nibbles(blocks[:, 2:18]), d, -8 * d


# ---------------------------------------------------------------------------- Q4_1


def _q4_1_affine(blocks: np.ndarray):
    return _unpack_nibbles(blocks[:, 4:20]), f16_at(blocks, 0), f16_at(blocks, 2)


# ---------------------------------------------------------------------------- Q5_0


def _q5_0_weighted(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    found, scale = symmetric_weighted(rows, importance, 16)
    packed = [f16_bytes(scale), _pack_fifth_bits(found), _pack_nibbles(found)]
    return np.concatenate(packed, axis=1).reshape(rows.shape[0], -1)


def _q5_0_affine(blocks: np.ndarray):
    d = f16_at(blocks, 0)
    return _unpack_nibbles(blocks[:, 6:22]) | (_unpack_fifth_bits(blocks[:, 2:6]) << 4), d, -16 * d


# ---------------------------------------------------------------------------- Q5_1


def _q5_1_weighted(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    blocks, weights = weighted_blocks_of_32(rows, importance)
    found, scale, neg_min = make_qkx2_quants(blocks, weights, 31, -0.9, 0.1, 18)
    found = found.astype(np.int32)
    packed = [f16_bytes(scale), f16_bytes(-neg_min), _pack_fifth_bits(found), _pack_nibbles(found)]
    return np.concatenate(packed, axis=1).reshape(rows.shape[0], -1)


def _q5_1_affine(blocks: np.ndarray):
    q = _unpack_nibbles(blocks[:, 8:24]) | (_unpack_fifth_bits(blocks[:, 4:8]) << 4)
    return q, f16_at(blocks, 0), f16_at(blocks, 2)


def _legacy(qtype: Q, block_bytes: int, bits: int, affine, encode_weighted=None) -> QuantType:
    return QuantType(
        qtype,
        block_size=32,
        block_bytes=block_bytes,
        decode=gguf_py_decoder(qtype),
        encode=gguf_py_encoder(qtype),
        encode_weighted=encode_weighted,
        affine=affine,
        affine_bits=bits,
    )


TYPES = (
    _legacy(Q.Q4_0, 18, 4, _q4_0_affine, _q4_0_weighted),
    _legacy(Q.Q4_1, 20, 4, _q4_1_affine),
    _legacy(Q.Q5_0, 22, 5, _q5_0_affine, _q5_0_weighted),
    _legacy(Q.Q5_1, 24, 5, _q5_1_affine, _q5_1_weighted),
)
