"""Gemma 4 (text): mlx-lm ``gemma4_text`` (and the ``gemma4`` wrapper), llama.cpp ``gemma4``.

What Gemma 4 has that earlier families lack, and how each travels through GGUF:

* sliding-window and global layers (``layer_types``) with their own head size: ``head_dim`` is the
  sliding layers' (``attention.key_length_swa``), ``global_head_dim`` the global layers'
  (``attention.key_length``); the pattern is a per-layer bool list;
* the global layers' "proportional" RoPE rotates only ``partial_rotary_factor`` of each head:
  llama.cpp rotates the whole head with per-frequency divisors (``rope_freqs``), 1 for the rotated
  pairs and a huge value (no rotation) for the rest; export computes them, import reads them back;
* the last ``num_kv_shared_layers`` layers reuse the keys and values of the last earlier layer of
  their type (``attention.shared_kv_layers``) and have no k/v projections; with
  ``use_double_wide_mlp`` their MLP is twice as wide, so ``feed_forward_length`` is per layer;
* per-layer inputs (``hidden_size_per_layer_input``): a second embedding table and a projection of
  the hidden state feed a gated residual in every block (``per_layer_*`` tensors);
* a learned per-layer output scale (``layer_scalar`` -> ``layer_output_scale``), attention without
  query scaling, an unweighted RMSNorm on the values and final-logit soft-capping.

Norm weights are stored as they are (Gemma 4 multiplies by w, not 1 + w). The mixture-of-experts
block (26B) and keys-as-values attention (31B) are refused on export: this record maps neither.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from macft.errors import MacftError
from macft.families.base import LAYER_NAMES, ChatFormat, Family, gguf_int

ROPE_FREQS = "rope_freqs.weight"
UNROTATED = 1e30  # a divisor that makes a RoPE angle zero: llama.cpp leaves that pair as it is
SLIDING, GLOBAL = "sliding_attention", "full_attention"
# mlx-lm's ModelArgs defaults, used when config.json has no rope_parameters
DEFAULT_ROPE = {
    GLOBAL: {"rope_type": "proportional", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.25},
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
}


def tiny_config(common: dict) -> dict:
    layers = common["num_hidden_layers"]
    head = common["hidden_size"] // common["num_attention_heads"]
    return {
        **common,
        "model_type": "gemma4_text",
        "architectures": ["Gemma4ForCausalLM"],
        "head_dim": head,
        "global_head_dim": 2 * head,
        # transformers wants the last layer global; sliding and global alternate back from it
        "layer_types": [SLIDING if (layers - i) % 2 == 0 else GLOBAL for i in range(layers)],
        "sliding_window": 32,
        # from four layers on, all but the first sliding/global pair (or three) share their k/v
        "num_kv_shared_layers": 2 * ((layers - 2) // 2),
        "use_double_wide_mlp": True,
        "hidden_size_per_layer_input": 32,
        "vocab_size_per_layer_input": common["vocab_size"],
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
        "rope_parameters": DEFAULT_ROPE,
    }


def text_config(config: dict) -> dict:
    """The decoder's config: the ``gemma4`` wrapper nests it under ``text_config``."""
    return {**config, **config["text_config"]} if isinstance(config.get("text_config"), dict) else config


def layer_types(config: dict) -> list[str]:
    """mlx-lm's rule: the config's list, else ``sliding_window_pattern - 1`` sliding layers then a global one."""
    if config.get("layer_types"):
        return list(config["layer_types"])
    period = int(config.get("sliding_window_pattern", 5))
    return [GLOBAL if (i + 1) % period == 0 else SLIDING for i in range(int(config["num_hidden_layers"]))]


def rope_parameters(config: dict) -> dict:
    return config.get("rope_parameters") or DEFAULT_ROPE


def ffn_lengths(config: dict) -> list[int]:
    """Each layer's MLP width: the k/v-sharing layers' is doubled with ``use_double_wide_mlp``."""
    layers, shared = int(config["num_hidden_layers"]), int(config.get("num_kv_shared_layers", 0))
    wide = config.get("use_double_wide_mlp", True) and shared > 0
    width = int(config["intermediate_size"])
    return [2 * width if wide and i >= layers - shared else width for i in range(layers)]


def global_rope_divisors(config: dict) -> np.ndarray:
    """llama.cpp's per-frequency divisors for the global layers' proportional RoPE."""
    rope = rope_parameters(config)[GLOBAL]
    dims = int(config.get("global_head_dim") or config["head_dim"])
    if rope.get("rope_type", "default") not in ("default", "proportional"):
        raise MacftError(f"GGUF export does not handle Gemma 4's '{rope['rope_type']}' RoPE on global layers.")
    rotated = int(dims * rope.get("partial_rotary_factor", 1.0)) // 2 if rope.get("rope_type") == "proportional" else dims // 2
    factor = float(rope.get("factor", 1.0))
    return np.array([factor] * rotated + [UNROTATED] * (dims // 2 - rotated), dtype=np.float32)


# ---------------------------------------------------------------------------- export / import pairs


def hparam_config(config: dict) -> dict:
    """The values llama.cpp's common keys hold for Gemma 4: key length, MLP width and RoPE base
    are the global layers' (the sliding layers' go to the ``_swa`` keys in ``export_hparams``)."""
    config = text_config(config)
    if config.get("enable_moe_block") or config.get("attention_k_eq_v"):
        raise MacftError(
            "GGUF export of Gemma 4's mixture-of-experts or keys-as-values attention is not supported; "
            "convert this model with llama.cpp's convert_hf_to_gguf.py instead."
        )
    types, shared = layer_types(config), int(config.get("num_kv_shared_layers", 0))
    if SLIDING not in types or GLOBAL not in types:
        raise MacftError("llama.cpp's gemma4 needs both sliding-window and global layers; this model has only one kind.")
    owners = types[: len(types) - shared]
    if shared and owners[-2:] != [SLIDING, GLOBAL]:
        # llama.cpp's k/v-sharing layers read the last two layers that keep k/v: a sliding one, then a global one
        raise MacftError("llama.cpp shares Gemma 4's keys and values only when the last layers that keep them are sliding, then global.")
    global_dims = int(config.get("global_head_dim") or config["head_dim"])
    theta = rope_parameters(config)[GLOBAL].get("rope_theta", 1_000_000.0)
    return {**config, "head_dim": global_dims, "intermediate_size": ffn_lengths(config), "rope_theta": theta}


def export_hparams(writer, config: dict) -> None:
    config = text_config(config)
    sliding_rope = rope_parameters(config)[SLIDING]
    if float(sliding_rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise MacftError("GGUF export does not handle partial RoPE on Gemma 4's sliding layers.")
    sliding_dims = int(config["head_dim"])
    writer.add_key_length_swa(sliding_dims)
    writer.add_value_length_swa(sliding_dims)
    # the global head is rotated whole, its unrotated pairs held still by the rope_freqs divisors
    writer.add_rope_dimension_count(int(config.get("global_head_dim") or sliding_dims))
    writer.add_rope_dimension_count_swa(sliding_dims)
    writer.add_rope_freq_base_swa(float(sliding_rope.get("rope_theta", 10_000.0)))
    writer.add_sliding_window(int(config.get("sliding_window", 512)))
    writer.add_sliding_window_pattern([t == SLIDING for t in layer_types(config)])
    writer.add_shared_kv_layers(int(config.get("num_kv_shared_layers", 0)))
    writer.add_embedding_length_per_layer_input(int(config.get("hidden_size_per_layer_input") or 0))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


def export_tensors(config: dict) -> Iterator[tuple[str, np.ndarray]]:
    config = text_config(config)
    if GLOBAL in layer_types(config):  # llama.cpp requires the divisors when a global layer exists
        yield ROPE_FREQS, global_rope_divisors(config)


def import_config(gguf, common: dict) -> dict:
    layers = common["num_hidden_layers"]
    global_dims = common.get("head_dim", 512)
    sliding_dims = gguf_int(gguf, "attention.key_length_swa", global_dims)
    if gguf_int(gguf, "rope.dimension_count_swa", sliding_dims) != sliding_dims:
        raise MacftError(f"{gguf.path}: partial RoPE on Gemma 4's sliding layers is not supported.")
    pattern = gguf.arch_key("attention.sliding_window_pattern")
    if not isinstance(pattern, list) or len(pattern) != layers:
        raise MacftError(f"{gguf.path}: {gguf.architecture}.attention.sliding_window_pattern must list every layer.")
    shared = gguf_int(gguf, "attention.shared_kv_layers", 0)
    widths = gguf.arch_key("feed_forward_length")
    widths = [int(w) for w in widths] if isinstance(widths, list) else [int(widths)] * layers
    config = {
        "head_dim": sliding_dims,
        "global_head_dim": global_dims,
        "layer_types": [SLIDING if sliding else GLOBAL for sliding in pattern],
        "sliding_window": gguf_int(gguf, "attention.sliding_window", 512),
        "num_kv_shared_layers": shared,
        "intermediate_size": widths[0],
        "use_double_wide_mlp": shared > 0 and widths[-1] == 2 * widths[0],
        "hidden_size_per_layer_input": gguf_int(gguf, "embedding_length_per_layer_input", 0),
        "final_logit_softcapping": gguf.arch_key("final_logit_softcapping"),
        "rope_parameters": {
            GLOBAL: _global_rope(gguf, global_dims, float(common["rope_theta"])),
            SLIDING: {"rope_type": "default", "rope_theta": float(gguf.arch_key("rope.freq_base_swa", 10_000.0))},
        },
        "attention_k_eq_v": False,
        "enable_moe_block": False,
    }
    if widths != ffn_lengths({**common, **config}):
        raise MacftError(f"{gguf.path}: the per-layer MLP widths {widths} are not a pattern mlx-lm's gemma4_text can express.")
    if "per_layer_token_embd.weight" in gguf.tensors:
        config["vocab_size_per_layer_input"] = int(gguf.tensors["per_layer_token_embd.weight"].shape[0])
    return config


def _global_rope(gguf, dims: int, theta: float) -> dict:
    """The global layers' proportional RoPE, recovered from the ``rope_freqs`` divisors."""
    rope = {"rope_type": "proportional", "rope_theta": theta, "partial_rotary_factor": 1.0}
    if ROPE_FREQS not in gguf.tensors:
        return rope
    divisors = gguf.rows(ROPE_FREQS).view(np.float32).ravel()
    rotated = divisors[divisors < UNROTATED / 10]
    if len(rotated) and (np.any(rotated != rotated[0]) or np.any(divisors[: len(rotated)] >= UNROTATED / 10)):
        raise MacftError(f"{gguf.path}: Gemma 4's rope_freqs are not a proportional RoPE mlx-lm can express.")
    rope["partial_rotary_factor"] = 2 * len(rotated) / dims
    if len(rotated) and rotated[0] != 1.0:
        rope["factor"] = float(rotated[0])
    return rope


def planner_shape(config: dict) -> dict:
    config = text_config(config)
    return {"intermediate": max(ffn_lengths(config)), "per_layer_input": int(config.get("hidden_size_per_layer_input") or 0)}


GEMMA4_TURNS = ChatFormat(
    "gemma4",
    "<|turn>",
    "{{- if .System }}<|turn>system\n{{ .System }}<turn|>\n{{ end }}"
    "{{- range .Messages }}<|turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
    "{{ .Content }}<turn|>\n{{ end }}<|turn>model\n",
    ("<turn|>",),
)

FAMILY = Family(
    name="gemma4",
    model_types=("gemma4_text", "gemma4"),
    gguf_arch="gemma4",
    architectures=("Gemma4ForCausalLM",),
    tiny_config=tiny_config,
    import_config=import_config,
    hparam_config=hparam_config,
    export_hparams=export_hparams,
    export_tensors=export_tensors,
    config_tensors=(ROPE_FREQS,),
    layer_lists=("feed_forward_length",),
    global_names={
        "per_layer_token_embd": "model.embed_tokens_per_layer",
        "per_layer_model_proj": "model.per_layer_model_projection",
        "per_layer_proj_norm": "model.per_layer_projection_norm",
    },
    layer_names={
        **LAYER_NAMES,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
        "inp_gate": "per_layer_input_gate",
        "proj": "per_layer_projection",
        "post_norm": "post_per_layer_input_norm",
        "layer_output_scale": "layer_scalar",
    },
    # mlx-lm's layer_scalar is a bare parameter; gguf-py and llama.cpp name it like a weight
    export_renames={".layer_scalar": ".layer_scalar.weight"},
    writes_head_dim=True,
    gated_mlps={"gemma4_text.MLP": "gelu_approx"},
    chat_format=GEMMA4_TURNS,
    # These methods run or wrap the blocks themselves, and Gemma 4's blocks also take per-layer
    # inputs and shared keys/values and return them, which the methods do not pass on.
    refused_methods={
        name: "its blocks pass per-layer inputs and shared keys/values, which this method's wrapping does not; use lora, dora, qlora or full"
        for name in ("prompt", "ptuning", "prefix", "adapter")
    },
    planner_shape=planner_shape,
    # as Gemma 3: two more norms per block and a tanh-GELU; plus the per-layer input's gated residual
    saved_extra_hidden=3,
    saved_extra_intermediate=2,
)
