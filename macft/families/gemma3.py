"""Gemma 3 (text): mlx-lm ``gemma3_text``, llama.cpp ``gemma3``.

GGUF stores every RMSNorm weight as 1 + w (HF keeps w and adds 1 at run time); blocks have four
norms; five sliding-window layers alternate with one global layer; the tokenizer is SentencePiece
without a space prefix.
"""

from __future__ import annotations

from macft.errors import MacftError
from macft.families.base import LAYER_NAMES, ChatFormat, Family, gguf_int, head_dim


def tiny_config(common: dict) -> dict:
    return {
        **common,
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "head_dim": head_dim(common),
        "query_pre_attn_scalar": head_dim(common),
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "sliding_window": 32,
        "sliding_window_pattern": 2,
    }


def import_config(gguf, common: dict) -> dict:
    dims = common.get("head_dim", 256)
    layers = common["num_hidden_layers"]
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer 27B model
    scalar = common["hidden_size"] // common["num_attention_heads"] if layers == 62 else dims
    return {
        "head_dim": dims,
        "query_pre_attn_scalar": scalar,
        "rope_local_base_freq": float(gguf.arch_key("rope.freq_base_swa", 10000.0)),
        "sliding_window": gguf_int(gguf, "attention.sliding_window", 4096),
        "sliding_window_pattern": sliding_window_pattern(gguf),
    }


def sliding_window_pattern(gguf) -> int:
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


def export_hparams(writer, config: dict) -> None:
    writer.add_rope_freq_base_swa(float(config.get("rope_local_base_freq", 10000.0)))
    writer.add_sliding_window(int(config.get("sliding_window", 4096)))
    writer.add_sliding_window_pattern(int(config.get("sliding_window_pattern", 6)))


GEMMA_TURNS = ChatFormat(
    "gemma",
    "<start_of_turn>",
    "{{- if .System }}<start_of_turn>user\n{{ .System }}<end_of_turn>\n{{ end }}"
    "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
    "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
    ("<end_of_turn>",),
)

FAMILY = Family(
    name="gemma3",
    model_types=("gemma3_text", "gemma3"),
    gguf_arch="gemma3",
    architectures=("Gemma3ForCausalLM",),
    tiny_config=tiny_config,
    import_config=import_config,
    export_hparams=export_hparams,
    layer_names={
        **LAYER_NAMES,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    norm_offset=1.0,
    writes_head_dim=True,
    add_space_prefix=False,
    gated_mlps={"gemma3_text.MLP": "gelu_approx"},
    chat_format=GEMMA_TURNS,
    # Gemma blocks also normalise the attention and MLP outputs (two more h) and use a
    # tanh-approximated GELU, whose backward keeps more intermediates than SiLU (two more I).
    saved_extra_hidden=2,
    saved_extra_intermediate=2,
)
