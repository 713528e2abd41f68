"""Preference objectives on (prompt, chosen, rejected) pairs: DPO (sigmoid, IPO), ORPO and SimPO.

With πc, πr the policy's summed log-probabilities of the chosen and rejected answers, ρc, ρr the
reference's, |c|, |r| their trained tokens and σ the logistic function:

- DPO (sigmoid):  x = β((πc − ρc) − (πr − ρr));   loss = −(1−ε) log σ(x) − ε log σ(−x)   (ε: label smoothing)
- IPO:            h = (πc − ρc)/|c| − (πr − ρr)/|r|;  loss = (h − 1/(2β))²
- ORPO:           loss = −πc/|c| − β log σ(log odds(πc/|c|) − log odds(πr/|r|)),  odds(p) = p/(1−p) of e^(avg logp)
- SimPO:          x = β(πc/|c| − πr/|r|) − γ;        loss as DPO's, without a reference

Each pair's implicit rewards are β(π − ρ) for DPO/IPO and β·π/|·| for ORPO/SimPO; their margin and the
share of pairs whose chosen reward is higher (ties count half, so an untrained policy scores 0.5) are
the numbers training reports. Chosen and rejected rows go through the model in one batch: the first
half of a batch's rows are the chosen answers, the second half the rejected ones.

    loss = PreferenceLoss(recipe.align, "dpo", chunk_size=512, reference=None)   # None: adapters off
    loss_sum, pairs, *stats = loss(model, *loss.prepare(batch))
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from macft.align.logps import sequence_logps, trained_positions
from macft.data.batching import split_rows
from macft.config import AlignConfig
from macft.methods import adapters_disabled

REFERENCE_OBJECTIVES = ("dpo", "grpo")  # the objectives that compare the policy with a reference model
# Summed per batch, in this order; the first is the trained tokens the loop counts for throughput.
STATS = ("tokens", "chosen_reward", "rejected_reward", "correct", "chosen_logps", "rejected_logps")


def log_sigmoid(x: mx.array) -> mx.array:
    return -nn.softplus(-x)


def log1m_exp(x: mx.array) -> mx.array:
    """log(1 − eˣ) for x < 0, stable near 0 (a mean log-probability can come close to it)."""
    x = mx.minimum(x, -1e-6)
    return mx.where(x > -0.6931, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def pair_losses(
    objective: str,
    cfg: AlignConfig,
    chosen: mx.array,
    rejected: mx.array,
    chosen_tokens: mx.array,
    rejected_tokens: mx.array,
    ref_chosen: mx.array | None = None,
    ref_rejected: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """(loss, chosen reward, rejected reward) per pair from summed log-probabilities."""
    beta, smoothing = cfg.beta, cfg.label_smoothing
    if objective == "dpo":
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if cfg.dpo_loss == "ipo":
            h = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
            losses = (h - 1 / (2 * beta)) ** 2
        else:
            x = beta * (chosen_ratio - rejected_ratio)
            losses = -(1 - smoothing) * log_sigmoid(x) - smoothing * log_sigmoid(-x)
        return losses, beta * chosen_ratio, beta * rejected_ratio
    chosen_mean, rejected_mean = chosen / chosen_tokens, rejected / rejected_tokens
    if objective == "orpo":
        log_odds = (chosen_mean - rejected_mean) - (log1m_exp(chosen_mean) - log1m_exp(rejected_mean))
        losses = -chosen_mean - beta * log_sigmoid(log_odds)
    elif objective == "simpo":
        x = beta * (chosen_mean - rejected_mean) - cfg.simpo_gamma
        losses = -(1 - smoothing) * log_sigmoid(x) - smoothing * log_sigmoid(-x)
    else:
        raise ValueError(f"not a preference objective: {objective}")
    return losses, beta * chosen_mean, beta * rejected_mean


class PreferenceLoss:
    """The loop's loss for pair batches (``prepare``/``__call__``/``evaluate``, see ``macft.train.loop``).

    ``reference`` is the frozen model DPO compares with: None means the policy itself with its
    adapters switched off (no second copy of the weights); full fine-tuning passes a loaded copy."""

    def __init__(self, cfg: AlignConfig, objective: str, chunk_size: int, reference: nn.Module | None = None):
        self.cfg, self.objective, self.chunk_size, self.reference = cfg, objective, chunk_size, reference

    def prepare(self, batch: Any) -> tuple[mx.array, ...]:
        select, targets, weights, rows = trained_positions(batch.targets, batch.loss_mask)
        return batch.inputs, select, targets, weights, rows

    @staticmethod
    def split(batch: Any, parts: int) -> list:
        return split_rows(batch, parts, paired=True)

    def reference_logps(self, model: nn.Module, arrays: tuple) -> mx.array:
        if self.reference is not None:
            logps, _ = sequence_logps(self.reference, arrays, self.chunk_size, training=False)
        else:
            with adapters_disabled(model):
                logps, _ = sequence_logps(model, arrays, self.chunk_size, training=False)
        return mx.stop_gradient(logps)

    def __call__(self, model: nn.Module, *arrays: mx.array, training: bool = True) -> tuple[mx.array, ...]:
        logps, tokens = sequence_logps(model, arrays, self.chunk_size, training=training)
        half = logps.shape[0] // 2
        references = (None, None)
        if self.objective == "dpo":
            ref = self.reference_logps(model, arrays)
            references = (ref[:half], ref[half:])
        losses, chosen_reward, rejected_reward = pair_losses(
            self.objective, self.cfg, logps[:half], logps[half:], tokens[:half], tokens[half:], *references
        )
        correct = (chosen_reward > rejected_reward).astype(mx.float32) + 0.5 * (chosen_reward == rejected_reward)
        stats = (tokens.sum(), chosen_reward.sum(), rejected_reward.sum(), correct.sum(), logps[:half].sum(), logps[half:].sum())
        return (losses.sum(), mx.array(float(half)), *(mx.stop_gradient(s) for s in stats))

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
