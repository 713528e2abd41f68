"""The memory planner: predict a training run's peak memory before loading any weights.

The prediction adds up what MLX holds at the peak of one training step: the frozen weights at
their stored precision, the trainable parameters with their gradients and AdamW moments, the
activations each layer keeps for the backward pass, the transient buffers of the backward pass
through one layer, and the logits: for macft's own loss one block of positions × vocabulary slice,
for a plain loss or a trained head the whole batch × positions × vocabulary, which dominates for
models with a large vocabulary such as Gemma's 262k tokens. Shapes come from ``config.json`` or
from GGUF metadata (``macft.models.shape``), so no weights are loaded; the trainable parameters are
the method's own count (``macft.methods``).

    shape = read_model_shape("Qwen/Qwen3-0.6B")          # config only, from the hub cache
    est = estimate(shape, Plan(method="qlora", batch=4, seq=512))
    print(est.total_bytes, est.fits, est.suggestions)

With ``Plan(ranks=N)`` the plan is for one of N data-parallel ranks: ``batch`` is the global batch,
each rank holds its share of it and a whole copy of the model, gradients and optimizer state.

The coefficients below were measured on this code base's models with ``mx.get_peak_memory()``
on llama- and gemma-shaped models; ``tests/test_memory.py`` re-measures real training steps and
keeps the prediction within 20% of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

from macft.families import lookup
from macft.methods import MethodConfig, method_spec
from macft.models.head import auto_chunk_size, auto_vocab_slice
from macft.models.shape import ModelShape
from macft.units import GIB, format_bytes


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
# macft's chunked loss (``macft.models.head``) applies the output head to ``loss_chunk_size``
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

@dataclass(frozen=True)
class Plan:
    """The training settings memory depends on."""

    method: str = "lora"  # a method name or alias (qlora: lora on a 4-bit base)
    batch: int = 4
    seq: int = 512
    settings: Any = field(default_factory=MethodConfig)  # the method's options (rank, targets...), which size what trains
    quantize_bits: int | None = None  # QLoRA base precision (method "qlora" means 4 when unset)
    group_size: int = 64
    grad_checkpoint: bool = False
    # Positions per loss chunk as train.loss_chunk_size means it (0 = the trainer's automatic size);
    # None = a plain loss over the whole batch's logits.
    loss_chunk_size: int | None = 0
    compute_bytes: int = 4  # float32 on CPU, bfloat16 (2) on Metal/CUDA
    polynomial_exp: bool = False  # the loss computes exp by a polynomial (``Backend.scalar_transcendentals``)
    ranks: int = 1  # data-parallel ranks sharing ``batch``; the estimate is per rank
    objective: str = "sft"  # the training objective, as messages name it
    rows_per_example: int = 1  # model rows per batch item (a preference pair is two, a GRPO prompt its group)
    # The objective's reference model is a second, frozen copy of the base: full fine-tuning changes the
    # base itself, where adapter methods switch their adapters off instead.
    reference_copy: bool = False

    @property
    def rank_batch(self) -> int:
        """Rows of the global batch the busiest rank holds."""
        return -(-self.batch // self.ranks) * self.rows_per_example


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


# ---------------------------------------------------------------------------- the estimate


def trainable_params(shape: ModelShape, plan: Plan) -> int:
    return method_spec(plan.method).trainable_parameters(shape, plan.settings)


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
    """Predict the peak memory of one training step of ``plan`` on a model of ``shape`` (an unknown
    method is a one-line error)."""
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


# ---------------------------------------------------------------------------- machines and steps


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


# The step limit over the predicted peak. Once over its limit MLX makes every allocation wait for
# all the work scheduled before it, which serialises a step: a limit at the prediction itself slowed
# ordinary steps by about a third for a few percent less peak (docs/benchmarks.md). A quarter above
# it, ordinary steps never wait, and a step that schedules far ahead (every vocabulary slice of the
# loss at once) is still stopped near its prediction.
LIMIT_HEADROOM = 1.25


def step_budget(shape: ModelShape, plan: Plan) -> Callable[[int, int], int]:
    """``budget(batch, length)``: the memory limit the trainer holds during one training step of
    ``plan`` on a batch of that many rows padded to that many tokens: the predicted peak plus
    ``LIMIT_HEADROOM``. MLX waits for memory once over the limit, so a step needing more runs slower
    but still runs; its real peak lands a little above the limit (the allocation that crossed it)."""

    @lru_cache(maxsize=None)
    def budget(batch: int, length: int) -> int:
        step = dataclasses.replace(plan, batch=batch, seq=length, ranks=1, rows_per_example=1)
        return int(estimate(shape, step, available_bytes=1 << 62).total_bytes * LIMIT_HEADROOM)

    return budget
