"""A whole fine-tuning run, from a resolved recipe to a run directory.

    outcome = run_training(recipe, view)          # view: a macft.train.loop.Callback (e.g. macft.ui.TrainingView)
    demo = run_demo(outcome)                      # base vs tuned answers on held-out prompts

The run directory (``runs/<name>/``) receives ``recipe.yaml``, ``metrics.jsonl``, ``checkpoints/``
(``last`` for exact resume, ``best`` by validation loss), ``adapters.safetensors`` and
``adapter_config.json`` (the best checkpoint, or the last when there was no validation),
``summary.json`` and ``loss.png``. Resuming (``recipe.output.resume``) continues the same folder.
Started by ``mlx.launch``, every rank runs this with its share of each batch and only rank 0
writes the run directory (``macft.train.distributed``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from macft import __version__
from macft.backend import detect
from macft.config import Recipe, save_recipe
from macft.errors import DiskFullError, MacftError
from macft.memory import Estimate, estimate, format_bytes, loaded_shape, plan_from_recipe, step_budget
from macft.methods import ADAPTER_FILE, apply_method, count_parameters, save_adapter
from macft.models.quantized import dequantize_for_generation, has_quantized_layers
from macft.models.tokenizer_cache import LazyTokenizer
from macft.methods.recompute import RecomputingMLP
from macft.outputs import check_run_name
from macft.paths import atomic_path, recover
from macft.plot import loss_curve_png
from macft.train.checkpoint import Checkpoints, check_checkpoint
from macft.train.distributed import World, check_same, connect, examples_digest, peer_errors, recipe_digest, share_state
from macft.train.guard import LossGuard
from macft.train.loop import Callback, TrainResult, step_lanes, train
from macft.train.losses import ChunkedLoss, auto_chunk_size, describe_loss, vocab_size
from macft.train.method_fit import choose_epochs, learning_rate_warning, with_method_learning_rate
from macft.train.rundir import claim_run_dir
from macft.train.schedule import build_schedule
from macft.train.summary import RunSummary


@dataclass
class RunOutcome:
    run_dir: Path | None  # None on ranks other than 0, which write nothing
    recipe: Recipe
    result: TrainResult
    summary: RunSummary
    model: nn.Module  # the tuned model (best checkpoint loaded), ready for the demo
    lazy_tokenizer: LazyTokenizer
    notes: list[str] = field(default_factory=list)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded on first use (a run on cached tokens may never need it)."""
        return self.lazy_tokenizer.get()


@dataclass
class DemoResult:
    examples: list[dict]  # {"prompt", "expected", "base", "tuned"} for the first demo.count prompts
    total: int  # held-out examples scored
    base_exact: float  # exact-match rate of the base model
    tuned_exact: float


def run_dir_for(recipe: Recipe) -> Path:
    """The run folder: the resumed one, or ``<runs_dir>/<name or recipe-timestamp>``."""
    if recipe.output.resume:
        folder = Path(recipe.output.resume).expanduser()
        recover(folder / "checkpoints" / "last")  # a save killed between its two renames left it aside
        if not (folder / "checkpoints" / "last").is_dir():
            raise MacftError(f"Cannot resume: {folder} has no checkpoints/last; pass a run directory made by `macft lora`.")
        check_checkpoint(folder / "checkpoints" / "last")  # a damaged file is found before the model loads
        return folder
    name = check_run_name(recipe.output.name) if recipe.output.name else f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(recipe.output.runs_dir).expanduser() / name


def make_optimizer(recipe: Recipe, total_steps: int) -> optim.Optimizer:
    cfg = recipe.train
    schedule = build_schedule(cfg, total_steps)
    if cfg.optimizer == "adamw":
        return optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return optim.Adam(learning_rate=schedule)
    return optim.SGD(learning_rate=schedule, weight_decay=cfg.weight_decay)


class MetricsLog(Callback):
    """Appends every report to ``metrics.jsonl`` and passes it on to the view."""

    def __init__(self, path: Path, view: Callback, resume_step: int):
        self.path, self.view = path, view
        if path.exists():
            # Reports written after the checkpoint we resume from are about to be redone (a process
            # killed mid-append may also have left half a line).
            kept = [line for line in path.read_text().splitlines() if (row := _parsed(line)) and row.get("step", 0) <= resume_step]
            with atomic_path(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))

    def _write(self, kind: str, info: dict) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps({"kind": kind, **info}) + "\n")

    def on_train_report(self, info: dict) -> None:
        self._write("train", info)
        self.view.on_train_report(info)

    def on_valid_report(self, info: dict) -> None:
        self._write("valid", info)
        self.view.on_valid_report(info)

    def on_note(self, text: str) -> None:
        self.view.on_note(text)


def _parsed(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def load_base(recipe: Recipe):
    """The recipe's base model (``macft.models.load.LoadedModel``), quantized for QLoRA if asked."""
    from macft.models.load import load_model

    return load_model(
        recipe.model.path,
        revision=recipe.model.revision,
        quantize_bits=recipe.model.quantize_bits,
        group_size=recipe.model.quantize_group_size,
        dequantize=recipe.model.dequantize,
        trust_remote_code=recipe.model.trust_remote_code,
    )


def batching_options(recipe: Recipe) -> dict[str, Any]:
    """How a run groups its examples into batches (``macft.data.iterate_batches`` keywords)."""
    return {"packing": recipe.data.packing, "bucket_by_length": recipe.data.bucket_by_length, "seed": recipe.train.seed}


def training_loss(model: nn.Module, recipe: Recipe, tokenizer: Any = None, reference: nn.Module | None = None):
    """The loss a run trains and validates ``model`` with: SFT's chunked loss or an alignment
    objective's (``macft.align``; ``reference`` is the frozen copy full fine-tuning needs)."""
    chunk_size = auto_chunk_size(vocab_size(model), recipe.train.loss_chunk_size)
    if recipe.train.objective == "sft":
        return ChunkedLoss(chunk_size)
    from macft.align import alignment_loss

    return alignment_loss(recipe, model, tokenizer, chunk_size, reference)


def run_training(
    recipe: Recipe, view: Callback | None = None, world: World | None = None, *, allow_changed_inputs: bool = False
) -> RunOutcome:
    """Train in the recipe's run directory, which rank 0 holds exclusively until training ends.
    A resume refuses a base model or data that changed since the checkpoint unless ``allow_changed_inputs``."""
    from macft.data.splits import data_files

    if not recipe.data.train:
        raise MacftError(
            f"Recipe '{recipe.name}' needs training data: pass --data PATH (a .jsonl file or a folder with train.jsonl); "
            f"`macft recipes show {recipe.name}` says what data it expects."
        )
    data_files(recipe.data)  # a missing data file is reported before the model loads
    world = world or connect()
    if not world.main:
        return _train_in(None, recipe, Callback(), world, allow_changed_inputs)
    run_dir = run_dir_for(recipe)
    with claim_run_dir(run_dir, resume=bool(recipe.output.resume)):
        try:
            return _train_in(run_dir, recipe, view or Callback(), world, allow_changed_inputs)
        except DiskFullError as exc:
            if not (run_dir / "checkpoints" / "last").is_dir():
                raise
            raise DiskFullError(f"{exc} Then continue with: macft lora --resume {run_dir}") from None


def _train_in(run_dir: Path | None, recipe: Recipe, view: Callback, world: World, allow_changed_inputs: bool) -> RunOutcome:
    """``run_dir`` and ``view`` are rank 0's; other ranks pass None and a silent Callback."""
    from macft.data import batch_order, iterate_batches, load_splits
    from macft.data.splits import data_fingerprint

    recipe, lr_note = with_method_learning_rate(recipe)
    # A resumed run was warned when it started.
    for line in (lr_note, None if recipe.output.resume else learning_rate_warning(recipe)):
        if line:
            view.on_note(line)
    cfg = recipe.train
    if cfg.batch_size < world.size:
        raise MacftError(f"train.batch_size {cfg.batch_size} is the global batch and must be at least the {world.size} ranks.")
    mx.random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    loaded = load_base(recipe)
    aligning = cfg.objective != "sft"
    if aligning:
        from macft.align import alignment_batches, load_alignment_splits, needs_reference_copy, reference_note
        from macft.data.preference import identical_pairs_note

        if world.size > 1:
            raise MacftError(f"train.objective {cfg.objective} runs on one process; distributed training covers sft.")
        splits = load_alignment_splits(recipe, loaded.tokenizer)
        if note := identical_pairs_note(splits.identical, splits.total, cfg.objective):
            view.on_note(note)
    else:
        # The lazy tokenizer: on data it has tokenized before, the run needs none before its first step.
        splits = load_splits(recipe.data, loaded.lazy_tokenizer)
        for note in data_notes(splits):
            view.on_note(note)
        facts = {"macft version": __version__, "MLX version": mx.__version__, "recipe": recipe_digest(recipe)}
        facts |= {"data": examples_digest(splits.train, splits.valid), "base model": loaded.identity.get("sha256", "")}
        with peer_errors(world, "Training had not started."):
            check_same(world, facts)
    # One shape and plan serve the fit check and, per batch shape, each step's memory limit.
    shape, plan = loaded_shape(loaded), dataclasses.replace(plan_from_recipe(recipe), ranks=world.size)
    check_memory(estimate(shape, plan), view)
    # Only method.init_text needs the tokenizer (soft prompts start from its tokens).
    model = apply_method(loaded.model, recipe.method, loaded.tokenizer if recipe.method.init_text else None)
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise MacftError(f"Method '{recipe.method.name}' left nothing to train; check method.num_layers and method.target_modules.")

    batching = batching_options(recipe)
    max_len = recipe.data.max_seq_length

    def train_batches(epoch: int, start: int):
        return map(world.share, iterate_batches(splits.train, cfg.batch_size, max_len, epoch=epoch, start=start, loop=True, **batching))

    def valid_batches():
        return map(world.share, iterate_batches(splits.valid, cfg.batch_size, max_len, **batching))

    if aligning:
        per_epoch, train_batches, valid_batches = alignment_batches(recipe, splits)
    else:
        per_epoch = len(batch_order(splits.train, cfg.batch_size, max_len, **batching))
    if not cfg.iters:
        recipe, epochs_note = choose_epochs(recipe, len(splits.train), per_epoch, has_valid=bool(splits.valid))
        if epochs_note:
            view.on_note(epochs_note)
        cfg = recipe.train
    iters = cfg.iters or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accumulation))
    recipe = recipe.replace(train={"iters": iters})
    optimizer = make_optimizer(recipe, iters)
    reference = None
    if aligning:
        view.on_note(reference_note(recipe) or f"Objective {cfg.objective}: reference-free.")
        if needs_reference_copy(recipe):
            reference = load_base(recipe).model
            reference.freeze()
            reference.eval()
    loss_fn = training_loss(model, recipe, loaded.tokenizer if aligning else None, reference)
    # The run's recipe records its lanes, so a resume (on any machine) splits its batches the same way.
    recipe = recipe.replace(train={"lanes": step_lanes(cfg.lanes, cfg.batch_size, loss_fn, model)})

    checkpoints = Checkpoints(run_dir, recipe, loaded.identity, data_fingerprint(recipe.data)) if world.main else None
    progress = None
    if recipe.output.resume and checkpoints:
        check_resume_inputs(checkpoints, run_dir, allow_changed_inputs, view)
        progress = checkpoints.restore(model, optimizer)
    with peer_errors(world, "Training had not started."):
        progress = share_state(world, model, optimizer, progress)
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
        log = MetricsLog(run_dir / "metrics.jsonl", view, progress.step if progress else 0)
    else:
        log = view

    kept = "Rank 0 keeps the last complete checkpoint."
    if checkpoints:
        kept = f"The last complete checkpoint is {checkpoints.path('last')}; resume with: macft lora --resume {run_dir}"
    result = peer_errors(world, kept, cfg.step_timeout)(train)(
        model,
        optimizer,
        train_batches,
        valid_batches if splits.valid else None,
        loss_fn,
        recipe.train,
        log,
        checkpoints=checkpoints,
        progress=progress,
        batches_per_epoch=per_epoch,
        memory_budget=None if aligning else step_budget(shape, plan),
        world=world,
        guard=LossGuard(vocab_size(model), cfg.learning_rate, recipe.method.name),
    )
    if not world.main:
        return RunOutcome(None, recipe, result, {}, model, loaded.lazy_tokenizer)

    notes = []
    best, last = checkpoints.path("best") / ADAPTER_FILE, checkpoints.path("last") / ADAPTER_FILE
    # The run's adapter: the best by validation loss; after a NaN or divergence, the last good checkpoint.
    source = best if best.exists() else last if result.failed and last.exists() else None
    if source is not None:
        model.load_weights(str(source), strict=False)
        notes.append(f"{run_dir / ADAPTER_FILE} holds the {source.parent.name} checkpoint.")
    if source is not None or not result.failed:
        save_adapter(model, run_dir, recipe, loaded.identity)
    else:
        notes.append("No adapter was saved: training failed before the first checkpoint.")
    model.eval()

    summary = RunSummary(
        run_dir=str(run_dir),
        method=recipe.method.name,
        model=loaded.identity,
        stop_reason=result.stop_reason,
        message=result.message,
        steps=result.progress.step,
        iters=iters,
        best_val_loss=result.progress.best_val_loss,
        best_step=result.progress.best_step,
        final_train_loss=result.last_train_loss,
        final_val_loss=result.last_val_loss,
        tokens_seen=result.progress.tokens,
        tokens_per_second=result.tokens_per_second,
        ranks=world.size,
        distributed_backend=world.backend,
        peak_memory_bytes=result.peak_memory,
        train_seconds=result.progress.elapsed,
        trainable_parameters=trainable,
        total_parameters=total,
        backend=detect().describe(),
        fast_paths=fast_paths(model, result, loss_fn.chunk_size),
        compiled=result.compiled,
        compile_note=result.compile_note,
        objective=cfg.objective,
        reference=reference_note(recipe) if aligning else None,
    )
    with atomic_path(run_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary.to_dict(), indent=2))
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    return RunOutcome(run_dir, recipe, result, summary, model, loaded.lazy_tokenizer, notes)


def check_resume_inputs(checkpoints: Checkpoints, run_dir: Path, allow: bool, view: Callback) -> None:
    """A resume continues the same run only on the same base weights and data."""
    changed = " and ".join(checkpoints.changed_inputs())
    if not changed:
        return
    if not allow:
        raise MacftError(
            f"Cannot resume {run_dir}: {changed} changed since its last checkpoint, so it would not continue the same run; "
            "restore them, start a new run, or pass --allow-changed-inputs to continue anyway."
        )
    view.on_note(f"Resuming although {changed} changed since the last checkpoint (--allow-changed-inputs).")


def data_notes(splits) -> list[str]:
    """What the user should know about the examples before training: cut, dropped, no validation, overlap."""
    from macft.data.splits import overlap_count

    notes = []
    for name in ("train", "valid"):
        truncated, dropped = splits.truncated.get(name, 0), splits.dropped.get(name, 0)
        if truncated or dropped:
            notes.append(
                f"{name}: {truncated} examples cut to data.max_seq_length, {dropped} dropped with no trained token left "
                "(`macft data check` shows which; raise data.max_seq_length to keep them)."
            )
    if not splits.valid:
        notes.append(
            "No validation data: the adapter is the last step's, not the best one; add valid.jsonl or set data.split_valid=0.1."
        )
    elif shared := overlap_count(splits.train, splits.valid):
        notes.append(f"{shared} of {len(splits.valid)} validation examples also appear in train, so validation loss flatters the model.")
    return notes


def check_memory(est: Estimate, view: Callback) -> None:
    """Stop before training when the memory planner predicts the run cannot fit."""
    if not est.fits:
        hint = est.suggestions[0] if est.suggestions else "use a smaller batch, sequence length or model"
        raise MacftError(
            f"This run needs about {format_bytes(est.total_bytes)} but {format_bytes(est.available_bytes)} is available; {hint} "
            "(see `macft estimate`)."
        )
    view.on_note(f"Predicted peak memory {format_bytes(est.total_bytes)} of {format_bytes(est.available_bytes)} available.")


def fast_paths(model: nn.Module, result: TrainResult, chunk_size: int) -> list[str]:
    """The performance choices this run made, for the summary."""
    backend = detect()
    paths = [f"{backend.compute_dtype} compute", f"BLAS {backend.blas}"]
    paths.append("compiled step" if result.compiled else f"uncompiled step ({result.compile_note})")
    paths.append(describe_loss(model, chunk_size))
    paths.append("memory limit held a quarter above each step's predicted peak")
    recomputed = sum(isinstance(m, RecomputingMLP) for _, m in model.named_modules())
    if recomputed:
        paths.append(f"gated MLP activation recomputed in the backward pass ({recomputed} layers)")
    if result.lanes > 1:
        paths.append(f"each batch split across {result.lanes} lanes computed side by side")
    if has_quantized_layers(model):
        paths.append("quantized base: dequantize + matmul" if backend.dequantize_for_matmul else "quantized base: quantized_matmul")
    return paths


def loss_history(metrics: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The (step, loss) reports of ``metrics.jsonl``: train, then validation."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
    train = [(r["step"], r["train_loss"]) for r in rows if r["kind"] == "train"]
    valid = [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "valid"]
    return train, valid


def plot_losses(metrics: Path, out: Path) -> None:
    """Write the loss curve of ``metrics.jsonl`` to ``out`` (a PNG)."""
    with atomic_path(out) as tmp:
        tmp.write_bytes(loss_curve_png(*loss_history(metrics)))


def demo_records(recipe: Recipe) -> list:
    """The held-out prompt/completion records the demo answers (demo.prompts, else the test split)."""
    from macft.data import read_records
    from macft.data.splits import data_files

    path = Path(recipe.demo.prompts).expanduser() if recipe.demo.prompts else data_files(recipe.data).get("test")
    if path is None:
        return []
    if not path.is_file():
        raise MacftError(f"demo.prompts file {path} does not exist.")
    if recipe.train.objective != "sft" and not recipe.demo.prompts:
        from macft.align import demo_records as alignment_demo_records

        return alignment_demo_records(recipe, path)
    return [r for r in read_records(path) if r.kind == "completion"]


def run_demo(outcome: RunOutcome) -> DemoResult | None:
    """Greedy answers of the base and the tuned model on the held-out prompts, with exact match,
    scored by ``macft.evaluate`` exactly as ``macft eval`` scores them."""
    from macft.evaluate import EvalOptions, evaluate

    recipe = outcome.recipe
    records = demo_records(recipe)
    if not records or recipe.demo.count <= 0:
        return None
    options = EvalOptions(max_tokens=recipe.demo.max_tokens, use_chat_template=recipe.data.use_chat_template, max_seq_length=recipe.data.max_seq_length)
    model, tokenizer = dequantize_for_generation(outcome.model), outcome.tokenizer
    if any(getattr(m, "enabled", None) is not None for _, m in model.named_modules()):
        result = evaluate(model, tokenizer, records, options, tuned=True)
        base, tuned = result, result
    else:  # full fine-tuning changed the weights themselves: the base has to be loaded again
        tuned = evaluate(model, tokenizer, records, options)
        base = evaluate(dequantize_for_generation(load_base(recipe).model), tokenizer, records, options)
    base_column, tuned_column = ("base", "tuned") if base is tuned else ("base", "base")
    examples = [
        {"prompt": row["prompt"], "expected": row["reference"], "base": row[f"{base_column}_output"], "tuned": tuned_row[f"{tuned_column}_output"]}
        for row, tuned_row in list(zip(base.rows, tuned.rows))[: recipe.demo.count]
    ]
    total = base.scores["base"].generated
    return DemoResult(examples, total, base.scores[base_column].exact_match, tuned.scores[tuned_column].exact_match)
