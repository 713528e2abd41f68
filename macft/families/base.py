"""What a model-family record holds, and the pieces several families share.

A ``Family`` is everything macft knows about one architecture, kept in one module of
``macft/families/``: the mlx-lm model types it loads, its llama.cpp architecture, how GGUF tensor
names and metadata map to mlx-lm's, the weight-layout transforms of import and export side by
side, the gated-MLP activation recomputed in training, its chat format for an Ollama Modelfile, a
tiny random configuration for tests and the memory planner's facts.

Nothing here imports MLX or gguf-py: the CLI's help, the planner and the registry stay light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol

import numpy as np

from macft.errors import MacftError

if TYPE_CHECKING:
    from gguf import GGUFWriter


class GGUFFile(Protocol):
    """What a record reads from a GGUF file (``macft.models.gguf_import.reader.GGUFFile`` has it)."""

    path: Path
    architecture: str
    metadata: dict[str, Any]
    tensors: dict[str, Any]

    def arch_key(self, key: str, default: Any = None) -> Any: ...

    def rows(self, name: str) -> np.ndarray: ...

# per-block GGUF name -> mlx-lm name under model.layers.N (most families add to or change a few)
LAYER_NAMES: Mapping[str, str] = {
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


@dataclass(frozen=True)
class ChatFormat:
    """A chat format as an Ollama Modelfile needs it."""

    name: str
    marker: str  # a string only this format's Jinja template contains
    template: str  # Go template for Ollama
    stops: tuple[str, ...]


CHATML = ChatFormat(
    "chatml",
    "<|im_start|>",
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    ("<|im_end|>",),
)


def _no_hparams(writer: GGUFWriter, config: dict) -> None:
    return None


def _no_shape_facts(config: dict) -> dict:
    return {}


def _no_tensors(config: dict) -> Iterator[tuple[str, np.ndarray]]:
    return iter(())


def _same_config(config: dict) -> dict:
    return config


@dataclass(frozen=True)
class Family:
    name: str  # macft's name, recorded with every run ("gemma3")
    model_types: tuple[str, ...]  # mlx-lm (HF) model_type values; the first is written on GGUF import
    gguf_arch: str  # llama.cpp's general.architecture
    architectures: tuple[str, ...]  # HF "architectures" written into an imported config.json
    tiny_config: Callable[[dict], dict]  # the common tiny config -> this family's (tests, benchmarks)
    # GGUF import: metadata -> the family's part of config.json (the common part comes from base keys)
    import_config: Callable[[GGUFFile, dict], dict]
    # GGUF export: the family's ``{arch}.*`` keys beyond the common ones
    export_hparams: Callable[[GGUFWriter, dict], None] = _no_hparams
    # GGUF export: config.json -> the config the common keys are read from, for a family whose
    # config.json means something else by them (Gemma 4: the global layers' head size, per-layer MLP widths)
    hparam_config: Callable[[dict], dict] = _same_config
    # GGUF import: common ``{arch}.*`` keys that may hold one value per layer; the common config
    # takes the first layer's and the family's import_config reads the list
    layer_lists: tuple[str, ...] = ()
    # GGUF export: tensors that carry configuration (Llama 3 rope factors); import reads them back
    export_tensors: Callable[[dict], Iterator[tuple[str, np.ndarray]]] = _no_tensors
    config_tensors: tuple[str, ...] = ()  # GGUF tensors import consumes as configuration
    rope_kinds_as_tensors: tuple[str, ...] = ()  # rope_scaling kinds that travel as export_tensors
    layer_names: Mapping[str, str] = field(default_factory=lambda: dict(LAYER_NAMES))
    # mlx-lm's parameter names start with this where its Model wraps the decoder ("language_model.")
    weights_prefix: str = ""
    # GGUF name -> mlx-lm name of tensors outside the blocks, beyond token_embd, output_norm and output
    global_names: Mapping[str, str] = field(default_factory=dict)
    # mlx-lm name part -> the HF name part gguf-py's tensor map knows (export; import undoes them)
    export_renames: Mapping[str, str] = field(default_factory=dict)
    # Transform pairs: export applies the forward direction, import its inverse.
    norm_offset: float = 0.0  # GGUF stores norm weight + offset (Gemma keeps w and adds 1 at run time)
    permute_qk: bool = False  # llama.cpp's interleaved rotary row order for q and k
    writes_head_dim: bool = False  # export writes key/value length even when config.json has no head_dim
    add_space_prefix: bool | None = None  # tokenizer.ggml.add_space_prefix to write, when the family fixes it
    # Training: mlx-lm MLP class ("module.Class") -> mlx.nn activation name it applies to its gate
    gated_mlps: Mapping[str, str] = field(default_factory=dict)
    chat_format: ChatFormat | None = None  # the format this family's chat templates write
    # Training: method name -> why this family's blocks cannot take it (apply_method refuses it)
    refused_methods: Mapping[str, str] = field(default_factory=dict)
    # Memory planner: shape facts config.json spells its own way (experts), as ModelShape fields
    planner_shape: Callable[[dict], dict] = _no_shape_facts
    # Memory planner: values kept per token and layer beyond the common decoder block's
    saved_extra_hidden: int = 0
    saved_extra_intermediate: int = 0
    # Training: this family's linear layers (leaf name) adapted when any of the named common ones is targeted
    lora_aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    # ------------------------------------------------------------------ transform pairs

    def export_rows(self, name: str, rows: np.ndarray, config: dict) -> np.ndarray:
        """HF rows -> llama.cpp rows for q/k (whole rows move, so biases and LoRA B follow)."""
        heads = self.qk_heads(name, config)
        return rows if heads is None else permute_rows(rows, heads)

    def import_rows(self, name: str, rows: np.ndarray, config: dict) -> np.ndarray:
        """The inverse of ``export_rows``; ``rows`` may be raw quantized bytes or floats."""
        heads = self.qk_heads(name, config)
        return rows if heads is None else unpermute_rows(rows, heads)

    def qk_heads(self, name: str, config: dict) -> int | None:
        """How many heads this tensor's rows are permuted over, or None when they stay as they are."""
        if not self.permute_qk:
            return None
        if ".q_proj." in name:
            return int(config["num_attention_heads"])
        if ".k_proj." in name:
            return n_kv_heads(config)
        return None

    def export_columns(self, name: str, columns: np.ndarray, config: dict) -> np.ndarray:
        """HF -> llama.cpp order of a weight's input features (the last axis; LoRA A's columns follow)."""
        return columns

    def import_columns(self, name: str, columns: np.ndarray, config: dict) -> np.ndarray:
        """The inverse of ``export_columns``, on floats."""
        return columns

    def keeps_blocks(self, name: str, config: dict) -> bool:
        """Whether import may keep this tensor's quantized blocks: not when ``import_columns`` moves its columns."""
        return True

    def export_name(self, name: str) -> str:
        """The HF name gguf-py maps to a GGUF name, for an mlx-lm parameter name."""
        name = name.removeprefix(self.weights_prefix)
        for part, hf in self.export_renames.items():
            name = name.replace(part, hf)
        return name

    def import_name(self, name: str) -> str:
        """The inverse of ``export_name``, for the mlx-lm name GGUF import derives from a GGUF name."""
        for part, hf in self.export_renames.items():
            name = name.replace(hf, part)
        return self.weights_prefix + name

    def export_float(self, name: str, values: np.ndarray) -> np.ndarray:
        if self.norm_offset and "norm." in name:
            return values + np.float32(self.norm_offset)
        return values

    def import_float(self, name: str, values: np.ndarray) -> np.ndarray:
        if self.norm_offset and "norm." in name:
            return values.astype(np.float32) - np.float32(self.norm_offset)
        return values


def permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved rotary rows: ``reshape(n, 2, r/n/2).swapaxes(1, 2)``."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of ``permute_rows``."""
    shape = rows.shape
    return rows.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def text_config(config: dict) -> dict:
    """config.json with a multimodal wrapper's nested decoder keys (``text_config``) brought to the top."""
    nested = config.get("text_config")
    return {**config, **nested} if isinstance(nested, dict) else config


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def n_kv_heads(config: dict) -> int:
    return int(config.get("num_key_value_heads") or config["num_attention_heads"])


def rope_scaling(config: dict) -> dict | None:
    """config.json's rope_scaling with its kind under "kind"; None when there is none or it is the default."""
    scaling = config.get("rope_scaling")
    if not scaling:
        return None
    kind = (scaling.get("rope_type") or scaling.get("type") or "default").lower()
    return None if kind == "default" else {**scaling, "kind": kind}


def gguf_int(gguf: GGUFFile, key: str, default: int | None = None) -> int:
    """An integer ``{arch}.key``; a per-layer list must hold one value, as mlx-lm needs one."""
    value = gguf.arch_key(key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise MacftError(f"{gguf.path}: {gguf.architecture}.{key} differs between layers, which mlx-lm does not support.")
        value = value[0]
    if value is None:
        raise MacftError(f"{gguf.path} lacks the metadata key {gguf.architecture}.{key}; the file is incomplete.")
    return int(value)
