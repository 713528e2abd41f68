"""The record every training objective declares in its module (``OBJECTIVE``).

    objective = objective_named("dpo")                                  # macft.objectives
    splits = objective.data.load(recipe.data, tokenizer, recipe.align)  # its data shape (macft.data.shapes)
    loss = objective.loss(LossContext(model, recipe.align, tokenizer, chunk_size=512))

A *loss* is what ``macft.train.loop.train`` trains with:

- ``prepare(batch) -> arrays`` on the host (GRPO samples and scores its answers here);
- ``loss(model, *arrays) -> (loss sum, count, *stats)``, traced and differentiated: the step divides
  the summed loss by the summed count over every accumulated batch, lane and rank. SFT's count is
  its trained tokens and it has no stats; an objective that counts pairs, examples or completions
  instead returns its trained tokens as the first stat (what throughput is measured in);
- ``evaluate(model, *arrays)``: the same values for validation, without the gradient work;
- ``split(batch, parts)`` (optional): the batch in parts whose values add up to the whole batch's
  (the loop's lanes); without it a step runs one lane;
- ``batch_context(model, batch) -> arrays`` (optional): values of the whole global batch that every
  part needs, computed before the batch is shared among ranks and lanes and appended to each part's
  arrays (KTO's estimate of the policy's KL divergence from the reference);
- ``metrics(stat sums, count) -> dict``: the report values the record's ``metrics`` label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from macft.data.shapes import DataShape
from macft.options import Option


@dataclass(frozen=True)
class Metric:
    key: str  # in the loss's metrics() and in metrics.jsonl (validation reports prefix it with val_)
    label: str  # how the live view names it
    format: str  # how it shows it ("{:.0%}")


@dataclass(frozen=True)
class LossContext:
    """What an objective's loss is built from."""

    model: Any  # the policy being trained
    settings: Any  # the recipe's align section
    tokenizer: Any  # a LazyTokenizer (loaded only by objectives that sample or decode)
    chunk_size: int  # trained positions per loss chunk (macft.models.head)
    reference: Any = None  # a frozen copy of the base, when the method cannot switch its adapters off


@dataclass(frozen=True)
class Objective:
    name: str
    title: str  # how messages and the README name it
    when: str  # one line: when to use it
    options: tuple[Option, ...]  # the ``align.*`` recipe keys it reads
    data: DataShape  # the data it trains on
    loss: Callable[[LossContext], Any]  # the loop's loss (see the module docstring)
    metrics: tuple[Metric, ...] = ()  # what it reports besides the loss
    rows_per_example: Callable[[Any], int] = lambda settings: 1  # model rows per batch item (memory planner)
    needs_reference: bool = False  # compares the policy with the base model
    distributed: bool = True  # trains on several ranks (--hosts)
    lanes: bool = True  # its batches split into lanes computed side by side (the loss has ``split``)
    planned_step: bool = False  # the memory planner models its step closely enough to hold MLX's memory limit there
    demo: str = "greedy answers of the base and the tuned model to held-out prompts, scored by exact match"

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def problems(self, settings: Any) -> list[str]:
        """One line per option of ``settings`` this objective reads that holds an invalid value."""
        return [p for o in self.options if (p := o.problem(settings, "align"))]
