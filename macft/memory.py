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

Given a budget, ``choose_settings`` picks the cheapest settings that fit (attention in query blocks,
layer checkpointing, micro-batches with accumulation, a 4-bit base only when allowed), each with its
reason; ``fitting_limits`` and ``refusal`` name the longest sequence and largest batch that would fit
when nothing does. ``macft.train.plan`` applies the choice to a run's recipe before loading weights.

    choice = choose_settings(shape, Plan(batch=1, seq=32768), 16 * GIB)
    choice.plan.attention_block, choice.plan.grad_checkpoint, choice.reasons

With ``Plan(ranks=N)`` the plan is for one of N data-parallel ranks: ``batch`` is the global batch,
each rank holds its share of it and a whole copy of the model, gradients and optimizer state.

The coefficients below were measured on this code base's models with ``mx.get_peak_memory()``
on llama- and gemma-shaped models; ``tests/test_memory.py`` re-measures real training steps and
keeps the prediction within 20% of them.
"""

from __future__ import annotations

import dataclasses
import math
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
# Block attention (``macft.models.attention``) keeps nothing between layers; the backward pass
# through one block of queries holds about this many float32 copies of batch × heads × rows × L
# (scores, probabilities, their gradients), measured.
ATTENTION_BLOCK_COPIES = 5.5
# Gemma 4's per-layer inputs (the per-layer embedding rows and the projection of the embeddings,
# ``hidden_size_per_layer_input`` wide for every layer) are formed before the first block and kept
# until the backward pass reaches the embeddings: copies per token, layer and width, measured.
PER_LAYER_INPUT_COPIES = 3
# Qwen3.5's linear attention runs its recurrence one token at a time (mlx-lm's ``gated_delta_ops``
# in training) and keeps each step's state (value heads × key dim × value dim, float32) for the
# backward pass: copies of the state per token, measured.
LINEAR_STATE_COPIES = 4

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
    # Queries per attention block (``macft.models.attention``), as train.attention_block means it
    # once chosen; None = MLX's fused attention, which keeps every layer's L × L probabilities.
    attention_block: int | None = None
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


def estimate(shape: ModelShape, plan: Plan, available_bytes: int | None = None, suggest: bool = True) -> Estimate:
    """Predict the peak memory of one training step of ``plan`` on a model of ``shape`` (an unknown
    method is a one-line error); with ``suggest``, a plan that does not fit comes with the changes
    that would make it fit."""
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
    attention_layers = shape.layers - shape.linear_layers
    if plan.attention_block:
        # Nothing is kept per layer; the block in its backward pass is the only transient.
        attention_probs = 0
        attention_transient = int(ATTENTION_BLOCK_COPIES * plan.rank_batch * shape.heads * min(plan.attention_block, plan.seq) * plan.seq * 4)
    else:
        attention_probs = plan.rank_batch * shape.heads * plan.seq * plan.seq * d
        attention_transient = ATTENTION_TRANSIENT * attention_probs
    # A linear-attention block keeps its recurrent state per token instead of attention probabilities.
    state = tokens * LINEAR_STATE_COPIES * shape.linear_state * 4
    layers = shape.layers
    if plan.grad_checkpoint:
        # Only each block's input survives the forward pass; one block is recomputed at a time.
        saved = layers * tokens * shape.hidden * d + tokens * per_token_layer + max(attention_probs if attention_layers else 0, state)
    else:
        saved = layers * tokens * per_token_layer + attention_layers * attention_probs + shape.linear_layers * state
    saved += tokens * PER_LAYER_INPUT_COPIES * layers * shape.per_layer_input * d
    backward = tokens * BACKWARD_HIDDEN * shape.hidden * d + (attention_transient if attention_layers else 0)
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
    if suggest and not result.fits:
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
        # Without suggestions of its own: each candidate's would try candidates again, exponentially.
        candidate = dataclasses.replace(plan, **changes)
        return estimate(shape, candidate, available_bytes, suggest=False).fits

    found = []
    if not plan.attention_block and fits(attention_block=default_block_rows(shape, plan)):
        found.append("compute attention in blocks of queries (--set train.attention_block=0, the default)")
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


# ---------------------------------------------------------------------------- choosing settings

# What each saving costs in step time, as a share of a step (docs/benchmarks.md): the planner takes
# the cheapest combination that fits its budget.
CHECKPOINT_COST = 0.30  # every layer's forward pass runs twice
MICRO_BATCH_COST = 0.05  # per halving of the rows computed at once (smaller products, more steps' overhead)
BLOCK_HALVING_COST = 0.01  # per halving of the attention block below its default (more, smaller products)
QUANTIZE_COST = 1.0  # QLoRA: a 4-bit base, dequantized for every product on a CPU; only when allowed
# From this length on block attention is chosen even where MLX's fused attention would fit: on a CPU
# it is faster (it skips the masked half of the scores), and it never holds more.
BLOCK_ATTENTION_FROM = 1024
DEFAULT_BLOCK_BYTES = 64 * 1024**2  # one block's float32 scores, when nothing asks for smaller
MIN_BLOCK_ROWS = 16
SHORTEST_SEQ = 8  # the shortest sequence the planner considers when it names what would fit


@dataclass(frozen=True)
class Freedom:
    """What the planner may change in a plan: what the recipe left unset (or allows)."""

    checkpoint: bool = True  # train.grad_checkpoint unset
    attention: bool = True  # train.attention_block 0
    micro_batches: bool = True  # split a batch into micro-batches with gradient accumulation
    quantize: bool = False  # model.allow_qlora: quantize the frozen base to 4 bits


@dataclass(frozen=True)
class Choice:
    """The settings the planner chose: the plan, its estimate, micro-batches per batch, and why."""

    plan: Plan
    estimate: Estimate
    accumulation: int = 1  # micro-batches of ``plan.batch`` rows per batch of the asked plan
    reasons: tuple[str, ...] = ()


def default_block_rows(shape: ModelShape, plan: Plan) -> int:
    """Query rows per attention block so that one block's scores take ``DEFAULT_BLOCK_BYTES``."""
    rows = DEFAULT_BLOCK_BYTES // max(1, plan.rank_batch * shape.heads * plan.seq * 4)
    return int(min(plan.seq, max(MIN_BLOCK_ROWS, rows // MIN_BLOCK_ROWS * MIN_BLOCK_ROWS)))


def _options(shape: ModelShape, plan: Plan, free: Freedom) -> list[tuple[float, Plan, int]]:
    """Every candidate plan with its time cost and micro-batches per batch, cheapest first (the
    last is the leanest)."""
    if free.attention:
        blocks: list[tuple[float, int | None]] = [] if plan.seq >= BLOCK_ATTENTION_FROM else [(0.0, None)]
        rows, cost = default_block_rows(shape, plan), 0.0
        while True:
            blocks.append((cost, rows))
            if rows <= MIN_BLOCK_ROWS:
                break
            rows, cost = max(MIN_BLOCK_ROWS, rows // 2 // MIN_BLOCK_ROWS * MIN_BLOCK_ROWS), cost + BLOCK_HALVING_COST
    else:
        blocks = [(0.0, plan.attention_block)]
    checkpoints = [(0.0, False), (CHECKPOINT_COST, True)] if free.checkpoint and not plan.grad_checkpoint else [(0.0, plan.grad_checkpoint)]
    splits, parts = [(0.0, 1)], 1
    while free.micro_batches and plan.ranks == 1 and plan.batch % (parts * 2) == 0:
        parts *= 2
        splits.append((MICRO_BATCH_COST * math.log2(parts), parts))
    bases = [(0.0, plan.method, plan.quantize_bits)]
    if free.quantize and plan.method in ("lora", "dora") and plan.quantize_bits is None and shape.stored_bits is None:
        bases.append((QUANTIZE_COST, "qlora" if plan.method == "lora" else "dora", 4))
    options = [
        (base_cost + checkpoint_cost + split_cost + block_cost,
         dataclasses.replace(plan, method=method, quantize_bits=bits, grad_checkpoint=checkpoint, batch=plan.batch // parts, attention_block=rows),
         parts)
        for base_cost, method, bits in bases
        for checkpoint_cost, checkpoint in checkpoints
        for split_cost, parts in splits
        for block_cost, rows in blocks
    ]  # fmt: skip
    return sorted(options, key=lambda option: option[0])


def choose_settings(shape: ModelShape, plan: Plan, available_bytes: int | None = None, free: Freedom = Freedom()) -> Choice:
    """The cheapest settings within ``free`` under which ``plan`` fits ``available_bytes`` (the machine's
    memory when None), with one line per change saying why; when nothing fits, the leanest settings
    (``choice.estimate.fits`` is False, with suggestions)."""
    if available_bytes is None:
        from macft.backend import machine_memory_bytes

        available_bytes = machine_memory_bytes()
    leanest = None
    for _, candidate, parts in _options(shape, plan, free):
        result = estimate(shape, candidate, available_bytes, suggest=False)
        if result.fits:
            return Choice(candidate, result, parts, tuple(_reasons(shape, plan, candidate, parts, available_bytes)))
        if leanest is None or result.total_bytes < leanest[1].total_bytes:
            leanest = (candidate, result, parts)
    candidate, result, parts = leanest
    return Choice(candidate, estimate(shape, candidate, available_bytes), parts, tuple(_reasons(shape, plan, candidate, parts, available_bytes)))


def _reasons(shape: ModelShape, asked: Plan, chosen: Plan, parts: int, available_bytes: int) -> list[str]:
    """One line per setting the planner changed: what, and what it saves or costs."""

    def without(**changes: Any) -> str:
        return format_bytes(estimate(shape, dataclasses.replace(chosen, **changes), available_bytes, suggest=False).total_bytes)

    reasons = []
    if chosen.attention_block and chosen.attention_block != asked.attention_block:
        scores = chosen.rank_batch * shape.heads * chosen.seq * chosen.seq * chosen.compute_bytes
        reasons.append(
            f"attention in blocks of {chosen.attention_block} queries, recomputed in the backward pass "
            f"(MLX's fused attention would keep {format_bytes(scores)} of scores per layer; peak {without(attention_block=None)} with it)"
        )
    if chosen.grad_checkpoint and not asked.grad_checkpoint:
        reasons.append(
            f"layer checkpointing: each layer's forward pass is recomputed in the backward pass, about "
            f"{CHECKPOINT_COST:.0%} more time (peak without it {without(grad_checkpoint=False)})"
        )
    if parts > 1:
        reasons.append(
            f"micro-batches of {chosen.batch} rows, {parts} accumulated per step: the same batch of {asked.batch} "
            f"(peak {without(batch=asked.batch)} at once)"
        )
    if chosen.quantize_bits and not asked.quantize_bits:
        reasons.append(
            f"QLoRA: the frozen base quantized to {chosen.quantize_bits} bits, as model.allow_qlora permits "
            f"(peak {without(quantize_bits=None, method=asked.method)} in float)"
        )
    return reasons


def fitting_limits(shape: ModelShape, plan: Plan, available_bytes: int, free: Freedom = Freedom()) -> tuple[int | None, int | None]:
    """(the longest sequence that fits at ``plan.batch``, the largest batch that fits at ``plan.seq``),
    each with the planner free to choose what ``free`` allows; None where not even the smallest fits.
    Memory grows with both, so each is found by bisection: a bounded number of estimates."""

    def fits(**changes: Any) -> bool:
        leanest = _options(shape, dataclasses.replace(plan, **changes), free)[-1][1]
        return estimate(shape, leanest, available_bytes, suggest=False).fits

    def largest(low: int, high: int, key: str) -> int | None:
        if not fits(**{key: low}):
            return None
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(**{key: middle}) else (low, middle - 1)
        return low

    return largest(SHORTEST_SEQ, plan.seq, "seq"), largest(1, plan.batch, "batch")


def refusal(shape: ModelShape, plan: Plan, leanest: Choice, free: Freedom) -> str:
    """One line: why ``plan`` cannot fit its budget even with every saving ``free`` allows, and what would."""
    budget = leanest.estimate.available_bytes
    longest, largest = fitting_limits(shape, plan, budget, free)
    savings = [
        *(["layer checkpointing"] if leanest.plan.grad_checkpoint else []),
        *([f"attention in blocks of {leanest.plan.attention_block} queries"] if leanest.plan.attention_block else []),
        *([f"micro-batches of {leanest.plan.batch}"] if leanest.accumulation > 1 else []),
        *([f"a {leanest.plan.quantize_bits}-bit base"] if leanest.plan.quantize_bits else []),
    ]
    with_savings = f" even with {', '.join(savings)}" if savings else ""
    options = []
    if longest is not None:
        options.append(f"at batch {plan.batch} it fits up to {longest:,} tokens (--set data.max_seq_length={longest})")
    if largest is not None and largest < plan.batch:
        options.append(f"at {plan.seq:,} tokens up to batch {largest} (--set train.batch_size={largest})")
    elif largest is None and longest is not None:
        options.append(f"at {plan.seq:,} tokens not even batch 1 fits")
    elif longest is None:
        options.append("not even 8 tokens per row fit: pick a smaller model" + ("" if free.quantize else " or allow QLoRA (--set model.allow_qlora=true)"))
    return (
        f"{shape.name}: batch {plan.batch} × {plan.seq:,} tokens needs about {format_bytes(leanest.estimate.total_bytes)}{with_savings}, "
        f"over the {format_bytes(budget)} memory budget; {'; '.join(options)}."
    )


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


def step_budget(shape: ModelShape, plan: Plan, cap: int | None = None) -> Callable[[int, int], int]:
    """``budget(batch, length)``: the memory limit the trainer holds during one training step of
    ``plan`` on a batch of that many rows padded to that many tokens: the predicted peak plus
    ``LIMIT_HEADROOM``, at most ``cap`` (the run's memory budget). MLX waits for memory once over the
    limit, so a step needing more runs slower but still runs; its real peak lands a little above the
    limit (the allocation that crossed it)."""

    @lru_cache(maxsize=None)
    def budget(batch: int, length: int) -> int:
        step = dataclasses.replace(plan, batch=batch, seq=length, ranks=1, rows_per_example=1)
        limit = int(estimate(shape, step, available_bytes=1 << 62, suggest=False).total_bytes * LIMIT_HEADROOM)
        return limit if cap is None else min(limit, cap)

    return budget
