"""KTO (Ethayarajh et al., 2024) on unpaired feedback: answers labelled desirable or undesirable.

With π, ρ an answer's summed log-probability under the policy and the reference, r = π − ρ its
log-ratio and z the policy's estimated KL divergence from the reference,

    desirable:    loss = λ_D · (1 − σ(β(r − z)))
    undesirable:  loss = λ_U · (1 − σ(β(z − r)))

averaged over the batch's examples (λ_D, λ_U: ``align.desirable_weight``, ``align.undesirable_weight``).
z = max(0, mean over the batch of π − ρ on mismatched pairs: each example's prompt followed by the
next example's completion), held constant in the gradient. It is computed once for the whole global
batch (``batch_context``), so lanes and ranks train exactly what one process does. The reference is
the base: the policy with its adapters switched off, or a frozen copy for full fine-tuning. Each
answer's implicit reward is βr; training reports the mean reward of desirable and undesirable
answers and their margin, which rises as the model learns the labels.

    loss = KTOLoss(recipe.align, chunk_size=512)
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from macft.data.batching import split_rows, take_rows
from macft.data.feedback import FEEDBACK
from macft.objectives.base import Metric, Objective
from macft.objectives.preference import reference_logps
from macft.objectives.sequences import sequence_logps, trained_positions
from macft.options import Option

STATS = ("tokens", "desirable_reward", "desirable", "undesirable_reward", "undesirable", "kl")


def half_rows(batch: Any, second: bool) -> Any:
    """A feedback batch's examples (first half of its rows) or their mismatched stand-ins (second half)."""
    half = batch.inputs.shape[0] // 2
    return take_rows(batch, list(range(half, 2 * half) if second else range(half)))


def kto_losses(settings: Any, log_ratio: mx.array, kl: mx.array, desirable: mx.array) -> mx.array:
    """Each example's loss from its log-ratio r, the KL estimate z and its label (1.0 desirable, 0.0 not)."""
    beta = settings.beta
    wanted = settings.desirable_weight * (1 - mx.sigmoid(beta * (log_ratio - kl)))
    unwanted = settings.undesirable_weight * (1 - mx.sigmoid(beta * (kl - log_ratio)))
    return desirable * wanted + (1 - desirable) * unwanted


class KTOLoss:
    """The loop's loss for feedback batches (see ``macft.objectives.base``)."""

    def __init__(self, settings: Any, chunk_size: int, reference: nn.Module | None = None):
        self.settings, self.chunk_size, self.reference = settings, chunk_size, reference

    def log_ratios(self, model: nn.Module, arrays: tuple, training: bool) -> tuple[mx.array, mx.array]:
        """(π − ρ per row, trained tokens per row)."""
        logps, tokens = sequence_logps(model, arrays, self.chunk_size, training=training)
        return logps - reference_logps(model, self.reference, arrays, self.chunk_size), tokens

    def batch_context(self, model: nn.Module, batch: Any) -> tuple[mx.array]:
        """z over the whole global batch's mismatched pairs."""
        stand_ins = half_rows(batch, second=True)
        ratios, _ = self.log_ratios(model, (stand_ins.inputs, *trained_positions(stand_ins.targets, stand_ins.loss_mask)), training=False)
        return (mx.stop_gradient(mx.maximum(ratios.mean(), 0.0)),)

    def prepare(self, batch: Any) -> tuple[mx.array, ...]:
        examples = half_rows(batch, second=False)
        return (examples.inputs, *trained_positions(examples.targets, examples.loss_mask), examples.labels)

    @staticmethod
    def split(batch: Any, parts: int) -> list:
        return split_rows(batch, parts)

    def __call__(self, model: nn.Module, *arrays: mx.array, training: bool = True) -> tuple[mx.array, ...]:
        *positions, desirable, kl = arrays
        log_ratio, tokens = self.log_ratios(model, tuple(positions), training)
        losses = kto_losses(self.settings, log_ratio, kl, desirable)
        counted = (tokens > 0).astype(mx.float32)  # a rank's stand-in row when a batch is smaller than the world counts for nothing
        reward = self.settings.beta * log_ratio
        wanted, unwanted = desirable * counted, (1 - desirable) * counted
        stats = (tokens.sum(), (reward * wanted).sum(), wanted.sum(), (reward * unwanted).sum(), unwanted.sum(), kl * counted.sum())
        return ((losses * counted).sum(), counted.sum(), *(mx.stop_gradient(s) for s in stats))

    def evaluate(self, model: nn.Module, *arrays: mx.array) -> tuple[mx.array, ...]:
        return self(model, *arrays, training=False)

    @staticmethod
    def metrics(stats: list[float], examples: float) -> dict[str, float]:
        total = dict(zip(STATS, stats))
        desirable = total["desirable_reward"] / total["desirable"] if total["desirable"] else 0.0
        undesirable = total["undesirable_reward"] / total["undesirable"] if total["undesirable"] else 0.0
        return {"desirable_reward": desirable, "undesirable_reward": undesirable, "reward_margin": desirable - undesirable, "kl": total["kl"] / examples}


OBJECTIVE = Objective(
    name="kto",
    title="KTO",
    when="your feedback is single answers marked good or bad (thumbs up/down), not pairs",
    options=(
        Option("beta", float, 0.1, "KTO: how strongly the policy is held near the reference", valid=lambda b: b > 0, must="positive"),
        Option("desirable_weight", float, 1.0, "KTO: λ_D, the weight of desirable answers", valid=lambda w: w > 0, must="positive"),
        Option("undesirable_weight", float, 1.0, "KTO: λ_U, the weight of undesirable answers", valid=lambda w: w > 0, must="positive"),
    ),
    data=FEEDBACK,
    loss=lambda c: KTOLoss(c.settings, c.chunk_size, c.reference),
    metrics=(
        Metric("reward_margin", "margin", "{:+.3f}"),
        Metric("desirable_reward", "reward good", "{:+.3f}"),
        Metric("undesirable_reward", "reward bad", "{:+.3f}"),
        Metric("kl", "kl", "{:.4f}"),
    ),
    # The stand-in rows are scored once per batch without gradients (batch_context), outside the step's peak.
    needs_reference=True,
    demo="greedy answers of the base and the tuned model to held-out prompts, scored against their desirable answers",
)
