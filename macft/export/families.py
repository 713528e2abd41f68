"""What each supported family looks like in GGUF: architecture string, hyperparameter keys, tensor
names and the weight layouts llama.cpp expects.

    arch = gguf_arch("qwen3")                           # "qwen3"
    add_hparams(writer, config, "qwen3")
    for name, array in gguf_tensors(weights, config, "llama"):  # HF/mlx-lm names -> GGUF names
        ...

Per-family conversions (checked against llama.cpp in tests/test_export_gguf.py):
* llama/mistral: q and k rows are permuted from HF's rotate-half layout to llama.cpp's interleaved one;
  Llama 3.1+ "llama3" RoPE scaling becomes an F32 ``rope_freqs`` tensor.
* gemma3: RMSNorm weights are stored as 1 + w (HF keeps w and adds 1 at run time).
* phi3: the fused ``qkv_proj`` and ``gate_up_proj`` map to ``attn_qkv`` and ``ffn_up`` unchanged.
* tied embeddings: no ``output`` tensor is written; llama.cpp reuses ``token_embd``.
"""

from __future__ import annotations

import math
from typing import Iterator

import gguf
import numpy as np

from macft.errors import MacftError

ARCHES = {
    "gemma3": gguf.MODEL_ARCH.GEMMA3,
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "phi3": gguf.MODEL_ARCH.PHI3,
}


def gguf_arch(family: str) -> str:
    if family not in ARCHES:
        raise MacftError(f"GGUF export does not support the '{family}' family; supported: {', '.join(ARCHES)}.")
    return gguf.MODEL_ARCH_NAMES[ARCHES[family]]


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def n_kv_heads(config: dict) -> int:
    return int(config.get("num_key_value_heads") or config["num_attention_heads"])


# ---------------------------------------------------------------------------- hyperparameters


def add_hparams(writer: gguf.GGUFWriter, config: dict, family: str) -> None:
    """Write the ``{arch}.*`` keys llama.cpp reads for this family."""
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(n_kv_heads(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    if family in ("gemma3", "qwen3") or "head_dim" in config:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if family == "llama":
        writer.add_rope_dimension_count(head_dim(config))
    if family == "phi3":
        rotary = float(config.get("partial_rotary_factor", 1.0))
        writer.add_rope_dimension_count(int(rotary * config["hidden_size"] / config["num_attention_heads"]))
        if config.get("sliding_window"):
            writer.add_sliding_window(int(config["sliding_window"]))
    if family == "gemma3":
        writer.add_rope_freq_base_swa(float(config.get("rope_local_base_freq", 10000.0)))
        writer.add_sliding_window(int(config.get("sliding_window", 4096)))
        writer.add_sliding_window_pattern(int(config.get("sliding_window_pattern", 6)))
    _add_rope_scaling(writer, config, family)


def _rope_scaling(config: dict) -> dict | None:
    scaling = config.get("rope_scaling")
    if not scaling:
        return None
    kind = (scaling.get("rope_type") or scaling.get("type") or "default").lower()
    return None if kind == "default" else {**scaling, "kind": kind}


def _add_rope_scaling(writer: gguf.GGUFWriter, config: dict, family: str) -> None:
    scaling = _rope_scaling(config)
    if scaling is None or (scaling["kind"] == "llama3" and family == "llama"):
        return  # llama3 scaling travels as the rope_freqs tensor
    if scaling["kind"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        return
    raise MacftError(
        f"GGUF export does not handle '{scaling['kind']}' RoPE scaling yet; "
        "convert this model with llama.cpp's convert_hf_to_gguf.py instead."
    )


def _llama3_rope_factors(config: dict) -> np.ndarray:
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


# ---------------------------------------------------------------------------- tensors


def tensor_name_map(config: dict, family: str) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(ARCHES[family], int(config["num_hidden_layers"]))


def gguf_name(name: str, name_map: gguf.TensorNameMap) -> str:
    """The GGUF name of an HF/mlx-lm parameter name (``model.layers.0.self_attn.q_proj.weight``)."""
    mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise MacftError(f"No GGUF name for tensor '{name}': this model has weights llama.cpp does not know.")
    return mapped


def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved rotary rows (whole rows move; works for biases)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def qk_heads(name: str, config: dict, family: str) -> int | None:
    """How many heads to permute this tensor's rows over, or None when it stays as it is."""
    if family != "llama":
        return None
    if ".q_proj." in name:
        return int(config["num_attention_heads"])
    if ".k_proj." in name:
        return n_kv_heads(config)
    return None


def gguf_tensors(weights: dict[str, np.ndarray], config: dict, family: str) -> Iterator[tuple[str, np.ndarray]]:
    """Float32 HF/mlx-lm weights -> (GGUF name, float32 array) in llama.cpp's layout."""
    name_map = tensor_name_map(config, family)
    for name, value in weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp
        value = np.asarray(value, dtype=np.float32)
        heads = qk_heads(name, config, family)
        if heads is not None:
            value = permute_rows(value, heads)
        if family == "gemma3" and "norm" in name:
            value = value + np.float32(1.0)
        yield gguf_name(name, name_map), value
    scaling = _rope_scaling(config)
    if family == "llama" and scaling and scaling["kind"] == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(config)
