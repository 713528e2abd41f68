"""The types macft reads (a GGUF import decodes them to float) but never writes: gguf-py decodes
them exactly as ggml does. Giving one an encoder moves it to a module of its own."""

from __future__ import annotations

from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from macft.quants.base import QuantType, gguf_py_decoder

_SIZES = (  # (type, weights per block, bytes per block)
    ("Q2_K", 256, 84),
    ("Q3_K", 256, 110),
    ("IQ1_S", 256, 50),
    ("IQ1_M", 256, 56),
    ("IQ2_XXS", 256, 66),
    ("IQ2_XS", 256, 74),
    ("IQ2_S", 256, 82),
    ("IQ3_XXS", 256, 98),
    ("IQ3_S", 256, 110),
    ("IQ4_NL", 32, 18),
    ("IQ4_XS", 256, 136),
    ("TQ1_0", 256, 54),
    ("TQ2_0", 256, 66),
    ("MXFP4", 32, 17),
    ("NVFP4", 64, 36),
)

# Each type the installed gguf-py knows and decodes (older versions lack the newest types).
TYPES = tuple(
    QuantType(Q[name], block_size=size, block_bytes=nbytes, decode=gguf_py_decoder(Q[name]))
    for name, size, nbytes in _SIZES
    if name in Q.__members__ and hasattr(gguf_quants, name)
)
