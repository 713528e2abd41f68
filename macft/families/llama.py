"""Llama 2/3.x and Mistral: mlx-lm ``llama`` / ``mistral``, llama.cpp ``llama``.

llama.cpp interleaves the rotary rows of q and k (``permute_qk``), and keeps Llama 3.1's
"llama3" RoPE scaling as an F32 ``rope_freqs`` tensor of per-frequency divisors: export computes
them from config.json, import recovers config.json from them (both below).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from macft.errors import MacftError
from macft.families.base import ChatFormat, Family, head_dim, rope_scaling

ROPE_FREQS = "rope_freqs.weight"


def tiny_config(common: dict) -> dict:
    return {**common, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}


def import_config(gguf, common: dict) -> dict:
    extra: dict = {"attention_bias": "blk.0.attn_q.bias" in gguf.tensors}
    dims = common.get("head_dim", common["hidden_size"] // common["num_attention_heads"])
    rope_dims = gguf.arch_key("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != dims:
        raise MacftError(f"{gguf.path}: partial rotary embeddings on a llama model are not supported.")
    if ROPE_FREQS in gguf.tensors:
        divisors = gguf.rows(ROPE_FREQS).view(np.float32).ravel()
        extra["rope_scaling"] = llama3_rope_scaling(divisors, common["rope_theta"], dims, str(gguf.path))
    return extra


def export_hparams(writer, config: dict) -> None:
    writer.add_rope_dimension_count(head_dim(config))


def export_tensors(config: dict) -> Iterator[tuple[str, np.ndarray]]:
    scaling = rope_scaling(config)
    if scaling and scaling["kind"] == "llama3":
        yield ROPE_FREQS, llama3_rope_factors(config)


def llama3_rope_factors(config: dict) -> np.ndarray:
    """Per-frequency divisors for Llama 3.1+ RoPE (long wavelengths stretched by ``factor``)."""
    scaling = config["rope_scaling"]
    dim = head_dim(config)
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / (float(config.get("rope_theta", 10000.0)) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended))
    return factors.astype(np.float32)


def llama3_rope_scaling(divisors: np.ndarray, base: float, dims: int, where: str) -> dict:
    """The inverse of ``llama3_rope_factors``: Llama 3.1's rope_scaling from the divisors.

    GGUF keeps only the divisors. Between the two cut-offs the divisor is 1 / ((1 - s)/f + s) with
    s linear in 1/wavelength; two such points fix that line, and any (original context, low,
    high) on it gives the same frequencies, so the original context is set to 8192 (Llama 3's)."""
    factor = float(divisors.max())
    wavelens = 2 * math.pi * base ** (np.arange(0, dims, 2) / dims)
    medium = (divisors > 1.0 + 1e-6) & (divisors < factor - 1e-6)
    if factor <= 1.0 or medium.sum() < 2:
        raise MacftError(f"{where}: its rope_freqs tensor does not follow Llama 3's scaling; this file is not supported.")
    smooth = (1.0 / divisors[medium] - 1.0 / factor) / (1.0 - 1.0 / factor)
    slope, intercept = np.polyfit(1.0 / wavelens[medium], smooth, 1)
    context = 8192
    width = context / slope
    low = -intercept * width
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(low),
        "high_freq_factor": float(low + width),
        "original_max_position_embeddings": context,
    }


LLAMA3_HEADERS = ChatFormat(
    "llama3",
    "<|start_header_id|>",
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ("<|eot_id|>",),
)

FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral"),
    gguf_arch="llama",
    architectures=("LlamaForCausalLM",),
    tiny_config=tiny_config,
    import_config=import_config,
    export_hparams=export_hparams,
    export_tensors=export_tensors,
    config_tensors=(ROPE_FREQS,),
    rope_kinds_as_tensors=("llama3",),
    permute_qk=True,
    gated_mlps={"llama.MLP": "silu"},
    chat_format=LLAMA3_HEADERS,
)
