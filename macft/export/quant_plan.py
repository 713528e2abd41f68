"""Which GGUF type each tensor gets for a ``--quant`` choice (llama.cpp's mixture rules).

    scheme = SCHEMES["q4_k_m"]
    qtype = tensor_type("blk.0.attn_v.weight", (256, 640), scheme, n_layers=18, tied=True)

The rules follow ``llama-quantize`` without an importance matrix:
* 1-D tensors (norms, biases, rope factors) and mixture-of-experts routers stay F32;
* the output projection, or the token embedding when it is tied to the output, goes to Q6_K
  (Q8_0 stays Q8_0);
* Q4_K_M / Q5_K_M put attn_v and ffn_down (ffn_down_exps of MoE models too) at Q6_K in the first and last eighth of the layers
  and every third layer between; a fused attn_qkv gets Q5_K / Q6_K;
* a row length that is not a multiple of the type's block falls back: Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0, and to F16 when even 32 does not divide it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as Q


@dataclass(frozen=True)
class Scheme:
    name: str
    file_type: LlamaFileType
    base: Q
    mixture: bool = False  # the _M rules for attn_v / ffn_down / attn_qkv


SCHEMES = {
    "f16": Scheme("f16", LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": Scheme("bf16", LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": Scheme("q8_0", LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": Scheme("q4_0", LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
    "q4_k_m": Scheme("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K, mixture=True),
    "q5_k_m": Scheme("q5_k_m", LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K, mixture=True),
    "q6_k": Scheme("q6_k", LlamaFileType.MOSTLY_Q6_K, Q.Q6_K),
}

FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], scheme: Scheme, n_layers: int, tied: bool) -> Q:
    """The GGUF type of tensor ``name`` whose numpy shape is ``shape`` (rows, row length)."""
    if len(shape) < 2 or ".ffn_gate_inp." in name:
        return Q.F32  # an MoE router stays F32, as convert_hf_to_gguf and llama-quantize keep it
    if scheme.base in (Q.F16, Q.BF16):
        return scheme.base
    chosen = scheme.base
    layer = _LAYER.match(name)
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        chosen = Q.Q8_0 if scheme.base == Q.Q8_0 else Q.Q6_K
    elif scheme.mixture and layer and (".attn_v." in name or ".ffn_down" in name):  # ffn_down_exps too
        if more_bits(int(layer.group(1)), n_layers):
            chosen = Q.Q6_K
    elif scheme.mixture and ".attn_qkv." in name:
        chosen = Q.Q5_K if scheme.base == Q.Q4_K else Q.Q6_K
    row = shape[-1]
    if row % GGML_QUANT_SIZES[chosen][0]:
        chosen = FALLBACK.get(chosen, chosen)
    if row % GGML_QUANT_SIZES[chosen][0]:
        chosen = Q.F16
    return chosen
