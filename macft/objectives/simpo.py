"""SimPO (Meng et al., 2024) on preference pairs: a length-normalised margin with a target gap, no reference.

    x = β(πc/|c| − πr/|r|) − γ;   loss = −(1−ε) log σ(x) − ε log σ(−x)

(notation in ``macft.objectives.preference``). Each pair's implicit rewards are β·π/|·|.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from macft.data.pairs import PAIRS
from macft.objectives.base import Objective
from macft.objectives.dpo import LABEL_SMOOTHING
from macft.objectives.preference import METRICS, PreferenceLoss, smoothed_sigmoid_loss
from macft.options import Option


def simpo_losses(settings: Any, chosen, rejected, chosen_tokens, rejected_tokens, *references) -> tuple[mx.array, mx.array, mx.array]:
    chosen_mean, rejected_mean = chosen / chosen_tokens, rejected / rejected_tokens
    losses = smoothed_sigmoid_loss(settings.beta * (chosen_mean - rejected_mean) - settings.simpo_gamma, settings.label_smoothing)
    return losses, settings.beta * chosen_mean, settings.beta * rejected_mean


OBJECTIVE = Objective(
    name="simpo",
    title="SimPO",
    when="you have preference pairs and want DPO's effect without a reference model's memory and compute",
    options=(
        Option("beta", float, 0.1, "SimPO: the reward scale", valid=lambda b: b > 0, must="positive"),
        Option("simpo_gamma", float, 0.5, "SimPO: the target reward margin"),
        LABEL_SMOOTHING,
    ),
    data=PAIRS,
    loss=lambda c: PreferenceLoss(simpo_losses, c.settings, c.chunk_size),
    metrics=METRICS,
    rows_per_example=lambda settings: 2,
    demo="greedy answers of the base and the tuned model to held-out prompts, scored against the chosen answers",
)
