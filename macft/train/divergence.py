"""Catch a learning rate that is too high in the first steps, before it wrecks the model.

    watch = DivergenceWatch(learning_rate=2e-4, method="full")
    message = watch.check(step=3, loss=9.8)    # None, or one line naming the learning rate to try (a tenth)

A finite loss that climbs well above where it started is what a too-high learning rate looks like
(full fine-tuning of Gemma 3 270M at LoRA's 2e-4 on the quickstart task: training loss 1.21 at step 1,
12.68 at step 2);
the NaN check only fires once the numbers overflow, long after the weights are ruined.
"""

from __future__ import annotations

from dataclasses import dataclass

from macft.method_registry import method_spec

WATCHED_STEPS = 50  # a rise after this is overfitting or a schedule matter, not the learning rate
# Stop when a step's loss exceeds start × RISE_FACTOR + RISE_MARGIN: per-batch losses vary, so the
# loss must clearly climb (2.0 → over 4.0, 6.2 → over 10.3), not just land on a harder batch.
RISE_FACTOR = 1.5
RISE_MARGIN = 1.0


@dataclass
class DivergenceWatch:
    learning_rate: float
    method: str
    start_loss: float | None = None

    def check(self, step: int, loss: float) -> str | None:
        """Feed each step's loss (step counted from 1); returns the stop message once it diverges."""
        if self.start_loss is None:
            self.start_loss = loss
            return None
        if step > WATCHED_STEPS or loss <= self.start_loss * RISE_FACTOR + RISE_MARGIN:
            return None
        spec = method_spec(self.method)
        usual = f", and {spec.title} usually trains at {spec.learning_rate:g}" if self.learning_rate > spec.learning_rate else ""
        return (
            f"Training stopped at step {step}: the loss rose from {self.start_loss:.2f} to {loss:.2f}, so learning rate "
            f"{self.learning_rate:g} is too high for {spec.title}; try --lr {self.learning_rate / 10:g}{usual}."
        )
