"""The memory planner: predict a training run's peak memory before loading any weights.

The prediction adds up what MLX holds at the peak of one training step: the frozen weights at
their stored precision, the trainable parameters with their gradients and AdamW moments, the
activations each layer keeps for the backward pass, the transient buffers of the backward pass
through one layer, and the logits: for macft's own loss one block of positions × vocabulary slice,
for a plain loss or a trained head the whole batch × positions × vocabulary, which dominates for
models with a large vocabulary such as Gemma's 262k tokens. Shapes come from ``config.json`` or
from GGUF metadata (``read_model_shape``), so no weights are loaded.

    shape = read_model_shape("Qwen/Qwen3-0.6B")          # config only, from the hub cache
    est = estimate(shape, Plan(method="qlora", batch=4, seq=512))
    print(est.total_bytes, est.fits, est.suggestions)
    est = check_fits(recipe, loaded)                     # what `macft lora` calls before training

With ``Plan(ranks=N)`` the plan is for one of N data-parallel ranks: ``batch`` is the global batch,
each rank holds its share of it and a whole copy of the model, gradients and optimizer state.

The coefficients below were measured on this code base's models with ``mx.get_peak_memory()``
on llama- and gemma-shaped models; ``tests/test_memory.py`` re-measures real training steps and
keeps the prediction within 20% of them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from macft.config import MethodConfig
from macft.errors import MacftError
from macft.families import lookup
from macft.method_registry import method_spec

GIB = 1024**3

# Per token and layer, the backward pass of a decoder block needs its inputs again: the residual
# stream and the two norm outputs, the attention input/output, q/k/v after RoPE (h + 2·kv), and the
# MLP's gate, up and activation (3·I). Measured against MLX: 6·h + 2·kv + 3·I values per token.
SAVED_HIDDEN = 6
SAVED_KV = 2
SAVED_INTERMEDIATE = 3
# A family's record may add to these (Gemma's extra norms and tanh-GELU: macft/families/gemma3.py).
# The compiled update step normalises the gradients by the token count and clips them (two more
# copies of every gradient) and writes AdamW's new moments beside the old ones (two more copies of
# every trainable weight), after the activations and logits are freed.
UPDATE_EXTRA_COPIES = 4
# The backward pass through one block allocates gradients of all of the above at once.
BACKWARD_HIDDEN = 23
# Cross-entropy keeps the logits, exp(logits − max) and the softmax gradient, and creates the
# logits' gradient: four float32 copies of positions × vocabulary.
LOGIT_COPIES = 4
# macft's chunked loss (``macft.train.losses``) applies the output head to ``loss_chunk_size``
# positions at a time. A frozen head (every method but full fine-tuning) is applied one vocabulary
# slice at a time with a running log-sum-exp, so its peak holds three float32 copies of one
# block of chunk rows × slice (the logits, their exponentials and the product's input), not of the
# batch's logits; a quantized head is dequantized a slice at a time, inside the same budget. A
# trained head (full fine-tuning, under a checkpoint) still forms the whole batch's logits: three
# float32 copies with a single chunk, about two and a half with several.
FROZEN_HEAD_BLOCK_COPIES = 3.0
# Where exp is computed by a polynomial (``losses.exp_nonpositive``), its intermediates between the
# compiled kernels (the clamped input, the rounded exponent, its bits) are alive together as well.
POLYNOMIAL_EXP_COPIES = 2.0
QUANTIZED_HEAD_SLICES_IN_FLIGHT = 2
CHUNKED_LOGIT_COPIES = 3.0
MULTI_CHUNK_LOGIT_COPIES = 2.5
# Attention without a fused backward materialises the probabilities (kept) and, for the layer in
# its backward pass, two more batch × heads × L × L buffers.
ATTENTION_TRANSIENT = 2

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


@dataclass(frozen=True)
class Plan:
    """The training settings memory depends on."""

    method: str = "lora"  # a name or alias of macft.method_registry (qlora: lora on a 4-bit base)
    batch: int = 4
    seq: int = 512
    rank: int = 8
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    num_layers: int = -1  # adapt the last N layers; -1 = all
    quantize_bits: int | None = None  # QLoRA base precision (method "qlora" means 4 when unset)
    group_size: int = 64
    grad_checkpoint: bool = False
    # Positions per loss chunk as train.loss_chunk_size means it (0 = the trainer's automatic size);
    # None = a plain loss over the whole batch's logits.
    loss_chunk_size: int | None = 0
    compute_bytes: int = 4  # float32 on CPU, bfloat16 (2) on Metal/CUDA
    polynomial_exp: bool = False  # the loss computes exp by a polynomial (``Backend.scalar_transcendentals``)
    # The options of the other methods, which size their trainable parameters.
    num_virtual_tokens: int = MethodConfig.num_virtual_tokens
    ptuning_hidden_size: int = MethodConfig.ptuning_hidden_size
    prefix_length: int = MethodConfig.prefix_length
    adapter_size: int = MethodConfig.adapter_size
    adapter_placement: str = MethodConfig.adapter_placement
    ranks: int = 1  # data-parallel ranks sharing ``batch``; the estimate is per rank
    objective: str = "sft"  # train.objective: a preference pair is two rows, a GRPO prompt ``samples`` rows
    samples: int = 1  # GRPO's completions per prompt (align.group_size)

    @property
    def rows_per_example(self) -> int:
        if self.objective == "grpo":
            return self.samples
        return 1 if self.objective == "sft" else 2  # chosen and rejected go through the model together

    @property
    def rank_batch(self) -> int:
        """Rows of the global batch the busiest rank holds."""
        return -(-self.batch // self.ranks) * self.rows_per_example

    @property
    def reference_copy(self) -> bool:
        """Whether the objective's reference model is a second, frozen copy of the base: full
        fine-tuning changes the base itself; adapter methods switch their adapters off instead."""
        from macft.align.preference import REFERENCE_OBJECTIVES

        return self.method == "full" and self.objective in REFERENCE_OBJECTIVES


@dataclass(frozen=True)
class Estimate:
    """A predicted peak, its parts, and whether it fits ``available_bytes``."""

    model: str
    plan: Plan
    parts: dict[str, int]  # name -> bytes, in the order they are explained
    available_bytes: int
    notes: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.available_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "plan": dataclasses.asdict(self.plan),
            "parts": self.parts,
            "total_bytes": self.total_bytes,
            "available_bytes": self.available_bytes,
            "fits": self.fits,
            "notes": self.notes,
            "suggestions": self.suggestions,
        }


# ---------------------------------------------------------------------------- reading shapes


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
    """The shape of a model spec (see ``macft.models.load``) without loading its weights."""
    from macft.config import DEFAULT_MODEL
    from macft.discovery import resolve_app_model
    from macft.models.gguf_import.reader import is_gguf_file

    spec = resolve_app_model(spec)  # ollama:NAME / lmstudio:NAME -> their GGUF file
    if spec == DEFAULT_MODEL:
        from macft.models.load import embedded_default_gguf

        return dataclasses.replace(shape_from_gguf(embedded_default_gguf()), name=DEFAULT_MODEL)
    path = Path(spec).expanduser()
    if is_gguf_file(path):
        if not path.is_file():
            raise MacftError(f"GGUF file {path} does not exist.")
        return shape_from_gguf(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            raise MacftError(f"{path} has no config.json; pass a model folder, a .gguf file or a hub id.")
        return shape_from_config(json.loads(config_file.read_text()), name=str(path))
    if spec.count("/") != 1:
        raise MacftError(f"Model '{spec}' not found: pass a model folder, a .gguf file, a hub id or '{DEFAULT_MODEL}'.")
    return shape_from_config(_hub_config(spec), name=spec)


def _hub_config(repo_id: str) -> dict:
    """config.json of a hub model: the local cache first, then a download of that one file."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from macft.hub import unreachable

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


# ---------------------------------------------------------------------------- the estimate


def trainable_params(shape: ModelShape, plan: Plan) -> int:
    return method_spec(plan.method).trainable_parameters(shape, plan)


def quantized_base(shape: ModelShape, plan: Plan) -> bool:
    """Whether the frozen base is held quantized (QLoRA, or a quantized model as it was stored)."""
    return plan.method != "full" and bool(plan.quantize_bits or plan.method == "qlora" or shape.stored_bits)


def weight_bytes(shape: ModelShape, plan: Plan) -> int:
    """The frozen (or, for full, trained) weights at the precision they are held in."""
    bits = plan.quantize_bits or (4 if plan.method == "qlora" else None)
    norms = (2 * shape.layers + 1) * shape.hidden * plan.compute_bytes
    matrices = shape.params - (2 * shape.layers + 1) * shape.hidden
    if bits is not None and plan.method != "full":
        # MLX affine quantization: `bits` per weight plus a scale and a bias per group in the compute dtype.
        per_weight = bits / 8 + 2 * plan.compute_bytes / plan.group_size
        return int(matrices * per_weight) + norms
    if shape.stored_bits is not None and plan.method != "full":
        return int(matrices * shape.stored_bits / 8) + norms
    return shape.params * plan.compute_bytes


def estimate(shape: ModelShape, plan: Plan, available_bytes: int | None = None) -> Estimate:
    """Predict the peak memory of one training step of ``plan`` on a model of ``shape``."""
    method_spec(plan.method)  # an unknown name is a one-line error
    if available_bytes is None:
        from macft.backend import machine_memory_bytes

        available_bytes = machine_memory_bytes()
    d = plan.compute_bytes
    tokens = plan.rank_batch * plan.seq
    trainable = trainable_params(shape, plan)
    # Adapters are created in float32; a fully trained model keeps its weights' dtype.
    trainable_bytes = trainable * (d if plan.method == "full" else 4)
    weights = weight_bytes(shape, plan)
    if plan.method == "full":
        weights = max(weights - trainable_bytes, 0)  # counted once, under "trainable"

    family = lookup(shape.family)  # what the family's blocks keep beyond the common ones
    saved_hidden = SAVED_HIDDEN + (family.saved_extra_hidden if family else 0)
    saved_intermediate = SAVED_INTERMEDIATE + (family.saved_extra_intermediate if family else 0)
    mlp_width = shape.intermediate * max(shape.experts_per_token, 1)  # each token runs through k experts
    per_token_layer = (saved_hidden * shape.hidden + SAVED_KV * shape.kv_dim + saved_intermediate * mlp_width) * d
    attention_probs = plan.rank_batch * shape.heads * plan.seq * plan.seq * d
    layers = shape.layers
    if plan.grad_checkpoint:
        # Only each block's input survives the forward pass; one block is recomputed at a time.
        saved = layers * tokens * shape.hidden * d + tokens * per_token_layer + attention_probs
    else:
        saved = layers * (tokens * per_token_layer + attention_probs)
    backward = tokens * BACKWARD_HIDDEN * shape.hidden * d + ATTENTION_TRANSIENT * attention_probs
    if plan.loss_chunk_size is None:
        logits = tokens * shape.vocab * 4 * LOGIT_COPIES
    else:
        from macft.train.losses import auto_chunk_size, auto_vocab_slice

        rows = auto_chunk_size(shape.vocab, plan.loss_chunk_size)
        if plan.method != "full":
            vocab_slice = auto_vocab_slice(shape.vocab, min(rows, tokens))
            copies = FROZEN_HEAD_BLOCK_COPIES + (POLYNOMIAL_EXP_COPIES if plan.polynomial_exp else 0)
            logits = int(min(rows, tokens) * vocab_slice * 4 * copies)
            if quantized_base(shape, plan):
                # A quantized head is dequantized one slice at a time, and MLX dequantizes and
                # multiplies the next slice while the current block is still alive: two slices in
                # flight (measured on CPU; Metal multiplies the packed slice directly, so there this
                # overestimates).
                logits = QUANTIZED_HEAD_SLICES_IN_FLIGHT * (logits + vocab_slice * shape.hidden * d)
        else:
            copies = CHUNKED_LOGIT_COPIES if rows >= tokens else MULTI_CHUNK_LOGIT_COPIES
            logits = int(tokens * shape.vocab * 4 * copies)

    parts = {
        "weights": weights,
        # Loaded as the base is, so it takes what the trained weights took before training.
        **({"reference": weight_bytes(shape, plan)} if plan.reference_copy else {}),
        "trainable": trainable_bytes,
        "gradients": trainable_bytes,
        "optimizer": 2 * trainable_bytes,
        "activations": saved + backward,
        "logits": logits,
        # The optimizer step comes after the backward pass has freed activations and logits; it
        # raises the peak only when its extra copies outweigh them (full fine-tuning).
        "update": max(0, UPDATE_EXTRA_COPIES * trainable_bytes - (saved + backward + logits)),
    }
    notes = _notes(shape, plan, parts) + _replica_notes(parts, int(available_bytes))
    result = Estimate(shape.name, plan, parts, int(available_bytes), notes)
    if not result.fits:
        result = dataclasses.replace(result, suggestions=suggestions(shape, plan, int(available_bytes)))
    return result


def _notes(shape: ModelShape, plan: Plan, parts: dict[str, int]) -> list[str]:
    notes = []
    total = sum(parts.values())
    # Only a plain loss or a trained head holds the batch's logits; macft's sliced loss holds one block.
    batch_logits = plan.loss_chunk_size is None or plan.method == "full"
    if batch_logits and parts["logits"] > 0.25 * total:
        full = plan.rank_batch * plan.seq * shape.vocab * 4
        notes.append(
            f"The {shape.vocab:,}-token vocabulary costs {full / GIB:.2f} GiB per float32 copy of the logits "
            "(batch × seq × vocab × 4 bytes), and a training step holds two or three; lower the batch size or "
            "sequence length to shrink them."
        )
    if plan.method == "full":
        notes.append("Full fine-tuning keeps gradients and two AdamW moments for every weight.")
    if plan.reference_copy:
        notes.append(
            f"{plan.objective.upper()} with full fine-tuning keeps a second, frozen copy of the base as its reference "
            "(an adapter method such as LoRA reuses the base with its adapters switched off)."
        )
    return notes


def replica_bytes(parts: dict[str, int]) -> int:
    """What every data-parallel rank holds whatever its share of the batch: the whole model, the
    trainable weights, their gradients and optimizer state."""
    return sum(parts.get(name, 0) for name in ("weights", "reference", "trainable", "gradients", "optimizer"))


def _replica_notes(parts: dict[str, int], available_bytes: int) -> list[str]:
    replica = replica_bytes(parts)
    if replica <= available_bytes:
        return []
    return [
        f"The model, its trainable weights, gradients and optimizer state alone need {format_bytes(replica)} per machine: "
        "data parallelism gives every Mac a whole copy, so more Macs cannot fit this run. Splitting the model itself "
        "is the next step (MLX's fully sharded modules, tensor-parallel sharded linear layers or pipeline parallelism), "
        "which macft does not do yet."
    ]


def suggestions(shape: ModelShape, plan: Plan, available_bytes: int) -> list[str]:
    """Settings that bring ``plan`` under ``available_bytes``, cheapest change first."""

    def fits(**changes: Any) -> bool:
        candidate = dataclasses.replace(plan, **changes)
        return estimate(shape, candidate, available_bytes).fits

    found = []
    if not plan.grad_checkpoint and fits(grad_checkpoint=True):
        found.append("turn on gradient checkpointing (--set train.grad_checkpoint=true)")
    if plan.loss_chunk_size is None and fits(loss_chunk_size=0):
        found.append("compute the loss in chunks (train.loss_chunk_size=0, the default)")
    for batch in (b for b in (plan.batch // 2, plan.batch // 4, 1) if 0 < b < plan.batch):
        if fits(batch=batch):
            found.append(f"lower the batch size to {batch} (--set train.batch_size={batch}; raise train.grad_accumulation to keep the effective batch)")
            break
    for seq in (s for s in (plan.seq // 2, plan.seq // 4, 128) if 8 <= s < plan.seq):
        if fits(seq=seq):
            found.append(f"shorten sequences to {seq} tokens (--set data.max_seq_length={seq})")
            break
    if plan.method in ("lora", "dora") and plan.quantize_bits is None and fits(quantize_bits=4):
        found.append("use QLoRA: quantize the frozen base to 4 bits (--set model.quantize_bits=4)")
    if plan.method == "full" and fits(method="lora"):
        found.append("train LoRA adapters instead of every weight (--set method.name=lora)")
    more = next((n for n in (2 * plan.ranks, 4 * plan.ranks) if n <= plan.batch and fits(ranks=n)), None)
    if more is not None:
        found.append(f"share the batch among {more} Macs (data parallelism: macft lora --hosts ..., see the README)")
    if not found:
        found.append("no single change fits; combine QLoRA, batch size 1, gradient checkpointing and shorter sequences, or pick a smaller model")
    return found


# ---------------------------------------------------------------------------- recipes


def mac_working_set(total_bytes: int) -> int:
    """What Metal lets one process use on an Apple Silicon Mac with ``total_bytes`` of RAM."""
    return int(total_bytes * (0.75 if total_bytes > 36 * GIB else 2 / 3))


def backend_settings() -> dict[str, Any]:
    """The Plan fields that depend on where this process computes."""
    from macft.backend import detect

    backend = detect()
    return {
        "compute_bytes": 2 if backend.compute_dtype in ("bfloat16", "float16") else 4,
        "polynomial_exp": backend.scalar_transcendentals,
    }


MAC_SETTINGS = {"compute_bytes": 2, "polynomial_exp": False}  # Apple Silicon: bfloat16 and MLX's exp on Metal


def plan_from_recipe(recipe, settings: dict[str, Any] | None = None) -> Plan:
    """The memory-relevant settings of a ``macft.config.Recipe`` on this backend (or ``settings``)."""
    method = recipe.method.name
    if method in ("lora", "dora") and recipe.model.quantize_bits is not None:
        method_key = "qlora" if method == "lora" else "dora"
    else:
        method_key = method
    return Plan(
        method=method_key,
        batch=recipe.train.batch_size,
        seq=recipe.data.max_seq_length,
        rank=recipe.method.rank,
        target_modules=tuple(recipe.method.target_modules),
        num_layers=recipe.method.num_layers,
        quantize_bits=recipe.model.quantize_bits,
        group_size=recipe.model.quantize_group_size,
        grad_checkpoint=recipe.train.grad_checkpoint,
        loss_chunk_size=recipe.train.loss_chunk_size,
        num_virtual_tokens=recipe.method.num_virtual_tokens,
        ptuning_hidden_size=recipe.method.ptuning_hidden_size,
        prefix_length=recipe.method.prefix_length,
        adapter_size=recipe.method.adapter_size,
        adapter_placement=recipe.method.adapter_placement,
        objective=recipe.train.objective,
        samples=recipe.align.group_size,
        **(settings if settings is not None else backend_settings()),
    )


def estimate_recipe(recipe, available_bytes: int | None = None, settings: dict[str, Any] | None = None) -> Estimate:
    """Predict a recipe's peak memory from its model's config alone (``settings``: MAC_SETTINGS
    with ``mac_working_set(...)`` to plan for a Mac from another machine)."""
    shape = read_model_shape(recipe.model.path)
    return estimate(shape, plan_from_recipe(recipe, settings), available_bytes)


def loaded_shape(loaded) -> ModelShape:
    """The shape of an already loaded model (``macft.models.load.LoadedModel``), with the stored
    bits of its quantized weights."""
    from macft.models.quantized import has_quantized_layers

    shape = shape_from_config(loaded.config, name=loaded.identity.get("source", str(loaded.path)))
    if shape.stored_bits is None and has_quantized_layers(loaded.model):
        shape = dataclasses.replace(shape, stored_bits=_quantized_bits(loaded.model))
    return shape


def check_fits(recipe, loaded) -> Estimate:
    """The estimate for ``recipe`` on an already loaded model.

    ``macft lora`` calls this before training and warns (or stops) when ``not est.fits``.
    """
    return estimate(loaded_shape(loaded), plan_from_recipe(recipe))


# The step limit over the predicted peak. Once over its limit MLX makes every allocation wait for
# all the work scheduled before it, which serialises a step: a limit at the prediction itself
# (within 20% of the real peak) held the Gemma 3 270M LoRA step at 56 instead of 81 tokens/s while
# lowering its peak by 5%. A quarter above it, ordinary steps never wait, and a step that schedules
# far ahead (every vocabulary slice of the loss at once) is still stopped near its prediction.
LIMIT_HEADROOM = 1.25


def step_budget(shape: ModelShape, plan: Plan) -> Callable[[int, int], int]:
    """``budget(batch, length)``: the memory limit the trainer holds during one training step of
    ``plan`` on a batch of that many rows padded to that many tokens: the predicted peak plus
    ``LIMIT_HEADROOM``. MLX waits for memory once over the limit, so a step needing more runs slower
    but still runs; its real peak lands a little above the limit (the allocation that crossed it)."""

    @lru_cache(maxsize=None)
    def budget(batch: int, length: int) -> int:
        step = dataclasses.replace(plan, batch=batch, seq=length, ranks=1)
        return int(estimate(shape, step, available_bytes=1 << 62).total_bytes * LIMIT_HEADROOM)

    return budget


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


def format_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 1024**2:.0f} MiB"
