"""What a finished run reports: the typed summary ``run_training`` returns and writes as summary.json.

    summary = outcome.summary
    print(summary.best_val_loss, summary.peak_memory_bytes)
    json.dumps(summary.to_dict())          # the summary.json layout
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunSummary:
    run_dir: str
    method: str
    model: dict  # the base model's identity: source, path, family, sha256
    stop_reason: str  # "done", "interrupted", "nan", ...
    message: str
    steps: int
    iters: int
    best_val_loss: float | None
    best_step: int | None
    final_train_loss: float | None
    final_val_loss: float | None
    tokens_seen: int
    tokens_per_second: float
    ranks: int  # data-parallel processes (1: one machine)
    distributed_backend: str  # "single process", or the mx.distributed backend
    peak_memory_bytes: int
    train_seconds: float
    trainable_parameters: int
    total_parameters: int
    backend: str
    fast_paths: list[str]  # the performance choices the run made
    compiled: bool
    compile_note: str | None
    objective: str = "sft"  # train.objective
    reference: str | None = None  # what DPO/GRPO compared the policy with

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
