"""Qwen3 (dense): mlx-lm ``qwen3``, llama.cpp ``qwen3``; RMSNorm on q and k per head; ChatML turns."""

from __future__ import annotations

from macft.families.base import CHATML, Family, head_dim


def tiny_config(common: dict) -> dict:
    return {
        **common,
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "head_dim": head_dim(common),
        "tie_word_embeddings": True,
    }


def import_config(gguf, common: dict) -> dict:
    return {"head_dim": common.get("head_dim", 128)}


FAMILY = Family(
    name="qwen3",
    model_types=("qwen3",),
    gguf_arch="qwen3",
    architectures=("Qwen3ForCausalLM",),
    tiny_config=tiny_config,
    import_config=import_config,
    writes_head_dim=True,
    gated_mlps={"qwen3.MLP": "silu"},
    chat_format=CHATML,
)
