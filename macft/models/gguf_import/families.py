"""GGUF names and metadata -> mlx-lm names and config.json, driven by the family record.

What differs between architectures (layer names, config keys, tensors that hold configuration,
the norm and q/k layout fixes) is in the family's module under ``macft/families/``; this module
applies it to one GGUF file.

    family = family_for(gguf)
    config = import_config(gguf, family)
    name = hf_name(family, "blk.3.attn_q.weight")      # "model.layers.3.self_attn.q_proj.weight"
"""

from __future__ import annotations

import re

from macft.errors import MacftError
from macft.families import FAMILIES, Family, for_gguf_arch
from macft.families.base import gguf_int
from macft.models.gguf_import.reader import GGUFFile

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# config.json counts a model needs at least one of, and the metadata keys they come from
_COUNTS = {"hidden_size": "embedding_length", "num_hidden_layers": "block_count", "intermediate_size": "feed_forward_length",
           "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv"}


def hf_name(family: Family, name: str) -> str:
    """The mlx-lm name of GGUF tensor ``name``; "" for a tensor that holds configuration."""
    if name in family.config_tensors:
        return ""
    stem, _, suffix = name.rpartition(".")
    global_names = {**_GLOBAL, **family.global_names}
    if stem in global_names and suffix in ("weight", "bias"):
        return family.import_name(f"{global_names[stem]}.{suffix}")
    layer, _, tail = name.removeprefix("blk.").partition(".")
    if name.startswith("blk.") and layer.isdigit() and tail in family.layer_names:  # a whole tensor name ("ssm_a")
        return family.import_name(f"model.layers.{layer}.{family.layer_names[tail]}")
    match = _BLOCK.match(name)
    if match and match.group(2) in family.layer_names:
        layer, part, suffix = match.groups()
        return family.import_name(f"model.layers.{layer}.{family.layer_names[part]}.{suffix}")
    raise MacftError(f"Tensor '{name}' is not part of a standard {family.gguf_arch} model; this GGUF variant is not supported.")


def import_config(gguf: GGUFFile, family: Family) -> dict:
    """The config.json mlx-lm needs: the keys every family shares, then the family's own."""
    heads = gguf_int(gguf, "attention.head_count")
    embd = gguf.tensors["token_embd.weight"].shape
    config = {
        "model_type": family.model_types[0],
        "architectures": list(family.architectures),
        "hidden_size": gguf_int(gguf, "embedding_length"),
        "num_hidden_layers": gguf_int(gguf, "block_count"),
        "intermediate_size": _first_layer_int(gguf, family, "feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": gguf_int(gguf, "attention.head_count_kv", heads),
        "rms_norm_eps": float(gguf.arch_key("attention.layer_norm_rms_epsilon", 1e-6)),
        "vocab_size": embd[0],
        "max_position_embeddings": gguf_int(gguf, "context_length", 4096),
        "rope_theta": float(gguf.arch_key("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }
    if gguf.arch_key("attention.key_length") is not None:
        config["head_dim"] = gguf_int(gguf, "attention.key_length")
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        if (value := gguf.metadata.get(f"tokenizer.ggml.{key}")) is not None:
            config[key.replace("padding", "pad")] = int(value)
    if gguf.arch_key("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(gguf.arch_key("rope.scaling.factor", 1.0))}
    for key, name in _COUNTS.items():
        if config[key] < 1:
            raise MacftError(f"{gguf.path}: its metadata gives {gguf.architecture}.{name} = {config[key]}; a model needs at least 1.")
    try:
        return config | family.import_config(gguf, config)
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError) as exc:  # a family's own keys, damaged
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise MacftError(f"{gguf.path}: the {family.gguf_arch} metadata is damaged ({type(exc).__name__}: {reason}).") from None


def _first_layer_int(gguf: GGUFFile, family: Family, key: str) -> int:
    """``gguf_int``, or the first layer's value of a per-layer list the family reads itself."""
    value = gguf.arch_key(key)
    if key in family.layer_lists and isinstance(value, list) and value:
        return int(value[0])
    return gguf_int(gguf, key)


def family_for(gguf: GGUFFile) -> Family:
    arch = gguf.architecture
    family = for_gguf_arch(arch)
    if family is None:
        known = ", ".join(sorted(f.gguf_arch for f in FAMILIES.values()))
        raise MacftError(f"{gguf.path.name}: architecture '{arch or '?'}' is not supported for import; supported: {known}.")
    if "token_embd.weight" not in gguf.tensors:
        raise MacftError(f"{gguf.path} has no token_embd.weight tensor; it is not a complete {arch} model.")
    return family
