"""F32, F16 and BF16: every weight stored on its own.

F16 decodes to float16 (exact, and half the memory of float32); BF16 to float32 (numpy has no
bfloat16), exactly: a bfloat16 is the top half of a float32. BF16 rounding is gguf-py's (ggml's
round to nearest even, NaNs kept quiet).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

from macft.quants.base import QuantType, gguf_py_encoder


def _bytes_of(dtype):
    def encode(rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(rows.astype(dtype, copy=False)).view(np.uint8)

    return encode


def _bf16_decode(rows: np.ndarray) -> np.ndarray:
    return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


TYPES = (
    QuantType(Q.F32, block_size=1, block_bytes=4, decode=lambda rows: rows.view(np.float32), encode=_bytes_of(np.float32)),
    QuantType(Q.F16, block_size=1, block_bytes=2, decode=lambda rows: rows.view(np.float16), encode=_bytes_of(np.float16)),
    QuantType(Q.BF16, block_size=1, block_bytes=2, decode=_bf16_decode, encode=gguf_py_encoder(Q.BF16)),
)
