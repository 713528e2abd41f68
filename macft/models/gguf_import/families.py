"""What differs between architectures on import: tensor names, config.json, and weight layout fixes.

Each ``Family`` says how llama.cpp's names map to mlx-lm's (HF) names, how the GGUF metadata
becomes the config.json mlx-lm expects, and which tensors need a fix: Gemma stores ``1 + w`` for
every RMSNorm, and llama.cpp permutes the q/k rows of ``llama`` models for its rotary layout.

    family = family_for(gguf)
    config = family.config(gguf)
    name = family.hf_name("blk.3.attn_q.weight")      # "model.layers.3.self_attn.q_proj.weight"
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from macft.errors import MacftError
from macft.models.gguf_import.reader import GGUFFile

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# per-block GGUF name -> mlx-lm name under model.layers.N
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# phi3 fuses q/k/v and gate/up; mlx-lm's phi3 keeps them fused too (gate rows first)
_PHI3_LAYER_NAMES = {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}


@dataclass(frozen=True)
class Family:
    arch: str  # GGUF general.architecture
    model_type: str  # mlx-lm / HF model_type
    config_extra: Callable[[GGUFFile, dict], dict]
    layer_names: dict[str, str] = field(default_factory=lambda: dict(_LAYER_NAMES))
    norm_offset: float = 0.0  # GGUF norm weight minus this is the HF weight
    permute_qk: bool = False  # llama.cpp's rotary row order for q/k (llama, mistral)
    config_tensors: tuple[str, ...] = ()  # tensors consumed by config(), not weights

    def hf_name(self, name: str) -> str:
        if name in self.config_tensors:
            return ""
        stem, _, suffix = name.rpartition(".")
        if stem in _GLOBAL and suffix in ("weight", "bias"):
            return f"{_GLOBAL[stem]}.{suffix}"
        match = _BLOCK.match(name)
        if match and match.group(2) in self.layer_names:
            layer, part, suffix = match.groups()
            return f"model.layers.{layer}.{self.layer_names[part]}.{suffix}"
        raise MacftError(f"Tensor '{name}' is not part of a standard {self.arch} model; this GGUF variant is not supported.")

    def config(self, gguf: GGUFFile) -> dict:
        common = _common_config(gguf, self)
        return common | self.config_extra(gguf, common)

    def fix_rows(self, hf_name: str, rows: np.ndarray, config: dict) -> np.ndarray:
        """Undo llama.cpp's q/k row permutation; ``rows`` may be raw quantized bytes or floats."""
        if not self.permute_qk:
            return rows
        if ".self_attn.q_proj." in hf_name:
            return unpermute_rows(rows, config["num_attention_heads"])
        if ".self_attn.k_proj." in hf_name:
            return unpermute_rows(rows, config["num_key_value_heads"])
        return rows

    def fix_float(self, hf_name: str, values: np.ndarray) -> np.ndarray:
        if self.norm_offset and "norm." in hf_name:
            return values.astype(np.float32) - np.float32(self.norm_offset)
        return values


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``reshape(n, 2, r/n/2).swapaxes(1, 2)`` on the rows of q/k."""
    n_rows = rows.shape[0]
    return rows.reshape(n_head, n_rows // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _int(gguf: GGUFFile, key: str, default: int | None = None) -> int:
    value = gguf.arch_key(key, default)
    if isinstance(value, list):  # some files store a per-layer list; mlx-lm needs one value
        if len(set(value)) != 1:
            raise MacftError(f"{gguf.path}: {gguf.architecture}.{key} differs between layers, which mlx-lm does not support.")
        value = value[0]
    if value is None:
        raise MacftError(f"{gguf.path} lacks the metadata key {gguf.architecture}.{key}; the file is incomplete.")
    return int(value)


def _common_config(gguf: GGUFFile, family: Family) -> dict:
    heads = _int(gguf, "attention.head_count")
    embd = gguf.tensors["token_embd.weight"].shape
    config = {
        "model_type": family.model_type,
        "hidden_size": _int(gguf, "embedding_length"),
        "num_hidden_layers": _int(gguf, "block_count"),
        "intermediate_size": _int(gguf, "feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _int(gguf, "attention.head_count_kv", heads),
        "rms_norm_eps": float(gguf.arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
        "vocab_size": embd[0],
        "max_position_embeddings": _int(gguf, "context_length", 4096),
        "rope_theta": float(gguf.arch_key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }
    if gguf.arch_key("attention.key_length") is not None:
        config["head_dim"] = _int(gguf, "attention.key_length")
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        if (value := gguf.metadata.get(f"tokenizer.ggml.{key}")) is not None:
            config[key.replace("padding", "pad")] = int(value)
    if gguf.arch_key("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(gguf.arch_key("rope.scaling.factor", 1.0))}
    return config


def _gemma3(gguf: GGUFFile, common: dict) -> dict:
    head_dim = common.get("head_dim", 256)
    layers = common["num_hidden_layers"]
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer 27B model
    scalar = common["hidden_size"] // common["num_attention_heads"] if layers == 62 else head_dim
    return {
        "head_dim": head_dim,
        "query_pre_attn_scalar": scalar,
        "rope_local_base_freq": float(gguf.arch_key("rope.freq_base_swa", 10000.0)),
        "sliding_window": _int(gguf, "attention.sliding_window", 4096),
        "sliding_window_pattern": _gemma3_pattern(gguf),
        "architectures": ["Gemma3ForCausalLM"],
    }


def _gemma3_pattern(gguf: GGUFFile) -> int:
    """llama.cpp's default is 5 sliding layers then one global; a per-layer bool list may override it."""
    pattern = gguf.arch_key("attention.sliding_window_pattern")
    if pattern is None:
        return 6
    if isinstance(pattern, list):
        period = pattern.index(False) + 1 if False in pattern else len(pattern) + 1
        expected = [(i + 1) % period != 0 for i in range(len(pattern))]
        if list(map(bool, pattern)) != expected:
            raise MacftError(f"{gguf.path}: the sliding-window layer pattern is irregular, which mlx-lm's gemma3 cannot express.")
        return period
    return int(pattern)


def _llama(gguf: GGUFFile, common: dict) -> dict:
    extra: dict = {"architectures": ["LlamaForCausalLM"], "attention_bias": "blk.0.attn_q.bias" in gguf.tensors}
    head_dim = common.get("head_dim", common["hidden_size"] // common["num_attention_heads"])
    rope_dims = gguf.arch_key("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise MacftError(f"{gguf.path}: partial rotary embeddings on a llama model are not supported.")
    if "rope_freqs.weight" in gguf.tensors:
        freqs = gguf.rows("rope_freqs.weight").view(np.float32).ravel()
        extra["rope_scaling"] = llama3_rope_scaling(freqs, common["rope_theta"], head_dim, str(gguf.path))
    return extra


def llama3_rope_scaling(divisors: np.ndarray, base: float, dims: int, where: str) -> dict:
    """Recover Llama 3.1's rope_scaling from llama.cpp's per-frequency divisors.

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


def _qwen2(gguf: GGUFFile, common: dict) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"]}


def _qwen3(gguf: GGUFFile, common: dict) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "head_dim": common.get("head_dim", 128)}


def _phi3(gguf: GGUFFile, common: dict) -> dict:
    head_dim = common["hidden_size"] // common["num_attention_heads"]
    rope_dims = int(gguf.arch_key("rope.dimension_count", head_dim))
    extra: dict = {"architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": rope_dims / head_dim}
    if "rope_factors_long.weight" in gguf.tensors:
        original = _int(gguf, "rope.scaling.original_context_length", 4096)
        extra["original_max_position_embeddings"] = original
        extra["rope_scaling"] = {
            "type": "longrope",
            "long_factor": gguf.rows("rope_factors_long.weight").view(np.float32).ravel().tolist(),
            "short_factor": gguf.rows("rope_factors_short.weight").view(np.float32).ravel().tolist(),
        }
    return extra


FAMILIES = {
    "gemma3": Family("gemma3", "gemma3_text", _gemma3, _GEMMA_LAYER_NAMES, norm_offset=1.0),
    "llama": Family("llama", "llama", _llama, permute_qk=True, config_tensors=("rope_freqs.weight",)),
    "qwen2": Family("qwen2", "qwen2", _qwen2),
    "qwen3": Family("qwen3", "qwen3", _qwen3),
    "phi3": Family(
        "phi3", "phi3", _phi3, _PHI3_LAYER_NAMES, config_tensors=("rope_factors_long.weight", "rope_factors_short.weight")
    ),
}


def family_for(gguf: GGUFFile) -> Family:
    arch = gguf.architecture
    if arch not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise MacftError(f"{gguf.path.name}: architecture '{arch or '?'}' is not supported for import; supported: {known}.")
    if "token_embd.weight" not in gguf.tensors:
        raise MacftError(f"{gguf.path} has no token_embd.weight tensor; it is not a complete {arch} model.")
    return FAMILIES[arch]
