"""HF/mlx-lm weights and config.json -> the GGUF layout llama.cpp expects, driven by the family record.

    arch = gguf_arch("qwen3")                           # "qwen3"
    add_hparams(writer, config, "qwen3")
    for name, array in gguf_tensors(weights, config, "llama"):  # HF/mlx-lm names -> GGUF names
        ...

What differs between families (their ``{arch}.*`` keys, the q/k row permutation, Gemma's norm
offset, Llama 3's rope-factor tensor) is in each family's module under ``macft/families/``, next
to the inverse that GGUF import applies. Tied embeddings write no ``output`` tensor; llama.cpp
reuses ``token_embd``. Checked against llama.cpp in tests/test_export_gguf.py.
"""

from __future__ import annotations

from typing import Iterator

import gguf
import numpy as np

from macft.errors import MacftError
from macft.families import FAMILIES, Family
from macft.families.base import head_dim, n_kv_heads, rope_scaling


def export_family(family: str) -> Family:
    if family not in FAMILIES:
        raise MacftError(f"GGUF export does not support the '{family}' family; supported: {', '.join(FAMILIES)}.")
    return FAMILIES[family]


def gguf_arch(family: str) -> str:
    return export_family(family).gguf_arch


def _arch_enum(arch: str) -> gguf.MODEL_ARCH:
    return next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


# ---------------------------------------------------------------------------- hyperparameters


def add_hparams(writer: gguf.GGUFWriter, config: dict, family: str) -> None:
    """Write the ``{arch}.*`` keys llama.cpp reads for this family."""
    record = export_family(family)
    original, config = config, record.hparam_config(config)
    ffn = config["intermediate_size"]
    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length([int(n) for n in ffn] if isinstance(ffn, list) else int(ffn))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(n_kv_heads(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    if record.writes_head_dim or "head_dim" in config:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    record.export_hparams(writer, original)
    _add_rope_scaling(writer, config, record)


def _add_rope_scaling(writer: gguf.GGUFWriter, config: dict, family: Family) -> None:
    scaling = rope_scaling(config)
    if scaling is None or scaling["kind"] in family.rope_kinds_as_tensors:
        return
    if scaling["kind"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        return
    raise MacftError(
        f"GGUF export does not handle '{scaling['kind']}' RoPE scaling yet; "
        "convert this model with llama.cpp's convert_hf_to_gguf.py instead."
    )


# ---------------------------------------------------------------------------- tensors


def tensor_name_map(config: dict, family: str) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(_arch_enum(export_family(family).gguf_arch), int(config["num_hidden_layers"]))


def gguf_name(name: str, name_map: gguf.TensorNameMap) -> str:
    """The GGUF name of an HF/mlx-lm parameter name (``model.layers.0.self_attn.q_proj.weight``)."""
    mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise MacftError(f"No GGUF name for tensor '{name}': this model has weights llama.cpp does not know.")
    return mapped


def gguf_tensors(weights: dict[str, np.ndarray], config: dict, family: str) -> Iterator[tuple[str, np.ndarray]]:
    """Float32 HF/mlx-lm weights -> (GGUF name, float32 array) in llama.cpp's layout."""
    record = export_family(family)
    name_map = tensor_name_map(config, family)
    for name, value in weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp
        value = np.asarray(value, dtype=np.float32)
        value = record.export_float(name, record.export_columns(name, record.export_rows(name, value, config), config))
        yield gguf_name(record.export_name(name), name_map), value
    yield from record.export_tensors(config)
