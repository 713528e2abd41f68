"""Qwen2 / Qwen2.5: mlx-lm ``qwen2``, llama.cpp ``qwen2``; q/k/v carry biases; ChatML turns."""

from __future__ import annotations

from macft.families.base import CHATML, Family


def tiny_config(common: dict) -> dict:
    return {**common, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True}


def import_config(gguf, common: dict) -> dict:
    return {}


FAMILY = Family(
    name="qwen2",
    model_types=("qwen2",),
    gguf_arch="qwen2",
    architectures=("Qwen2ForCausalLM",),
    tiny_config=tiny_config,
    import_config=import_config,
    gated_mlps={"qwen2.MLP": "silu"},
    chat_format=CHATML,
)
