"""The record each GGUF tensor type declares (``QuantType``), and the byte helpers several types share.

Every function of a record works on 2-D arrays, one tensor row per array row: ``encode`` takes
float32 ``(rows, weights per row)``, a multiple of ``block_size`` weights, and returns the packed
blocks as uint8 ``(rows, bytes per row)``; ``decode`` takes those bytes back to values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

Rows = np.ndarray
Affine = tuple[np.ndarray, np.ndarray, np.ndarray]
AFFINE_GROUP = 32  # weights per scale and bias of the exact affine form (MLX's smallest group)


@dataclass(frozen=True)
class QuantType:
    """Everything macft knows about one GGUF tensor type."""

    qtype: Q  # its name and ggml's type id
    block_size: int  # weights per block
    block_bytes: int  # bytes per block
    # bytes -> float32 values, equal to ggml's own decoding (F16 stays float16: exact, half the memory)
    decode: Callable[[Rows], np.ndarray]
    encode: Callable[[Rows], Rows] | None = None  # None: macft reads the type but never writes it
    # (rows, importance of each weight) -> bytes, minimising sum importance·(w − ŵ)² per block; None:
    # the type has no importance-weighted rounding and ``encode`` serves with an importance matrix too
    encode_weighted: Callable[[Rows, np.ndarray], Rows] | None = None
    # The type's exact affine form, when it has one: blocks (n, block_bytes) -> levels q (n, block_size)
    # of ``affine_bits`` bits, scales and biases (n, block_size / AFFINE_GROUP) in float32, with
    # w = scale·q + bias equal to ``decode`` for every weight. What a GGUF import keeps quantized.
    affine: Callable[[np.ndarray], Affine] | None = None
    affine_bits: int = 0
    fallback: Q | None = None  # llama-quantize's type for rows that are not a multiple of block_size

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def is_float(self) -> bool:
        return self.block_size == 1

    def nbytes(self, weights: int) -> int:
        """Bytes that ``weights`` weights (a multiple of the block) take in this type."""
        return weights // self.block_size * self.block_bytes


def gguf_py_codec(qtype: Q):
    """gguf-py's bit-exact codec class of ``qtype``. Called on whole chunks of rows:
    ``gguf.quants.quantize`` and ``dequantize`` cut every array into groups of 16 rows, which costs
    more than the arithmetic."""
    return getattr(gguf_quants, qtype.name)


def gguf_py_decoder(qtype: Q) -> Callable[[Rows], np.ndarray]:
    codec = gguf_py_codec(qtype)

    def decode(rows: Rows) -> np.ndarray:
        codec.init_grid()  # the IQ types' lookup grids, built on first use
        return codec.dequantize_rows(rows)

    return decode


def gguf_py_encoder(qtype: Q) -> Callable[[Rows], Rows]:
    return gguf_py_codec(qtype).quantize_rows


def nearest(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    # ggml rounds with the float "+ 1.5·2^23" trick: round half to even, as np.rint does.
    return np.rint(values, out=out)


def f16_bytes(values: np.ndarray) -> np.ndarray:
    """Each value as its two float16 bytes, (n, 2)."""
    return values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def f16_at(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte ``start`` of every block, as float32 (n, 1)."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)
