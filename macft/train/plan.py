"""Settle a run before it starts: recipe + base model + data -> one frozen ``RunPlan``.

Everything a recipe leaves open is decided here, once, and said aloud: the method's usual learning
rate, ``--epochs auto`` and the step count, the validation cadence, the lanes each batch splits into,
whether the objective's reference model is a second copy of the base, and how the run fits its
memory budget: the settings the recipe leaves to the planner (layer checkpointing, attention
blocks, micro-batches with accumulation, a 4-bit base where ``model.allow_qlora``) are chosen from
the model's config before any weight loads, the cheapest that fit, and a run that cannot fit is
refused there, naming the longest sequence and the largest batch that would. The plan also holds what it was settled on: the
loaded base, the model with its method applied, the objective's loss and the optimizer. The training
loop only reads it, and the run's ``recipe.yaml`` records exactly ``plan.recipe``, so a resume
repeats every decision.

    plan = settle(recipe, world)          # raises MacftError for missing data or a run that cannot fit
    recipe, choice = fit_budget(recipe)   # the memory settings alone, from the config (no weights)
    plan.recipe.train.iters, plan.recipe.train.lanes, plan.notes
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from macft import __version__
from macft.adapters.peft import init_from_peft
from macft.backend import detect
from macft.config import Recipe
from macft.data.shapes import Batches, Splits, content
from macft.data.splits import data_files
from macft.errors import MacftError
from macft.memory import Choice, Estimate, Freedom, Plan, backend_settings, choose_settings, estimate, refusal, step_budget
from macft.methods import apply_method, count_parameters, method_spec
from macft.methods.base import MethodSpec
from macft.models.head import auto_chunk_size, vocab_size
from macft.models.load import load_model
from macft.models.shape import ModelShape, loaded_shape, read_model_shape
from macft.objectives import objective_named, refuse_other_data
from macft.objectives.base import LossContext, Objective
from macft.train.distributed import check_same, items_digest, peer_errors, recipe_digest
from macft.train.schedule import build_schedule
from macft.units import format_bytes, size_bytes

MAX_AUTO_EPOCHS = 5
# With --epochs auto and a validation set: validate about this many times, and stop after this many
# validations without improvement.
AUTO_VALIDATIONS = 10
AUTO_PATIENCE = 3


@dataclass(frozen=True)
class RunPlan:
    recipe: Recipe  # settled: learning rate, steps, validation cadence and lanes filled in
    method: MethodSpec
    objective: Objective
    loaded: Any  # the base (macft.models.load.LoadedModel)
    model: Any  # the base with the method applied: what trains
    loss: Any  # the objective's loss (macft.objectives.base)
    optimizer: optim.Optimizer  # with the schedule over plan.recipe.train.iters steps
    batches: Batches
    shape: ModelShape
    memory: Plan  # the memory planner's view of one rank's step
    estimate: Estimate
    memory_budget: Callable[[int, int], int] | None  # the per-step memory limit the loop holds, if any
    reference: str | None  # what the objective compares the policy with, for the user
    notes: tuple[str, ...]  # what settling decided and why, for the user


def training_file(recipe: Recipe) -> Path:
    """The training data file, checked to hold the objective's kind of data (one line when not)."""
    if not recipe.data.train:
        raise MacftError(
            f"Recipe '{recipe.name}' needs training data: pass --data PATH (a .jsonl file or a folder with train.jsonl); "
            f"`macft recipes show {recipe.name}` says what data it expects."
        )
    objective = objective_named(recipe.train.objective)
    path = data_files(recipe.data)["train"]
    refuse_other_data(objective, path)
    return path


def load_base(recipe: Recipe):
    """The recipe's base model (``macft.models.load.LoadedModel``), quantized for QLoRA if asked."""
    return load_model(recipe.model.path, **recipe.model.load_options)


def settle(recipe: Recipe, world: Any) -> RunPlan:
    """Load the base and the data, check that every rank has the same, and settle the run for one of
    ``world.size`` ranks (a resumed run's recipe was settled when it started)."""
    objective, method = objective_named(recipe.train.objective), method_spec(recipe.method.name)
    train, resumed = recipe.train, bool(recipe.output.resume)
    if train.batch_size < world.size:
        raise MacftError(f"train.batch_size {train.batch_size} is the global batch and must be at least the {world.size} ranks.")
    if world.size > 1 and not objective.distributed:
        raise MacftError(f"train.objective {objective.name} runs on one process; train it without --hosts.")
    recipe, choice = fit_budget(recipe, world.size)  # before any weight loads
    train, budget = recipe.train, choice.estimate.available_bytes
    mx.random.seed(train.seed)
    np.random.seed(train.seed)
    loaded = load_model(recipe.model.path, **recipe.model.load_options)
    shape = loaded_shape(loaded)
    # The lazy tokenizer: on supervised data it has tokenized before, the run needs none before its first step.
    splits = objective.data.load(recipe.data, loaded.lazy_tokenizer, recipe.align)
    batches = objective.data.batches(splits, recipe.data, batch_size=train.batch_size, seed=train.seed)
    facts = {"macft version": __version__, "MLX version": mx.__version__, "recipe": recipe_digest(recipe)}
    facts |= {"data": items_digest(splits.train, splits.valid), "base model": loaded.identity.get("sha256", "")}
    with peer_errors(world, "Training had not started."):
        check_same(world, facts)

    notes = data_notes(splits, objective) + [f"Memory plan ({format_bytes(budget)} budget): {reason}." for reason in choice.reasons]
    rate = train.learning_rate if train.learning_rate is not None else method.learning_rate
    if train.learning_rate is None:
        notes.insert(0, f"Learning rate {rate:g}: the usual one for {method.title}; set --lr to choose another.")
    elif not resumed and (warning := learning_rate_warning(method, rate)):
        notes.insert(0, warning)
    changes: dict[str, Any] = {"learning_rate": rate}
    if not train.iters:
        changes |= epochs_and_cadence(method, train, len(splits.train), batches.per_epoch, has_valid=bool(splits.valid), notes=notes)
    quantized = shape.stored_bits is not None or recipe.model.quantize_bits is not None
    changes["lanes"] = lane_count(train.lanes, train.batch_size, objective.lanes, quantized)
    recipe = recipe.replace(train=changes)

    memory = replace(memory_plan(recipe), ranks=world.size)
    predicted = estimate(shape, memory, budget)
    if not predicted.fits:
        hint = predicted.suggestions[0] if predicted.suggestions else "use a smaller batch, sequence length or model"
        raise MacftError(
            f"This run needs about {format_bytes(predicted.total_bytes)} but {format_bytes(predicted.available_bytes)} is available; "
            f"{hint} (see `macft estimate`)."
        )
    notes.append(f"Predicted peak memory {format_bytes(predicted.total_bytes)} of {format_bytes(predicted.available_bytes)} available.")
    reference_note = None
    if objective.needs_reference:
        reference_note = (
            f"{objective.title} with {method.title} keeps a second, frozen copy of the base as its reference (twice the weight memory)."
            if memory.reference_copy
            else f"{objective.title} reference: the base with the adapters switched off (no second copy of the weights)."
        )
        notes.append(reference_note)

    # Only method.init_text needs the tokenizer (soft prompts start from its tokens).
    model = apply_method(loaded.model, recipe.method, loaded.tokenizer if recipe.method.init_text else None)
    if recipe.method.init_adapter:  # continue a PEFT adapter: its weights into the layers just inserted
        model = init_from_peft(model, recipe.method.init_adapter, recipe.model.path)
    if count_parameters(model)[0] == 0:
        raise MacftError(f"Method '{recipe.method.name}' left nothing to train; check method.num_layers and method.target_modules.")
    reference = frozen_copy(recipe) if memory.reference_copy else None
    chunk_size = auto_chunk_size(vocab_size(model), recipe.train.loss_chunk_size)
    loss = objective.loss(LossContext(model, recipe.align, loaded.lazy_tokenizer, chunk_size, reference))
    return RunPlan(
        recipe, method, objective, loaded, model, loss, make_optimizer(recipe), batches, shape, memory, predicted,
        step_budget(shape, memory, cap=budget) if objective.planned_step else None, reference_note, tuple(notes),
    )


def frozen_copy(recipe: Recipe) -> Any:
    """A second copy of the base, frozen, for an objective's reference when the method changes the base itself."""
    reference = load_base(recipe).model
    reference.freeze()
    reference.eval()
    return reference


def memory_budget(recipe: Recipe) -> int:
    """The memory a recipe's run may use: train.memory_budget, else this machine's memory."""
    if recipe.train.memory_budget:
        return size_bytes(recipe.train.memory_budget)
    from macft.backend import machine_memory_bytes

    return machine_memory_bytes()


def config_shape(recipe: Recipe) -> ModelShape:
    """The shape of a recipe's model from its config alone, held as the recipe loads it (a GGUF
    imported with model.dequantize is held in float)."""
    shape = read_model_shape(recipe.model.path)
    return replace(shape, stored_bits=None) if recipe.model.dequantize else shape


def fit_budget(recipe: Recipe, ranks: int = 1) -> tuple[Recipe, Choice]:
    """``(recipe, choice)``: the recipe with the settings it left to the memory planner chosen to fit
    its budget (train.grad_checkpoint unset, train.attention_block 0, micro-batches, a 4-bit base where
    model.allow_qlora), and the planner's ``Choice`` with its reasons. Reads the model's config only,
    so a run that cannot fit is refused (one line) before any weight loads. A recipe that fixes every
    setting (a resumed run's) comes back as it was."""
    shape, method = config_shape(recipe), method_spec(recipe.method.name)
    plan = replace(memory_plan(recipe), ranks=ranks)
    free = Freedom(
        checkpoint=recipe.train.grad_checkpoint is None,
        attention=recipe.train.attention_block == 0 and method.block_attention,
        quantize=recipe.model.allow_qlora,
    )
    choice = choose_settings(shape, plan, memory_budget(recipe), free)
    if not choice.estimate.fits:
        raise MacftError(refusal(shape, plan, choice, free))
    chosen = choice.plan
    return recipe.replace(
        train={
            "grad_checkpoint": chosen.grad_checkpoint,
            "attention_block": chosen.attention_block or -1,
            "batch_size": chosen.batch,
            "grad_accumulation": recipe.train.grad_accumulation * choice.accumulation,
        },
        model={"quantize_bits": chosen.quantize_bits},
    ), choice


def make_optimizer(recipe: Recipe) -> optim.Optimizer:
    cfg = recipe.train
    schedule = build_schedule(cfg, cfg.iters)
    if cfg.optimizer == "adamw":
        return optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return optim.Adam(learning_rate=schedule)
    return optim.SGD(learning_rate=schedule, weight_decay=cfg.weight_decay)


def memory_plan(recipe: Recipe, settings: dict[str, Any] | None = None) -> Plan:
    """The memory planner's view of a recipe's step on this backend (or ``settings``: planning for a
    Mac from another machine passes ``macft.memory.MAC_SETTINGS``)."""
    method, objective = method_spec(recipe.method.name), objective_named(recipe.train.objective)
    qlora = method.name == "lora" and recipe.model.quantize_bits is not None
    return Plan(
        method="qlora" if qlora else method.name,
        batch=recipe.train.batch_size,
        seq=recipe.data.max_seq_length,
        settings=recipe.method,
        quantize_bits=recipe.model.quantize_bits,
        group_size=recipe.model.quantize_group_size,
        grad_checkpoint=bool(recipe.train.grad_checkpoint),
        attention_block=recipe.train.attention_block if recipe.train.attention_block > 0 else None,
        loss_chunk_size=recipe.train.loss_chunk_size,
        objective=objective.name,
        rows_per_example=objective.rows_per_example(recipe.align),
        reference_copy=objective.needs_reference and not method.switchable,
        **(settings if settings is not None else backend_settings()),
    )


def lane_count(requested: int, batch_size: int, splits: bool, quantized: bool) -> int:
    """Lanes for a step: ``requested``, or when 0 one per core on a CPU, at most one per row (or pair)
    of a batch; one for an objective whose batches do not split. When 0, a quantized base that a CPU
    dequantizes for its matmuls keeps one lane: each lane would dequantize it again (more memory
    for a speed-up within noise, docs/benchmarks.md)."""
    if not splits:
        return 1
    if not requested and detect().dequantize_for_matmul and quantized:
        return 1
    return min(requested or detect().lanes, batch_size)


def switched_method_rate(recipe: Recipe, replaced: tuple[str, float]) -> tuple[Recipe, str]:
    """The recipe with its method's usual learning rate, when a flag switched the recipe file's method
    (``replaced``: that method and its rate; a rate written for one method misleads another)."""
    spec = method_spec(recipe.method.name)
    note = (
        f"Learning rate {spec.learning_rate:g}: the usual one for {spec.title} (the recipe's {replaced[1]:g} was for "
        f"{method_spec(replaced[0]).title}); set --lr to choose another."
    )
    return recipe.replace(train={"learning_rate": spec.learning_rate}), note


def learning_rate_warning(method: MethodSpec, rate: float) -> str | None:
    """One line when the learning rate lies outside the method's usual range."""
    low, high = method.learning_rate_range
    if low <= rate <= high:
        return None
    direction = "above" if rate > high else "below"
    return (
        f"Warning: learning rate {rate:g} is {direction} the usual range for {method.title} ({low:g} to {high:g}; "
        f"default {method.learning_rate:g}); "
        + ("the loss may diverge." if rate > high else "training may barely move the model.")
    )


def epochs_and_cadence(method: MethodSpec, train: Any, examples: int, batches_per_epoch: int, *, has_valid: bool, notes: list[str]) -> dict:
    """The step count from ``train.epochs``; for ``auto``, enough passes for the method to see its usual
    number of examples (1 to 5), validating about ten times and stopping early when a validation set
    exists. Returns the ``train`` changes; appends what it chose to ``notes``."""
    epochs, changes = train.epochs, {}
    if epochs == "auto":
        epochs = min(MAX_AUTO_EPOCHS, max(1, math.ceil(method.examples_to_see / max(examples, 1))))
        note = f"--epochs auto: {epochs} epoch{'s' if epochs > 1 else ''} over {examples} examples for {method.title}"
        changes["epochs"] = float(epochs)
        if has_valid:
            steps = math.ceil(epochs * batches_per_epoch / train.grad_accumulation)
            every = max(1, steps // AUTO_VALIDATIONS)
            patience = train.early_stopping_patience or AUTO_PATIENCE
            changes |= {"eval_every": every, "early_stopping_patience": patience}
            cadence = "every step" if every == 1 else f"every {every} steps"
            note += f", validating {cadence} and stopping after {patience} without improvement"
        notes.append(note + ".")
    return changes | {"iters": max(1, math.ceil(epochs * batches_per_epoch / train.grad_accumulation))}


def data_notes(splits: Splits, objective: Objective) -> list[str]:
    """What the user should know about the data before training: cut, dropped, no validation, overlap."""
    items = objective.data.name
    notes = list(splits.notes)
    for name in ("train", "valid"):
        truncated, dropped = splits.truncated.get(name, 0), splits.dropped.get(name, 0)
        if truncated or dropped:
            notes.append(
                f"{name}: {truncated} {items} cut to data.max_seq_length, {dropped} dropped with no trained token left "
                "(`macft data check` shows which; raise data.max_seq_length to keep them)."
            )
    if not splits.valid:
        notes.append(
            "No validation data: the adapter is the last step's, not the best one; add valid.jsonl or set data.split_valid=0.1."
        )
    else:
        seen = {content(item) for item in splits.train}
        if shared := sum(content(item) in seen for item in splits.valid):
            notes.append(f"{shared} of {len(splits.valid)} validation {items} also appear in train, so validation loss flatters the model.")
    return notes
