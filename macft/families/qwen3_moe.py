"""Qwen3-MoE: mlx-lm ``qwen3_moe``, llama.cpp ``qwen3moe``.

Qwen3's attention with a mixture-of-experts MLP in every block: a router (``mlp.gate``) picks
``num_experts_per_tok`` of ``num_experts`` SwiGLU experts per token and weighs them by their
renormalised softmax scores. mlx-lm stacks the experts into 3-D ``switch_mlp`` weights
(experts × out × in), the layout of llama.cpp's ``ffn_*_exps`` tensors, so they travel unchanged.
llama.cpp always renormalises the top-k scores and makes every block sparse, so only models with
``norm_topk_prob``, ``decoder_sparse_step`` 1 and no ``mlp_only_layers`` are exported.
"""

from __future__ import annotations

from macft.errors import MacftError
from macft.families.base import CHATML, LAYER_NAMES, Family, gguf_int, head_dim


def tiny_config(common: dict) -> dict:
    return {
        **common,
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "head_dim": head_dim(common),
        "tie_word_embeddings": True,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": common["hidden_size"],
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    }


def import_config(gguf, common: dict) -> dict:
    return {
        "head_dim": common.get("head_dim", 128),
        "num_experts": gguf_int(gguf, "expert_count"),
        "num_experts_per_tok": gguf_int(gguf, "expert_used_count"),
        "moe_intermediate_size": gguf_int(gguf, "expert_feed_forward_length"),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    }


def export_hparams(writer, config: dict) -> None:
    if not config.get("norm_topk_prob", False) or int(config.get("decoder_sparse_step", 1)) != 1 or config.get("mlp_only_layers"):
        raise MacftError(
            "llama.cpp's qwen3moe renormalises the top-k expert scores in every block; this model "
            "(norm_topk_prob false, dense layers or decoder_sparse_step > 1) would run differently there."
        )
    writer.add_expert_count(int(config["num_experts"]))
    writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    writer.add_expert_feed_forward_length(int(config["moe_intermediate_size"]))


def planner_shape(config: dict) -> dict:
    return {
        "intermediate": int(config["moe_intermediate_size"]),
        "experts": int(config["num_experts"]),
        "experts_per_token": int(config["num_experts_per_tok"]),
    }


FAMILY = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    gguf_arch="qwen3moe",
    architectures=("Qwen3MoeForCausalLM",),
    tiny_config=tiny_config,
    import_config=import_config,
    export_hparams=export_hparams,
    layer_names={
        **LAYER_NAMES,
        "ffn_gate_inp": "mlp.gate",
        "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
        "ffn_up_exps": "mlp.switch_mlp.up_proj",
        "ffn_down_exps": "mlp.switch_mlp.down_proj",
    },
    export_renames={".switch_mlp.": ".experts."},
    writes_head_dim=True,
    gated_mlps={"qwen3_moe.MLP": "silu"},  # dense blocks; the experts' SwitchGLU keeps mlx-lm's own
    chat_format=CHATML,
    planner_shape=planner_shape,
)
