"""Phi-3: mlx-lm ``phi3``, llama.cpp ``phi3``.

q/k/v and gate/up are fused (``qkv_proj``, ``gate_up_proj`` with the gate rows first) in both
mlx-lm and GGUF; rotary embeddings may be partial; LongRoPE factors travel as two F32 tensors.
"""

from __future__ import annotations

import numpy as np

from macft.families.base import LAYER_NAMES, ChatFormat, Family, gguf_int

LONG_FACTORS, SHORT_FACTORS = "rope_factors_long.weight", "rope_factors_short.weight"


def tiny_config(common: dict) -> dict:
    return {**common, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "tie_word_embeddings": False}


def import_config(gguf, common: dict) -> dict:
    dims = common["hidden_size"] // common["num_attention_heads"]
    rope_dims = int(gguf.arch_key("rope.dimension_count", dims))
    extra: dict = {"partial_rotary_factor": rope_dims / dims}
    if LONG_FACTORS in gguf.tensors:
        extra["original_max_position_embeddings"] = gguf_int(gguf, "rope.scaling.original_context_length", 4096)
        extra["rope_scaling"] = {
            "type": "longrope",
            "long_factor": gguf.rows(LONG_FACTORS).view(np.float32).ravel().tolist(),
            "short_factor": gguf.rows(SHORT_FACTORS).view(np.float32).ravel().tolist(),
        }
    return extra


def export_hparams(writer, config: dict) -> None:
    rotary = float(config.get("partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(int(rotary * config["hidden_size"] / config["num_attention_heads"]))
    if config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))


PHI3_TAGS = ChatFormat(
    "phi3",
    "<|end|>",
    "{{- if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
    "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
    ("<|end|>",),
)

FAMILY = Family(
    name="phi3",
    model_types=("phi3",),
    gguf_arch="phi3",
    architectures=("Phi3ForCausalLM",),
    tiny_config=tiny_config,
    import_config=import_config,
    export_hparams=export_hparams,
    config_tensors=(LONG_FACTORS, SHORT_FACTORS),
    layer_names={**LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    lora_aliases={"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
    gated_mlps={"phi3.MLP": "silu"},
    chat_format=PHI3_TAGS,
)
