"""Qwen3.5 (dense): mlx-lm ``qwen3_5``, llama.cpp ``qwen35``.

Three of every four blocks are Gated DeltaNet linear attention (a causal depthwise conv1d over the
fused q/k/v projection, a per-head decay ``-exp(A_log)·softplus(a + dt_bias)``, a gated RMSNorm
and ``out_proj``); every ``full_attention_interval``-th block is full attention whose q_proj
also yields a sigmoid output gate, with q/k RMSNorm and rotary on part of each head (llama.cpp's
interleaved M-RoPE, which for text positions is the plain NEOX rotation mlx-lm applies).

mlx-lm wraps the decoder in a multimodal Model, so its names start with ``language_model.``. Its
norms already hold HF's 1 + w (its sanitize adds the 1 when it reads an HF checkpoint), as GGUF
does. What moves between the two: GGUF stores ``A = -exp(A_log)``, the conv1d kernel as
(channels, width), and, when value heads outnumber key heads, the value heads tiled
(k0 k1 k0 k1 …, ggml's broadcast order) where HF groups them by key head (k0 k0 k1 k1 …): the
rows of the value part of in_proj_qkv, of in_proj_z/a/b, of A_log, dt_bias and the conv1d
channels, and the columns of out_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from macft.errors import MacftError
from macft.families.base import CHATML, LAYER_NAMES, Family, gguf_int, head_dim

# a linear-attention tensor (mlx-lm name part) -> the part of its rows that are value heads
_VALUE_ROWS = {".in_proj_qkv.": "after_qk", ".conv1d.": "after_qk", ".in_proj_z.": "all", ".in_proj_a.": "heads",
               ".in_proj_b.": "heads", ".A_log": "heads", ".dt_bias": "heads"}  # fmt: skip
_DEFAULT_ROPE = {"type": "default", "mrope_section": [11, 11, 10], "rope_theta": 100000.0, "partial_rotary_factor": 0.25}


def text_rope(config: dict) -> dict:
    """mlx-lm's rope_parameters (rope_theta, partial_rotary_factor, mrope_section), defaults filled in."""
    return {**_DEFAULT_ROPE, **(config.get("rope_parameters") or {})}


def tiny_config(common: dict) -> dict:
    rope = {"type": "default", "rope_theta": common["rope_theta"], "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}
    return {
        **common,
        "model_type": "qwen3_5",
        "architectures": ["Qwen3_5ForCausalLM"],
        "head_dim": head_dim(common),
        "tie_word_embeddings": True,
        "full_attention_interval": 2,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,  # more value than key heads: the tiled layout is exercised
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "rope_parameters": rope,
    }


def planner_shape(config: dict) -> dict:
    """The linear-attention blocks (all but every ``full_attention_interval``-th) and their state size."""
    layers, interval = int(config["num_hidden_layers"]), int(config.get("full_attention_interval", 4))
    state = int(config["linear_num_value_heads"]) * int(config["linear_key_head_dim"]) * int(config["linear_value_head_dim"])
    return {"linear_layers": layers - layers // interval, "linear_state": state}


def import_config(gguf, common: dict) -> dict:
    if gguf.arch_key("nextn_predict_layers"):
        raise MacftError(f"{gguf.path}: this Qwen3.5 GGUF carries multi-token-prediction blocks, which mlx-lm's qwen3_5 has no place for.")
    dims = common.get("head_dim", 256)
    value_heads = gguf_int(gguf, "ssm.time_step_rank")
    sections = [int(s) for s in gguf.arch_key("rope.dimension_sections", [11, 11, 10, 0])]
    rope = {
        "type": "default",
        "rope_theta": common["rope_theta"],
        "partial_rotary_factor": gguf_int(gguf, "rope.dimension_count", dims) / dims,
        "mrope_section": sections[:3],
        "mrope_interleaved": True,
    }
    return {
        "head_dim": dims,
        "full_attention_interval": full_attention_interval(gguf),
        "linear_num_key_heads": gguf_int(gguf, "ssm.group_count"),
        "linear_num_value_heads": value_heads,
        "linear_key_head_dim": gguf_int(gguf, "ssm.state_size"),
        "linear_value_head_dim": gguf_int(gguf, "ssm.inner_size") // value_heads,
        "linear_conv_kernel_dim": gguf_int(gguf, "ssm.conv_kernel"),
        "rope_parameters": rope,
    }


def full_attention_interval(gguf) -> int:
    """llama.cpp's default is three linear blocks then one full one; a per-layer list may override it."""
    recurrent = gguf.arch_key("attention.recurrent_layers")
    if recurrent is None:
        return gguf_int(gguf, "full_attention_interval", 4)
    period = recurrent.index(False) + 1 if False in recurrent else len(recurrent) + 1
    if list(map(bool, recurrent)) != [(i + 1) % period != 0 for i in range(len(recurrent))]:
        raise MacftError(f"{gguf.path}: the linear/full attention layer pattern is irregular, which mlx-lm's qwen3_5 cannot express.")
    return period


def export_hparams(writer, config: dict) -> None:
    if int(config["linear_key_head_dim"]) != int(config["linear_value_head_dim"]):
        raise MacftError("llama.cpp's qwen35 needs equal linear-attention key and value head sizes; this model's differ.")
    if config.get("num_experts"):
        raise MacftError("This is a Qwen3.5 mixture-of-experts model; macft exports the dense Qwen3.5 only.")
    rope = text_rope(config)
    if float(rope["rope_theta"]) != float(config.get("rope_theta", 10000.0)):
        writer.add_rope_freq_base(float(rope["rope_theta"]))  # mlx-lm reads the base from rope_parameters
    writer.add_rope_dimension_count(int(head_dim(config) * float(rope["partial_rotary_factor"])))
    writer.add_rope_dimension_sections([*map(int, rope["mrope_section"]), 0, 0, 0, 0][:4])
    writer.add_full_attention_interval(int(config.get("full_attention_interval", 4)))
    writer.add_ssm_conv_kernel(int(config["linear_conv_kernel_dim"]))
    writer.add_ssm_state_size(int(config["linear_key_head_dim"]))
    writer.add_ssm_group_count(int(config["linear_num_key_heads"]))
    writer.add_ssm_time_step_rank(int(config["linear_num_value_heads"]))
    writer.add_ssm_inner_size(int(config["linear_value_head_dim"]) * int(config["linear_num_value_heads"]))


def tile_heads(values: np.ndarray, axis: int, key_heads: int, head: int, *, inverse: bool = False) -> np.ndarray:
    """Value heads grouped by key head (HF) <-> tiled over the key heads (llama.cpp), along ``axis``."""
    values = np.moveaxis(values, axis, 0)
    per_key = values.shape[0] // key_heads // head
    grouped = (key_heads, per_key) if not inverse else (per_key, key_heads)
    moved = values.reshape(*grouped, head, *values.shape[1:]).swapaxes(0, 1).reshape(values.shape)
    return np.moveaxis(moved, 0, axis)


@dataclass(frozen=True)
class HybridFamily(Family):
    """Qwen3.5's record: the common transform pairs plus the linear-attention layout."""

    def _value_rows(self, name: str, config: dict) -> tuple[int, int, int] | None:
        """(first value row, key heads, rows per value head) of a tensor whose value heads move, else None."""
        key_heads, value_heads = int(config["linear_num_key_heads"]), int(config["linear_num_value_heads"])
        if key_heads == value_heads or ".linear_attn." not in name:
            return None
        part = next((kind for part, kind in _VALUE_ROWS.items() if part in name), None)
        dims = int(config["linear_value_head_dim"])
        if part == "after_qk":
            return 2 * key_heads * int(config["linear_key_head_dim"]), key_heads, dims
        if part == "all":
            return 0, key_heads, dims
        return (0, key_heads, 1) if part == "heads" else None

    def _move_rows(self, name: str, rows: np.ndarray, config: dict, inverse: bool) -> np.ndarray:
        where = self._value_rows(name, config)
        if where is None:
            return rows
        start, key_heads, head = where
        moved = tile_heads(rows[start:], 0, key_heads, head, inverse=inverse)
        return np.concatenate([rows[:start], moved]) if start else moved

    def export_rows(self, name: str, rows: np.ndarray, config: dict) -> np.ndarray:
        return self._move_rows(name, rows, config, inverse=False)

    def import_rows(self, name: str, rows: np.ndarray, config: dict) -> np.ndarray:
        return self._move_rows(name, rows, config, inverse=True)

    def _moves_columns(self, name: str, config: dict) -> bool:
        return ".linear_attn.out_proj." in name and config["linear_num_key_heads"] != config["linear_num_value_heads"]

    def export_columns(self, name: str, columns: np.ndarray, config: dict) -> np.ndarray:
        if not self._moves_columns(name, config):
            return columns
        return tile_heads(columns, -1, int(config["linear_num_key_heads"]), int(config["linear_value_head_dim"]))

    def import_columns(self, name: str, columns: np.ndarray, config: dict) -> np.ndarray:
        if not self._moves_columns(name, config):
            return columns
        return tile_heads(columns, -1, int(config["linear_num_key_heads"]), int(config["linear_value_head_dim"]), inverse=True)

    def keeps_blocks(self, name: str, config: dict) -> bool:
        return not self._moves_columns(name, config)

    def export_float(self, name: str, values: np.ndarray) -> np.ndarray:
        if name.endswith(".A_log"):
            return -np.exp(values.astype(np.float32))
        if name.endswith(".conv1d.weight"):
            return values.reshape(values.shape[0], -1)  # mlx-lm (channels, width, 1) -> (channels, width)
        return values

    def import_float(self, name: str, values: np.ndarray) -> np.ndarray:
        if name.endswith(".A_log"):
            return np.log(-values.astype(np.float32))
        if name.endswith(".conv1d.weight"):
            return values.reshape(*values.shape, 1)
        return values


FAMILY = HybridFamily(
    name="qwen3_5",
    model_types=("qwen3_5",),
    gguf_arch="qwen35",
    architectures=("Qwen3_5ForCausalLM",),
    tiny_config=tiny_config,
    import_config=import_config,
    export_hparams=export_hparams,
    layer_names={
        **LAYER_NAMES,
        "post_attention_norm": "post_attention_layernorm",
        "attn_qkv": "linear_attn.in_proj_qkv",
        "attn_gate": "linear_attn.in_proj_z",
        "ssm_alpha": "linear_attn.in_proj_a",
        "ssm_beta": "linear_attn.in_proj_b",
        "ssm_conv1d": "linear_attn.conv1d",
        "ssm_norm": "linear_attn.norm",
        "ssm_out": "linear_attn.out_proj",
        "ssm_a": "linear_attn.A_log",  # whole tensor names: these two carry no .weight/.bias
        "ssm_dt.bias": "linear_attn.dt_bias",
    },
    weights_prefix="language_model.",
    planner_shape=planner_shape,
    export_renames={".dt_bias": ".dt_proj.bias"},
    writes_head_dim=True,
    gated_mlps={"qwen3_next.Qwen3NextMLP": "silu"},
    chat_format=CHATML,
    # A linear block adapts its fused q/k/v projection, its output gate (the counterpart of the gate
    # full-attention blocks keep in q_proj) and out_proj; in_proj_a/b (one output per head) stay frozen.
    lora_aliases={"in_proj_qkv": ("q_proj", "k_proj", "v_proj"), "in_proj_z": ("q_proj",), "out_proj": ("o_proj",)},
    refused_methods={
        name: "it hooks into every block's attention, and the linear-attention (recurrent) blocks have none; use lora, dora, qlora or full"
        for name in ("prompt", "ptuning", "prefix", "adapter")
    },
)
