"""DPO (Rafailov et al., 2023) and IPO (Azar et al., 2023) on preference pairs, against a reference model.

    DPO (sigmoid):  x = β((πc − ρc) − (πr − ρr));   loss = −(1−ε) log σ(x) − ε log σ(−x)   (ε: label smoothing)
    IPO:            h = (πc − ρc)/|c| − (πr − ρr)/|r|;  loss = (h − 1/(2β))²

(notation in ``macft.objectives.preference``). Each pair's implicit rewards are β(π − ρ). The
reference is the base: the policy with its adapters switched off, or a frozen copy for full
fine-tuning.
"""

from __future__ import annotations

from typing import Any, Literal

import mlx.core as mx

from macft.data.pairs import PAIRS
from macft.objectives.base import Objective
from macft.objectives.preference import METRICS, PreferenceLoss, smoothed_sigmoid_loss
from macft.options import Option

BETA = Option("beta", float, 0.1, "DPO/IPO: how strongly the policy is held near the reference", valid=lambda b: b > 0, must="positive")
LABEL_SMOOTHING = Option(
    "label_smoothing", float, 0.0, "DPO/SimPO: the share of pairs assumed mislabelled", valid=lambda e: 0.0 <= e < 0.5, must="in [0, 0.5)"
)


def dpo_losses(settings: Any, chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected) -> tuple[mx.array, mx.array, mx.array]:
    """(loss, chosen reward, rejected reward) per pair."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if settings.dpo_loss == "ipo":
        h = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
        losses = (h - 1 / (2 * settings.beta)) ** 2
    else:
        losses = smoothed_sigmoid_loss(settings.beta * (chosen_ratio - rejected_ratio), settings.label_smoothing)
    return losses, settings.beta * chosen_ratio, settings.beta * rejected_ratio


OBJECTIVE = Objective(
    name="dpo",
    title="DPO",
    when="you have pairs of a better and a worse answer and want the model to prefer the better one, staying close to the base",
    options=(BETA, Option("dpo_loss", Literal["sigmoid", "ipo"], "sigmoid", "sigmoid (DPO) or ipo (IPO)"), LABEL_SMOOTHING),
    data=PAIRS,
    loss=lambda c: PreferenceLoss(dpo_losses, c.settings, c.chunk_size, c.reference, uses_reference=True),
    metrics=METRICS,
    rows_per_example=lambda settings: 2,  # the chosen and rejected answers go through the model together
    needs_reference=True,
    demo="greedy answers of the base and the tuned model to held-out prompts, scored against the chosen answers",
)
