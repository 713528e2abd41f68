"""Learning-rate schedules: linear warmup, then cosine, linear or constant decay.

    schedule = build_schedule(recipe.train, total_steps=200)
    optimizer = optim.AdamW(learning_rate=schedule)
    schedule(mx.array(10))   # the rate used by the 11th optimizer step

The schedule is a pure function of the step (MLX ops only), so it runs inside a compiled step
and resumes exactly from the optimizer's saved step counter.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx

from macft.config import TrainConfig


def build_schedule(cfg: TrainConfig, total_steps: int) -> Callable[[mx.array], mx.array]:
    peak = cfg.learning_rate
    floor = peak * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup - 1, 1)

    def schedule(step: mx.array) -> mx.array:
        step = mx.array(step, mx.float32)
        # Warmup reaches the peak on its last step instead of spending the first step at zero.
        warm = peak * (step + 1) / max(warmup, 1)
        progress = mx.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if cfg.lr_schedule == "cosine":
            decayed = floor + (peak - floor) * 0.5 * (1.0 + mx.cos(math.pi * progress))
        elif cfg.lr_schedule == "linear":
            decayed = peak + (floor - peak) * progress
        else:
            decayed = mx.array(peak, mx.float32)
        return mx.where(step < warmup, warm, decayed)

    return schedule
