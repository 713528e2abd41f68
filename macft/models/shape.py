"""A model's shape, read from its config.json or GGUF metadata without loading weights: what the memory
planner (``macft.memory``) and the methods' parameter counts compute with.

    shape = read_model_shape("Qwen/Qwen3-0.6B")      # config only, from the hub cache
    shape = shape_from_gguf(Path("model.gguf"))      # GGUF metadata; tensors stay unread
    shape = loaded_shape(loaded)                     # a loaded model, with its quantized layers' stored bits
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from macft.errors import MacftError
from macft.families import lookup
from macft.hub import unreachable
from macft.models.claims import check_config_claims, check_folder_claims
from macft.models.spec import DEFAULT_MODEL, locate

EXPERT_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a model's configuration."""

    name: str
    family: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    stored_bits: float | None = None  # bits per weight when the model is stored quantized (GGUF, MLX 4-bit)
    experts: int = 0  # a mixture-of-experts MLP: experts per layer, each ``intermediate`` wide (0: dense)
    experts_per_token: int = 0
    # The exact parameter count where it is known (a GGUF's tensors, or mlx-lm's model built without
    # computing weights): families whose blocks differ from the common one (Gemma 4's per-layer
    # embedding table, Qwen3.5's linear-attention blocks) are only approximated by the formula.
    counted_params: int | None = None
    per_layer_input: int = 0  # Gemma 4: each layer's per-layer input width (hidden_size_per_layer_input)
    linear_layers: int = 0  # Qwen3.5: blocks of linear attention (a recurrent state, no KV cache)
    linear_state: int = 0  # values of one such block's state per row: value heads × key dim × value dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder block, by its HF name."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def copies(self, module: str) -> int:
        """How many of this linear layer a block holds: one per expert for a mixture-of-experts MLP."""
        return self.experts if self.experts and module in EXPERT_MODULES else 1

    @property
    def layer_params(self) -> int:
        matrices = sum(a * b * self.copies(name) for name, (a, b) in self.module_shapes().items())
        return matrices + self.hidden * self.experts + 2 * self.hidden  # the router, the two norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        return self.counted_params or self.layers * self.layer_params + self.embedding_params + self.hidden


def shape_from_config(config: dict, name: str = "model") -> ModelShape:
    """A ``ModelShape`` from an HF/MLX ``config.json`` dict."""
    if isinstance(config.get("text_config"), dict):  # multimodal wrappers (gemma3) nest the decoder
        config = {**config, **config["text_config"]}
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        shape = ModelShape(
            name=name,
            family=str(config.get("model_type", "?")),
            hidden=hidden,
            layers=int(config["num_hidden_layers"]),
            intermediate=int(config["intermediate_size"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(config["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", True)),
            stored_bits=_config_bits(config),
        )
        if family := lookup(shape.family):
            shape = dataclasses.replace(shape, **family.planner_shape(config))
    except (KeyError, TypeError, ValueError) as exc:
        raise MacftError(f"{name}: config.json lacks the field {exc} the memory planner needs.") from None
    return dataclasses.replace(shape, counted_params=model_params(config, shape.tied_embeddings))


def model_params(config: dict, tied_embeddings: bool) -> int | None:
    """The parameter count of the mlx-lm model ``config`` describes, read off the model built lazily:
    MLX computes no initial weight until it is evaluated, so this allocates nothing. None where
    mlx-lm cannot build it. Some mlx-lm models build an output head even when it is tied to the
    embeddings (loading drops it), so a tied model's head is not counted."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    # Building the model draws its initial weights' keys from MLX's global generator: it is put back
    # (a key is the seed's two 32-bit halves), so a plan never changes what a seeded run initialises.
    high, low = mx.random.state[0].tolist()
    try:
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))
    except Exception:  # an architecture or config mlx-lm does not know: the formula stands
        return None
    finally:
        mx.random.seed((high << 32) | low)
    return sum(v.size for k, v in tree_flatten(model.parameters()) if not (tied_embeddings and k.endswith("lm_head.weight")))


def _config_bits(config: dict) -> float | None:
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict) and "bits" in quant:
        group = int(quant.get("group_size", 64))
        return int(quant["bits"]) + 32 / group  # a scale and a bias per group
    return None


def shape_from_gguf(path: Path) -> ModelShape:
    """A ``ModelShape`` from GGUF metadata; tensors stay memory-mapped and unread."""
    from macft.models.gguf_import.reader import read_gguf

    gguf = read_gguf(path)
    arch = gguf.architecture
    hidden, heads = gguf.arch_key("embedding_length"), gguf.arch_key("attention.head_count")
    vocab = gguf.arch_key("vocab_size") or len(gguf.metadata.get("tokenizer.ggml.tokens", ()))
    if not arch or not hidden or not heads or not vocab:
        raise MacftError(f"{path}: GGUF metadata lacks the architecture, embedding_length, head_count or vocabulary.")
    matrices = [t for t in gguf.tensors.values() if len(t.shape) > 1]
    elements = sum(int(np.prod(t.shape)) for t in matrices)
    bits = 8 * sum(t.nbytes for t in matrices) / elements if elements else None
    shape = ModelShape(
        name=str(gguf.metadata.get("general.name", path.stem)),
        family=arch,
        hidden=int(hidden),
        layers=int(gguf.arch_key("block_count")),
        intermediate=int(np.max(gguf.arch_key("feed_forward_length"))),  # a per-layer list for Gemma 4: the widest
        heads=int(heads),
        kv_heads=int(gguf.arch_key("attention.head_count_kv", heads)),
        head_dim=int(gguf.arch_key("attention.key_length", int(hidden) // int(heads))),
        vocab=int(vocab),
        tied_embeddings="output.weight" not in gguf.tensors,
        stored_bits=bits if bits is not None and bits < 15 else None,  # F16/F32 files are cast at load
    )
    counted = sum(int(np.prod(t.shape)) for t in gguf.tensors.values())
    return dataclasses.replace(shape, counted_params=counted, **_gguf_experts(gguf))


def _gguf_experts(gguf) -> dict[str, int]:
    """llama.cpp's mixture-of-experts keys, the same for every family that has experts."""
    experts = int(gguf.arch_key("expert_count", 0) or 0)
    if not experts:
        return {}
    return {
        "experts": experts,
        "experts_per_token": int(gguf.arch_key("expert_used_count")),
        "intermediate": int(gguf.arch_key("expert_feed_forward_length")),
    }


def read_model_shape(spec: str) -> ModelShape:
    """The shape of a model spec (``macft.models.spec``) without loading its weights; a config that claims
    more than its weights hold (or than any model has, for a hub id's config alone) is refused."""
    where = locate(spec)
    if where.kind == "gguf":
        path = Path(where.target)
        try:
            shape = shape_from_gguf(path)
        except (TypeError, ValueError, ZeroDivisionError) as exc:  # a size of the wrong type, or zero heads
            raise MacftError(f"{path}: GGUF metadata holds a size the memory planner cannot read ({exc}).") from None
        return dataclasses.replace(shape, name=DEFAULT_MODEL) if spec == DEFAULT_MODEL else shape
    if where.kind == "folder":
        check_folder_claims(Path(where.target))
        return shape_from_config(json.loads((Path(where.target) / "config.json").read_text()), name=where.target)
    config = _hub_config(where.target)
    check_config_claims(config, where.target)
    return shape_from_config(config, name=where.target)


def _hub_config(repo_id: str) -> dict:
    """config.json of a hub model: the local cache first, then a download of that one file."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if reason := unreachable():
        raise MacftError(f"config.json of '{repo_id}' is not in the Hugging Face cache and {reason}; connect, or pass a local model folder or .gguf file.")
    try:
        return json.loads(Path(hf_hub_download(repo_id, "config.json")).read_text())
    except Exception as exc:  # the hub client raises many types; the user needs one line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MacftError(f"Could not read config.json of '{repo_id}' (not cached, download failed: {reason}).") from None


def loaded_shape(loaded) -> ModelShape:
    """The shape of an already loaded model (``macft.models.load.LoadedModel``), with the stored
    bits of its quantized weights."""
    from macft.models.quantized import has_quantized_layers

    shape = shape_from_config(loaded.config, name=loaded.identity.get("source", str(loaded.path)))
    if shape.stored_bits is None and has_quantized_layers(loaded.model):
        shape = dataclasses.replace(shape, stored_bits=_quantized_bits(loaded.model))
    return shape


def _quantized_bits(model) -> float:
    """Average stored bits per weight of a loaded model's quantized layers (weights, scales and biases)."""
    import mlx.nn as nn

    bits = elements = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            n = m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
            elements += n
            bits += 8 * (m.weight.nbytes + m.scales.nbytes + (m.biases.nbytes if m.biases is not None else 0))
    return bits / elements if elements else 16.0
