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

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.nn as nn

from macft.adapters.files import ADAPTER_FILE, save_adapter
from macft.backend import detect
from macft.config import Recipe, save_recipe
from macft.data.splits import data_files, data_fingerprint
from macft.errors import DiskFullError, MacftError
from macft.methods import count_parameters
from macft.methods.recompute import RecomputingMLP
from macft.models.attention import block_rows
from macft.models.head import describe_loss
from macft.models.quantized import dequantize_for_generation, has_quantized_layers
from macft.models.tokenizer_cache import LazyTokenizer
from macft.objectives import objective_named
from macft.outputs import check_run_name
from macft.paths import atomic_path, recover
from macft.plot import loss_curve_png
from macft.train.checkpoint import Checkpoints, check_checkpoint
from macft.train.distributed import World, connect, peer_errors, share_state
from macft.train.guard import LossGuard
from macft.train.loop import Callback, TrainResult, is_checkpointed, train
from macft.train.plan import RunPlan, fit_budget, load_base, settle, training_file
from macft.train.rundir import claim_run_dir
from macft.train.summary import RunSummary


@dataclass
class RunOutcome:
    run_dir: Path | None  # None on ranks other than 0, which write nothing
    recipe: Recipe  # the settled recipe (what recipe.yaml records)
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


def run_training(
    recipe: Recipe, view: Callback | None = None, world: World | None = None, *, allow_changed_inputs: bool = False
) -> RunOutcome:
    """Train in the recipe's run directory, which rank 0 holds exclusively until training ends.
    A resume refuses a base model or data that changed since the checkpoint unless ``allow_changed_inputs``."""
    training_file(recipe)  # missing data, or another objective's, is reported before anything loads
    world = world or connect()
    fit_budget(recipe, world.size)  # a run that cannot fit is refused before its folder is made (settle chooses again)
    run_dir = run_dir_for(recipe) if world.main else None  # only rank 0 writes the run directory
    with claim_run_dir(run_dir, resume=bool(recipe.output.resume)) if run_dir else nullcontext():
        try:
            return _train_in(run_dir, recipe, view or Callback(), world, allow_changed_inputs)
        except DiskFullError as exc:
            if run_dir is None or not (run_dir / "checkpoints" / "last").is_dir():
                raise
            raise DiskFullError(f"{exc} Then continue with: macft lora --resume {run_dir}") from None


def _train_in(run_dir: Path | None, recipe: Recipe, view: Callback, world: World, allow_changed_inputs: bool) -> RunOutcome:
    """``run_dir`` is rank 0's; other ranks pass None (and a view that shows nothing)."""
    plan = settle(recipe, world)
    for note in plan.notes:
        view.on_note(note)
    recipe, cfg, loaded = plan.recipe, plan.recipe.train, plan.loaded
    checkpoints = Checkpoints(run_dir, recipe, loaded.identity, data_fingerprint(recipe.data)) if run_dir else None
    progress = None
    if recipe.output.resume and checkpoints:
        check_resume_inputs(checkpoints, run_dir, allow_changed_inputs, view)
        progress = checkpoints.restore(plan.model, plan.optimizer)
    with peer_errors(world, "Training had not started."):
        progress = share_state(world, plan.model, plan.optimizer, progress)
    log = view
    if run_dir:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
        log = MetricsLog(run_dir / "metrics.jsonl", view, progress.step if progress else 0)
    kept = f"The last complete checkpoint is {checkpoints.path('last')}; resume with: macft lora --resume {run_dir}" if checkpoints else "Rank 0 keeps the last complete checkpoint."
    result = peer_errors(world, kept, cfg.step_timeout)(train)(
        plan.model,
        plan.optimizer,
        plan.batches.train,
        plan.batches.valid,
        plan.loss,
        cfg,
        log,
        checkpoints=checkpoints,
        progress=progress,
        batches_per_epoch=plan.batches.per_epoch,
        memory_budget=plan.memory_budget,
        world=world,
        guard=LossGuard(plan.shape.vocab, cfg.learning_rate, recipe.method.name),
    )
    if not run_dir:
        return RunOutcome(None, recipe, result, {}, plan.model, loaded.lazy_tokenizer)
    return _finish(run_dir, plan, result, checkpoints, world)


def _finish(run_dir: Path, plan: RunPlan, result: TrainResult, checkpoints: Checkpoints, world: World) -> RunOutcome:
    """Keep the run's adapter (the best checkpoint by validation loss; after a NaN or divergence, the
    last good one) and write its summary and loss curve."""
    recipe, model, loaded, notes = plan.recipe, plan.model, plan.loaded, []
    best, last = checkpoints.path("best") / ADAPTER_FILE, checkpoints.path("last") / ADAPTER_FILE
    source = best if best.exists() else last if result.failed and last.exists() else None
    if source is not None:
        model.load_weights(str(source), strict=False)
        notes.append(f"{run_dir / ADAPTER_FILE} holds the {source.parent.name} checkpoint.")
    if source is not None or not result.failed:
        save_adapter(model, run_dir, recipe.method, loaded.identity, recipe.model.recorded)
    else:
        notes.append("No adapter was saved: training failed before the first checkpoint.")
    model.eval()
    trainable, total = count_parameters(model)

    summary = RunSummary(
        run_dir=str(run_dir),
        method=recipe.method.name,
        model=loaded.identity,
        stop_reason=result.stop_reason,
        message=result.message,
        steps=result.progress.step,
        iters=recipe.train.iters,
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
        fast_paths=fast_paths(model, result, plan.loss.chunk_size, plan.memory_budget is not None),
        compiled=result.compiled,
        compile_note=result.compile_note,
        objective=plan.objective.name,
        reference=plan.reference,
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


def fast_paths(model: nn.Module, result: TrainResult, chunk_size: int, memory_limit: bool) -> list[str]:
    """The performance choices this run made, for the summary."""
    backend = detect()
    paths = [f"{backend.compute_dtype} compute", f"BLAS {backend.blas}"]
    paths.append("compiled step" if result.compiled else f"uncompiled step ({result.compile_note})")
    paths.append(describe_loss(model, chunk_size))
    if memory_limit:
        paths.append("memory limit held a quarter above each step's predicted peak")
    if rows := block_rows(model):
        paths.append(f"attention in blocks of {rows} queries, recomputed in the backward pass")
    if any(is_checkpointed(layer) for layer in model.layers):
        paths.append("layer checkpointing: each layer recomputed in the backward pass")
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
    """The held-out prompt/completion records the demo answers: demo.prompts (prompt/completion lines),
    else the test split, read as the objective's data."""
    from macft.data.examples import EXAMPLES

    path = Path(recipe.demo.prompts).expanduser() if recipe.demo.prompts else data_files(recipe.data).get("test")
    if path is None:
        return []
    if not path.is_file():
        raise MacftError(f"demo.prompts file {path} does not exist.")
    shape = EXAMPLES if recipe.demo.prompts else objective_named(recipe.train.objective).data
    return shape.demo_records(path)


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
