"""Stop a run whose loss has gone bad, before it spends its remaining steps producing garbage.

    guard = LossGuard(vocab_size=262144, learning_rate=2e-4, method="full")
    stop = guard.check(step=3, loss=9.8, grad_norm=1.2)   # None while healthy, else a ``Stop``

Four faults, checked in this order:
- a non-finite loss or gradient (at once);
- a loss pinned at ln(vocabulary size), the loss of a uniform guess, after the run had learned to do
  much better (the weights were blown away, e.g. by a huge learning rate);
- a loss far above where the run started (about twice the start);
  these two must last ``patience`` steps in a row, so one odd batch never stops a run;
- in the first ``WATCHED_STEPS`` steps, a single loss clearly above the start, which is what a
  learning rate that is too high looks like (full fine-tuning of Gemma 3 270M at LoRA's 2e-4 on the
  quickstart task: loss 1.21 at step 1, 12.68 at step 2). The NaN check only fires once the numbers
  overflow, long after the weights are ruined, so this one names the learning rate to try instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from macft.methods import method_spec

WATCHED_STEPS = 50  # a rise after this is overfitting or a schedule matter, not the learning rate
# An early stop needs loss > start × RISE_FACTOR + RISE_MARGIN: per-batch losses vary, so the loss
# must clearly climb (2.0 → over 4.0, 6.2 → over 10.3), not just land on a harder batch.
RISE_FACTOR = 1.5
RISE_MARGIN = 1.0


@dataclass(frozen=True)
class Stop:
    problem: str  # what went wrong, to be placed in a sentence naming the last good checkpoint
    nonfinite: bool = False
    advice: str = ""  # a complete one-line message that replaces that sentence (the learning rate to try)


@dataclass
class LossGuard:
    vocab_size: int | None = None
    learning_rate: float | None = None  # with ``method``: enables the early learning-rate check
    method: str | None = None
    patience: int = 3
    start: float | None = None  # the first step's loss
    lowest: float = math.inf
    bad_steps: int = 0

    def check(self, step: int, loss: float, grad_norm: float = 0.0) -> Stop | None:
        """Feed each step's loss (step counted from 1); returns why to stop, or None."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Stop("the loss or gradient became NaN/inf", nonfinite=True)
        if self.start is None:
            self.start = loss
        uniform = math.log(self.vocab_size) if self.vocab_size else math.inf
        pinned = self.lowest < 0.75 * uniform and loss > 0.97 * uniform
        runaway = loss > self.start + max(self.start, 0.25 * uniform if self.vocab_size else self.start)
        self.lowest = min(self.lowest, loss)
        self.bad_steps = self.bad_steps + 1 if pinned or runaway else 0
        if self.bad_steps >= self.patience:
            if pinned:
                return Stop(
                    f"the loss has been stuck at {loss:.2f}, a uniform guess over the {self.vocab_size} tokens, "
                    f"for {self.bad_steps} steps after reaching {self.lowest:.2f}"
                )
            return Stop(f"the loss rose to {loss:.2f} from {self.start:.2f} at the start and stayed there for {self.bad_steps} steps")
        if self.learning_rate is not None and self.method and 1 < step <= WATCHED_STEPS:
            if loss > self.start * RISE_FACTOR + RISE_MARGIN:
                return self._learning_rate_too_high(step, loss)
        return None

    def _learning_rate_too_high(self, step: int, loss: float) -> Stop:
        spec = method_spec(self.method)
        rate = self.learning_rate
        usual = f", and {spec.title} usually trains at {spec.learning_rate:g}" if rate > spec.learning_rate else ""
        problem = f"the loss rose from {self.start:.2f} to {loss:.2f}"
        advice = (
            f"Training stopped at step {step}: {problem}, so learning rate {rate:g} is too high for "
            f"{spec.title}; try --lr {rate / 10:g}{usual}."
        )
        return Stop(problem, advice=advice)
