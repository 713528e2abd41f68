"""ORPO (Hong et al., 2024) on preference pairs: supervised loss on the chosen answer plus an odds-ratio
penalty, with no reference model.

    loss = −πc/|c| − β log σ(log odds(πc/|c|) − log odds(πr/|r|)),   odds(p) = p/(1−p) of e^(mean log p)

(notation in ``macft.objectives.preference``). Each pair's implicit rewards are β·π/|·|.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from macft.data.pairs import PAIRS
from macft.objectives.base import Objective
from macft.objectives.preference import METRICS, PreferenceLoss
from macft.objectives.sequences import log_sigmoid
from macft.options import Option


def log1m_exp(x: mx.array) -> mx.array:
    """log(1 − eˣ) for x < 0, stable near 0 (a mean log-probability can come close to it)."""
    x = mx.minimum(x, -1e-6)
    return mx.where(x > -0.6931, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def orpo_losses(settings: Any, chosen, rejected, chosen_tokens, rejected_tokens, *references) -> tuple[mx.array, mx.array, mx.array]:
    chosen_mean, rejected_mean = chosen / chosen_tokens, rejected / rejected_tokens
    log_odds = (chosen_mean - rejected_mean) - (log1m_exp(chosen_mean) - log1m_exp(rejected_mean))
    losses = -chosen_mean - settings.beta * log_sigmoid(log_odds)
    return losses, settings.beta * chosen_mean, settings.beta * rejected_mean


OBJECTIVE = Objective(
    name="orpo",
    title="ORPO",
    when="you have preference pairs and want instruction tuning and preference in one pass, without a reference model",
    options=(Option("beta", float, 0.1, "ORPO: the weight of the odds-ratio term", valid=lambda b: b > 0, must="positive"),),
    data=PAIRS,
    loss=lambda c: PreferenceLoss(orpo_losses, c.settings, c.chunk_size),
    metrics=METRICS,
    rows_per_example=lambda settings: 2,
    demo="greedy answers of the base and the tuned model to held-out prompts, scored against the chosen answers",
)
