"""The training loop: one ``train()`` around a compiled step, with validation, checkpoints and resume.

    result = train(model, optimizer, plan.batches.train, plan.batches.valid, loss_fn, plan.recipe.train, callback,
                   checkpoints=Checkpoints(run_dir, recipe, identity))

- ``train_batches(epoch, start)`` yields global batches from batch ``start`` of ``epoch`` on, running
  into later epochs; each batch carries its ``epoch`` and ``index``, which is the data position a
  checkpoint records. ``valid_batches()`` yields the validation batches (or is None).
- ``loss_fn`` is an objective's loss (``macft.objectives.base`` says what it provides): the loop
  gives each rank its share of every global batch (``World.share``), splits it into the step's
  lanes, prepares each part on the host and differentiates the loss of each.
- ``config`` is the settled ``TrainConfig`` (``macft.train.plan``): ``iters`` > 0 and ``lanes``, the
  streams each batch is split across and computed side by side (see ``Steps``).
- ``memory_budget(batch, length)`` (optional) caps the memory of each step (see ``Steps``).
- ``guard`` (optional, ``macft.train.guard.LossGuard``) stops a run whose loss turns NaN, climbs or
  collapses to a uniform guess (stop reason "nan" or "diverged"; no checkpoint of those weights is written).
- ``world`` (optional, ``macft.train.distributed.World``): the ranks of a data-parallel run; the step
  sums losses and counts and averages gradients over the ranks, so every rank applies the same update.
- ``callback`` gets ``on_train_report(dict)`` and ``on_valid_report(dict)``; the loop never prints.

The step is two compiled functions, ``grad_step`` (loss and gradients of one batch) and
``apply_step`` (normalise by the count of all accumulated batches, clip, update), each compiled
with ``inputs=state, outputs=state``. If tracing fails for some method the loop runs them
uncompiled and says so in the result. Dropout's random key is reseeded from (seed, step, rank)
before every step, so a resumed run draws the same masks as an uninterrupted one. Between steps,
OpenBLAS's thread count follows the cores other processes leave free (``macft.backend.BlasThreads``).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from typing import Any, Callable, Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from macft.backend import blas_threads_fitted
from macft.config import TrainConfig
from macft.models.attention import enable_block_attention
from macft.train.checkpoint import Checkpoints, Progress
from macft.train.distributed import World
from macft.train.guard import LossGuard


class Callback:
    """Receives the loop's reports; subclass and override what you need."""

    def on_train_report(self, info: dict) -> None:
        pass

    def on_valid_report(self, info: dict) -> None:
        pass

    def on_note(self, text: str) -> None:
        """Something the user should know (a fallback taken, a file written)."""


@dataclass
class TrainResult:
    progress: Progress
    stop_reason: str  # "finished", "early_stopping", "interrupted", or a failure: "nan", "diverged"
    message: str  # one sentence for the user about how the run ended
    compiled: bool
    compile_note: str  # why the step runs uncompiled, when it does
    lanes: int  # streams each batch was split across
    tokens_per_second: float  # trained tokens per second of step time, compile step excluded
    peak_memory: int  # bytes, mx.get_peak_memory() over this session
    last_train_loss: float | None
    last_val_loss: float | None
    signal: int = 0  # the signal that interrupted the run (SIGINT for Ctrl-C, SIGTERM for `kill`)

    @property
    def failed(self) -> bool:
        """The loss went bad: the final weights are not worth keeping."""
        return self.stop_reason in ("nan", "diverged")


class Steps:
    """The compiled (or plain) gradient and update functions for one model and optimizer.

    ``lanes`` streams compute the gradients of a batch's parts side by side (``one_step``): MLX runs an
    op on one core (BLAS aside), so on a CPU one stream per core keeps every core busy through the
    elementwise work. The first lane is the default stream; MLX compiles the step once per stream.

    ``memory_budget(batch, length)``, when given, is the memory a batch of that shape may use
    (``macft.memory.step_budget``); each gradient step holds MLX's memory limit there. MLX
    allocates the buffers of the work it schedules well ahead of computing it, and only waits
    when active memory is over the limit: without one, a step holds several times what its graph
    needs at once (every vocabulary slice of the loss, for instance)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer,
        loss_fn: Any,
        grad_clip: float,
        compile: bool,
        memory_budget: Callable[[int, int], int] | None = None,
        world: World = World(),
        lanes: int = 1,
    ):
        self.model, self.optimizer, self.world = model, optimizer, world
        self.memory_budget = memory_budget
        self.streams = [mx.default_stream(mx.default_device())] + [mx.new_stream(mx.default_device()) for _ in range(lanes - 1)]
        self.compiled = compile
        self.note = "" if compile else "train.compile is false"
        loss_and_grad = nn.value_and_grad(model, lambda *arrays: loss_fn(model, *arrays))
        max_norm = grad_clip if grad_clip > 0 else math.inf

        def grad_step(*arrays):
            (loss_sum, tokens, *stats), grads = loss_and_grad(*arrays)
            return loss_sum, tokens, grads, stats

        def apply_step(grads, loss_sum, tokens):
            # Sums over all ranks; average_gradients divided the gradient sum by the world size.
            loss_sum, tokens = world.all_sum(mx.stack([loss_sum, tokens]))
            grads = tree_map(lambda g: g / (tokens / world.size), world.average_gradients(grads))
            grads, norm = optim.clip_grad_norm(grads, max_norm)
            optimizer.update(model, grads)
            return loss_sum, tokens, norm

        self._plain = (grad_step, apply_step)
        state = [model.state, optimizer.state, mx.random.state]
        self._compiled = (mx.compile(grad_step, inputs=state, outputs=state), mx.compile(apply_step, inputs=state, outputs=state))
        self._tried = not compile

    def hold_memory(self, rows: int, length: int) -> None:
        """Set MLX's memory limit for a batch of ``rows`` (all lanes together) padded to ``length``."""
        if self.memory_budget is not None:
            mx.set_memory_limit(self.memory_budget(rows, length))

    def grads(self, lanes: list[tuple]) -> list[tuple[mx.array, mx.array, dict, list]]:
        """(loss sum, trained tokens, gradients, stats) of each lane's arrays, built on the lane's stream."""
        if not self.compiled:
            return on_lanes(self.streams, self._plain[0], lanes)
        if self._tried:
            return on_lanes(self.streams, self._compiled[0], lanes)
        # The first compiled call traces; a method whose forward cannot be traced falls back.
        params = self.model.parameters()
        try:
            out = on_lanes(self.streams, self._compiled[0], lanes)
            mx.eval(out)
            self._tried = True
            return out
        except Exception as exc:  # mx.compile raises ValueError/RuntimeError depending on the op
            self.model.update(params)
            self.compiled = False
            self.note = f"compilation failed ({str(exc).splitlines()[0][:120]}); running uncompiled"
            return on_lanes(self.streams, self._plain[0], lanes)

    def apply(self, grads: dict, loss_sum: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Update the model; returns (loss sum, trained tokens, gradient norm) over all ranks."""
        return (self._compiled[1] if self.compiled else self._plain[1])(grads, loss_sum, tokens)


@lru_cache(maxsize=None)
def _checkpointed_class(base: type) -> type:
    def __call__(self, x, *args, **kwargs):
        # Only the block input and its trainable weights go through the checkpoint; masks and
        # caches are closed over as constants (they need no gradient).
        def run(params, h):
            self.update(params)
            return base.__call__(self, h, *args, **kwargs)

        return mx.checkpoint(run)(self.trainable_parameters(), x)

    return type(f"Checkpointed{base.__name__}", (base,), {"__call__": __call__})


def is_checkpointed(layer: nn.Module) -> bool:
    return type(layer).__name__.startswith("Checkpointed")


def enable_grad_checkpoint(model: nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping them.
    Only these block instances change class; other models of the same architecture are untouched."""
    for layer in model.layers:
        if not is_checkpointed(layer):
            layer.__class__ = _checkpointed_class(type(layer))


@contextmanager
def kept_memory_limit() -> Iterator[None]:
    """Restore MLX's memory limit on the way out (the steps move it)."""
    previous = mx.get_memory_limit()
    try:
        yield
    finally:
        mx.set_memory_limit(previous)


@contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C (or SIGTERM, as sent by `kill` or a closing terminal) into a flag the
    loop checks between steps, so the checkpoint it then writes is consistent; a second one
    interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    pressed = []

    def handler(signum, frame):
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: pressed[0] if pressed else 0  # the signal, for the exit status
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def lane_arrays(loss_fn: Any, model: nn.Module, batch: Any, lanes: int, world: World) -> list[tuple]:
    """The prepared arrays of each lane's part of this rank's share of the global ``batch``, each
    followed by the objective's values of the whole batch (``batch_context``), if it has any."""
    context = tuple(loss_fn.batch_context(model, batch)) if hasattr(loss_fn, "batch_context") else ()
    mine = world.share(batch)
    parts = loss_fn.split(mine, lanes) if lanes > 1 else [mine]
    return [(*loss_fn.prepare(part), *context) for part in parts]


def on_lanes(streams: list, fn: Callable, lanes: list[tuple]) -> list:
    """``fn(*arrays)`` for each lane's arrays, built on the lane's stream (so MLX runs the lanes side by side)."""
    out = []
    for stream, arrays in zip(streams, lanes):
        with mx.stream(stream):
            out.append(fn(*arrays))
    return out


def one_step(steps: Steps, batches: Iterator, loss_fn: Any, accumulation: int) -> tuple[mx.array, mx.array, mx.array, Any, list]:
    """One optimizer step over ``accumulation`` batches: (loss sum, trained tokens, gradient norm, last
    batch, summed objective stats), the sums over all ranks. With several lanes each batch is split
    (``loss_fn.split``) and every part's gradients are computed on its own stream; the sums are the same
    up to float rounding."""
    loss_sum = tokens = grads = stats = None
    for _ in range(accumulation):
        batch = next(batches)
        lanes = lane_arrays(loss_fn, steps.model, batch, len(steps.streams), steps.world)
        steps.hold_memory(sum(arrays[0].shape[0] for arrays in lanes), lanes[0][0].shape[1])
        for micro_loss, micro_tokens, micro_grads, micro_stats in steps.grads(lanes):
            if grads is None:
                loss_sum, tokens, grads, stats = micro_loss, micro_tokens, micro_grads, micro_stats
            else:
                loss_sum, tokens = loss_sum + micro_loss, tokens + micro_tokens
                grads = tree_map(mx.add, grads, micro_grads)
                stats = [a + b for a, b in zip(stats, micro_stats)]
        mx.eval(loss_sum, tokens, grads, stats)  # keep one batch's graph alive at a time
    loss_sum, tokens, norm = steps.apply(grads, loss_sum, tokens)
    if stats and steps.world.size > 1:
        stats = list(steps.world.all_sum(mx.stack(stats)))
    mx.eval(loss_sum, tokens, norm, stats, steps.model.state, steps.optimizer.state)
    return loss_sum, tokens, norm, batch, stats


def objective_metrics(loss_fn: Any, stats: list[float], count: float) -> dict[str, float]:
    """An alignment objective's report values from its summed stats (none for SFT)."""
    return loss_fn.metrics(stats, count) if stats and count else {}


def evaluate(model: nn.Module, batches: Iterable, loss_fn: Any, max_batches: int = -1, world: World = World()) -> float:
    """Mean loss per trained token over ``batches`` (at most ``max_batches`` when positive), each
    rank holding its share of every batch."""
    return evaluate_with_metrics(model, batches, loss_fn, max_batches, world)[0]


def evaluate_with_metrics(
    model: nn.Module, batches: Iterable, loss_fn: Any, max_batches: int = -1, world: World = World(), streams: list | None = None
) -> tuple[float, dict]:
    """(mean loss, the objective's metrics) over ``batches``; with ``streams`` (a step's lanes) each
    batch is split across them as training splits it."""
    streams = streams or [mx.default_stream(mx.default_device())]
    total, tokens, stats = 0.0, 0.0, []
    for i, batch in enumerate(batches):
        if 0 < max_batches <= i:
            break
        lanes = on_lanes(streams, partial(loss_fn.evaluate, model), lane_arrays(loss_fn, model, batch, len(streams), world))
        mx.eval(lanes)
        for loss_sum, count, *batch_stats in lanes:
            total, tokens = total + loss_sum.item(), tokens + count.item()
            values = [s.item() for s in batch_stats]
            stats = [a + b for a, b in zip(stats, values)] if stats else values
    if world.size > 1:
        total, tokens, *stats = world.all_sum(mx.array([total, tokens, *stats])).tolist()
    return (total / tokens if tokens else math.nan), objective_metrics(loss_fn, stats, tokens)


def train(
    model: nn.Module,
    optimizer: optim.Optimizer,
    train_batches: Callable[[int, int], Iterator],
    valid_batches: Callable[[], Iterable] | None,
    loss_fn: Any,
    config: TrainConfig,
    callback: Callback | None = None,
    *,
    checkpoints: Checkpoints | None = None,
    progress: Progress | None = None,
    batches_per_epoch: int | None = None,
    memory_budget: Callable[[int, int], int] | None = None,
    world: World = World(),
    guard: LossGuard | None = None,
) -> TrainResult:
    callback = callback or Callback()
    progress = progress or Progress()
    guard = guard or LossGuard()
    if config.grad_checkpoint:
        enable_grad_checkpoint(model)
    if config.attention_block > 0:
        enable_block_attention(model, config.attention_block)
    optimizer.init(model.trainable_parameters())
    model.train()
    lanes = max(1, config.lanes)
    steps = Steps(model, optimizer, loss_fn, config.grad_clip, config.compile, memory_budget, world, lanes)
    batches = train_batches(progress.epoch, progress.index)
    mx.reset_peak_memory()

    started = time.perf_counter()
    step_seconds, session_steps = 0.0, 0
    steady_seconds, steady_tokens = 0.0, 0
    window = {"loss": 0.0, "count": 0.0, "tokens": 0, "seconds": 0.0, "stats": []}
    last_loss = last_val = None
    stop_reason, message = "finished", ""
    in_step, updates = False, 0

    def save(kind: str) -> None:
        if checkpoints is not None:
            checkpoints.save(kind, model, optimizer if kind == "last" else None, progress)

    with deferred_interrupt() as interrupted, kept_memory_limit(), blas_threads_fitted(lanes) as blas:
        try:
            while progress.step < config.iters:
                blas.adjust()
                updates = optimizer.step.item()
                in_step = True
                tick = time.perf_counter()
                mx.random.seed((config.seed * 1_000_003 + progress.step) * world.size + world.rank)
                loss_sum, tokens, norm, batch, stats = one_step(steps, batches, loss_fn, config.grad_accumulation)
                loss = loss_sum.item() / tokens.item()
                if stop := guard.check(progress.step + 1, loss, norm.item()):
                    stop_reason = "nan" if stop.nonfinite else "diverged"
                    message = stop.advice or failure_message(progress.step + 1, stop.problem, checkpoints)
                    break
                seconds = time.perf_counter() - tick
                # An objective normalised by pairs or completions reports its trained tokens first.
                count = int(stats[0].item()) if stats else int(tokens.item())
                progress.step += 1
                progress.tokens += count
                progress.epoch, progress.index = batch.epoch, batch.index + 1
                in_step = False
                step_seconds += seconds
                session_steps += 1
                if session_steps > 1:  # the first step of a session compiles; keep it out of the throughput
                    steady_seconds += seconds
                    steady_tokens += count
                last_loss = loss
                window["loss"] += loss_sum.item()
                window["count"] += tokens.item()
                window["tokens"] += count
                window["seconds"] += seconds
                values = [s.item() for s in stats]
                window["stats"] = [a + b for a, b in zip(window["stats"], values)] if window["stats"] else values

                step = progress.step
                if step % config.report_every == 0 or step == config.iters:
                    epoch = batch.epoch + (batch.index + 1) / batches_per_epoch if batches_per_epoch else batch.epoch
                    callback.on_train_report(
                        {
                            "step": step,
                            "iters": config.iters,
                            "epoch": epoch,
                            "train_loss": window["loss"] / max(window["count"], 1),
                            "learning_rate": optimizer.learning_rate.item(),
                            "grad_norm": norm.item(),
                            "tokens_per_second": window["tokens"] / max(window["seconds"], 1e-9),
                            "ranks": world.size,
                            "tokens": progress.tokens,
                            "elapsed": progress.elapsed + time.perf_counter() - started,
                            "eta": (config.iters - step) * step_seconds / session_steps,
                            "peak_memory": mx.get_peak_memory(),
                            **objective_metrics(loss_fn, window["stats"], window["count"]),
                        }
                    )
                    window = {"loss": 0.0, "count": 0.0, "tokens": 0, "seconds": 0.0, "stats": []}

                validate_now = config.eval_every > 0 and step % config.eval_every == 0
                if valid_batches is not None and (validate_now or step == config.iters):
                    model.eval()
                    last_val, val_metrics = evaluate_with_metrics(
                        model, valid_batches(), loss_fn, config.eval_batches, world, steps.streams
                    )
                    model.train()
                    if not math.isfinite(last_val):
                        stop_reason = "nan"
                        message = failure_message(step, "the validation loss became NaN/inf", checkpoints)
                        break
                    improved = progress.best_val_loss is None or last_val < progress.best_val_loss
                    if improved:
                        progress.best_val_loss, progress.best_step, progress.evals_since_best = last_val, step, 0
                        save("best")
                    else:
                        progress.evals_since_best += 1
                    callback.on_valid_report(
                        {
                            "step": step,
                            "val_loss": last_val,
                            "best_val_loss": progress.best_val_loss,
                            "improved": improved,
                            **{f"val_{k}": v for k, v in val_metrics.items()},
                        }
                    )
                    patience = config.early_stopping_patience
                    if patience > 0 and progress.evals_since_best >= patience:
                        stop_reason = "early_stopping"
                        message = (
                            f"Stopped early at step {step}: validation loss has not improved for {patience} "
                            f"evaluations (best {progress.best_val_loss:.4f} at step {progress.best_step})."
                        )
                        break

                if config.save_every > 0 and step % config.save_every == 0:
                    save("last")
                if world.any(interrupted()):
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            stop_reason = "interrupted"
            # A step changes the weights and the optimizer only in its update, which also counts the update.
            if in_step and optimizer.step.item() != updates:
                kept = checkpoints is not None and checkpoints.path("last").is_dir()
                saved = "the last saved checkpoint is kept" if kept else "no checkpoint had been saved yet, so there is nothing to resume"
                message = f"Interrupted in the middle of step {progress.step + 1}; {saved}."
            else:
                progress.elapsed += time.perf_counter() - started
                save("last")
                message = f"Interrupted after step {progress.step}; saved a checkpoint to resume from."
            result = _result(progress, stop_reason, message, steps, steady_seconds, steady_tokens, last_loss, last_val)
            return replace(result, signal=interrupted() or signal.SIGINT)

    progress.elapsed += time.perf_counter() - started
    if stop_reason not in ("nan", "diverged"):
        save("last")
    if stop_reason == "finished":
        message = f"Finished {progress.step} steps."
    return _result(progress, stop_reason, message, steps, steady_seconds, steady_tokens, last_loss, last_val)


def failure_message(step: int, problem: str, checkpoints: Checkpoints | None) -> str:
    """One sentence for a run stopped by bad numbers, naming the checkpoint that holds good weights."""
    kept = next((checkpoints.path(k) for k in ("best", "last") if checkpoints and checkpoints.path(k).is_dir()), None)
    where = f"the last good checkpoint is {kept}" if kept else "no checkpoint had been saved yet"
    return f"Training stopped at step {step}: {problem}; {where}. Lower train.learning_rate or check the data."


def _result(progress, stop_reason, message, steps, seconds, tokens, last_loss, last_val) -> TrainResult:
    """``seconds`` and ``tokens`` cover the steps after each session's first (compiling) one."""
    return TrainResult(
        progress=progress,
        stop_reason=stop_reason,
        message=message,
        compiled=steps.compiled,
        compile_note=steps.note,
        lanes=len(steps.streams),
        tokens_per_second=tokens / seconds if seconds else 0.0,
        peak_memory=mx.get_peak_memory(),
        last_train_loss=last_loss,
        last_val_loss=last_val,
    )
