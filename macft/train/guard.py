"""Stop a run whose loss has gone bad, before it spends its remaining steps producing garbage.

    guard = LossGuard(vocab_size=262144)
    problem = guard.check(loss, grad_norm)       # None while healthy, else what went wrong

Three faults: a non-finite loss or gradient (at once); a loss pinned at ln(vocabulary size), the
loss of a uniform guess, after the run had learned to do much better (the weights were blown
away, e.g. by a huge learning rate); a loss far above where the run started. The last two must
last ``patience`` steps in a row, so one odd batch never stops a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LossGuard:
    vocab_size: int | None = None
    patience: int = 3
    start: float | None = None  # the first step's loss
    lowest: float = math.inf
    bad_steps: int = 0

    def check(self, loss: float, grad_norm: float = 0.0) -> str | None:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "the loss or gradient became NaN/inf"
        if self.start is None:
            self.start = loss
        uniform = math.log(self.vocab_size) if self.vocab_size else math.inf
        pinned = self.lowest < 0.75 * uniform and loss > 0.97 * uniform
        runaway = loss > self.start + max(self.start, 0.25 * uniform if self.vocab_size else self.start)
        self.lowest = min(self.lowest, loss)
        self.bad_steps = self.bad_steps + 1 if pinned or runaway else 0
        if self.bad_steps < self.patience:
            return None
        if pinned:
            return (
                f"the loss has been stuck at {loss:.2f}, a uniform guess over the {self.vocab_size} tokens, "
                f"for {self.bad_steps} steps after reaching {self.lowest:.2f}"
            )
        return f"the loss rose to {loss:.2f} from {self.start:.2f} at the start and stayed there for {self.bad_steps} steps"
