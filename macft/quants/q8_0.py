"""Q8_0: blocks of 32 int8 levels q and one float16 scale d; w = d·q.

Plain rounding is gguf-py's (bit-exact with ggml). With importance, the scale comes from the
weighted ``make_qx_quants`` search. Exact affine form: 8 bits of q + 128, scale d, bias −128·d.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

from macft.quants.base import QuantType, f16_at, f16_bytes, gguf_py_decoder, gguf_py_encoder
from macft.quants.searches import symmetric_weighted


def _encode_weighted(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    found, scale = symmetric_weighted(rows, importance, 128)
    quants = (found - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([f16_bytes(scale), quants], axis=1).reshape(rows.shape[0], -1)


def _affine(blocks: np.ndarray):
    d = f16_at(blocks, 0)
    return blocks[:, 2:] ^ np.uint8(0x80), d, -128 * d


TYPES = (
    QuantType(
        Q.Q8_0,
        block_size=32,
        block_bytes=34,
        decode=gguf_py_decoder(Q.Q8_0),
        encode=gguf_py_encoder(Q.Q8_0),
        encode_weighted=_encode_weighted,
        affine=_affine,
        affine_bits=8,
    ),
)
