"""What the preference objectives (DPO/IPO, ORPO, SimPO) share: scoring both answers of a pair in one
batch and turning a per-pair formula into the loop's loss.

With πc, πr the policy's summed log-probabilities of the chosen and rejected answers, ρc, ρr the
reference's and |c|, |r| their trained tokens, each objective's module defines its formula
``pair_losses(settings, πc, πr, |c|, |r|, ρc, ρr) -> (loss, chosen reward, rejected reward)`` per
pair. The rewards' margin and the share of pairs whose chosen reward is higher (ties count half,
so an untrained policy scores 0.5) are what training reports. A pair batch's first half of rows are
the chosen answers, its second half the rejected ones (``macft.data.pairs``); a pair with no
trained token (a rank's stand-in when a batch has fewer pairs than ranks) counts for nothing.

    loss = PreferenceLoss(dpo_losses, settings, chunk_size=512, reference=None, uses_reference=True)
    loss_sum, pairs, *stats = loss(model, *loss.prepare(batch))
"""

from __future__ import annotations

from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from macft.data.batching import split_rows
from macft.methods import adapters_disabled
from macft.objectives.base import Metric
from macft.objectives.sequences import log_sigmoid, sequence_logps, trained_positions

# Summed per batch, in this order; the first is the trained tokens the loop counts for throughput.
STATS = ("tokens", "chosen_reward", "rejected_reward", "correct", "chosen_logps", "rejected_logps")
METRICS = (
    Metric("accuracy", "pref acc", "{:.0%}"),
    Metric("reward_margin", "margin", "{:+.3f}"),
    Metric("chosen_logps", "logp chosen", "{:.1f}"),
    Metric("rejected_logps", "logp rejected", "{:.1f}"),
)
PairLosses = Callable[..., tuple[mx.array, mx.array, mx.array]]


def reference_logps(model: nn.Module, reference: nn.Module | None, arrays: tuple, chunk_size: int) -> mx.array:
    """Each row's summed log-probability under the reference: the loaded copy, or the policy with
    its adapters switched off (no second copy of the weights)."""
    if reference is not None:
        logps, _ = sequence_logps(reference, arrays, chunk_size, training=False)
    else:
        with adapters_disabled(model):
            logps, _ = sequence_logps(model, arrays, chunk_size, training=False)
    return mx.stop_gradient(logps)


class PreferenceLoss:
    """The loop's loss for pair batches (see ``macft.objectives.base``)."""

    def __init__(self, pair_losses: PairLosses, settings: Any, chunk_size: int, reference: nn.Module | None = None, uses_reference: bool = False):
        self.pair_losses, self.settings, self.chunk_size = pair_losses, settings, chunk_size
        self.reference, self.uses_reference = reference, uses_reference

    def prepare(self, batch: Any) -> tuple[mx.array, ...]:
        select, targets, weights, rows = trained_positions(batch.targets, batch.loss_mask)
        return batch.inputs, select, targets, weights, rows

    @staticmethod
    def split(batch: Any, parts: int) -> list:
        return split_rows(batch, parts)

    def __call__(self, model: nn.Module, *arrays: mx.array, training: bool = True) -> tuple[mx.array, ...]:
        logps, tokens = sequence_logps(model, arrays, self.chunk_size, training=training)
        half = logps.shape[0] // 2
        references = (None, None)
        if self.uses_reference:
            ref = reference_logps(model, self.reference, arrays, self.chunk_size)
            references = (ref[:half], ref[half:])
        chosen_tokens, rejected_tokens = tokens[:half], tokens[half:]
        losses, chosen_reward, rejected_reward = self.pair_losses(
            self.settings, logps[:half], logps[half:], mx.maximum(chosen_tokens, 1), mx.maximum(rejected_tokens, 1), *references
        )
        counted = (chosen_tokens > 0).astype(mx.float32)
        correct = (chosen_reward > rejected_reward).astype(mx.float32) + 0.5 * (chosen_reward == rejected_reward)
        stats = (tokens.sum(), chosen_reward, rejected_reward, correct, logps[:half], logps[half:])
        stats = (stats[0], *((s * counted).sum() for s in stats[1:]))
        return ((losses * counted).sum(), counted.sum(), *(mx.stop_gradient(s) for s in stats))

    def evaluate(self, model: nn.Module, *arrays: mx.array) -> tuple[mx.array, ...]:
        return self(model, *arrays, training=False)

    @staticmethod
    def metrics(stats: list[float], pairs: float) -> dict[str, float]:
        """Report values from summed stats over ``pairs`` pairs."""
        total = dict(zip(STATS, stats))
        return {
            "reward_margin": (total["chosen_reward"] - total["rejected_reward"]) / pairs,
            "accuracy": total["correct"] / pairs,
            "chosen_reward": total["chosen_reward"] / pairs,
            "rejected_reward": total["rejected_reward"] / pairs,
            "chosen_logps": total["chosen_logps"] / pairs,
            "rejected_logps": total["rejected_logps"] / pairs,
        }


def smoothed_sigmoid_loss(x: mx.array, smoothing: float) -> mx.array:
    """−(1−ε) log σ(x) − ε log σ(−x): the logistic loss on a margin with ε of the pairs assumed mislabelled."""
    return -(1 - smoothing) * log_sigmoid(x) - smoothing * log_sigmoid(-x)
