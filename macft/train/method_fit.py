"""Training settings that fit the method: its usual learning rate, and how long to train.

    recipe, note = with_method_learning_rate(recipe)        # train.learning_rate None -> the method's default
    warning = learning_rate_warning(recipe)                  # a line when the rate is outside the usual range
    recipe, note = choose_epochs(recipe, 800, batches_per_epoch=200, has_valid=True)  # train.epochs "auto" -> 1..5

Each returns the one line the user sees, so the CLI and ``run_training`` say the same thing.
"""

from __future__ import annotations

import math

from macft.config import Recipe
from macft.method_registry import method_spec

MAX_AUTO_EPOCHS = 5
# With --epochs auto and a validation set: validate about this many times, and stop after this many
# validations without improvement.
AUTO_VALIDATIONS = 10
AUTO_PATIENCE = 3


def with_method_learning_rate(recipe: Recipe, replaced: tuple[str, float] | None = None) -> tuple[Recipe, str | None]:
    """Fill an unset learning rate with the method's usual default. ``replaced`` is (the method,
    the learning rate) the recipe had before a flag changed its method, named in the note."""
    if recipe.train.learning_rate is not None:
        return recipe, None
    spec = method_spec(recipe.method.name)
    note = f"Learning rate {spec.learning_rate:g}: the usual one for {spec.title}"
    if replaced is not None:
        note += f" (the recipe's {replaced[1]:g} was for {method_spec(replaced[0]).title})"
    note += "; set --lr to choose another."
    return recipe.replace(train={"learning_rate": spec.learning_rate}), note


def learning_rate_warning(recipe: Recipe) -> str | None:
    """One line when the learning rate lies outside the method's usual range."""
    spec = method_spec(recipe.method.name)
    low, high = spec.learning_rate_range
    rate = recipe.train.learning_rate
    if rate is None or low <= rate <= high:
        return None
    direction = "above" if rate > high else "below"
    return (
        f"Warning: learning rate {rate:g} is {direction} the usual range for {spec.title} ({low:g} to {high:g}; "
        f"default {spec.learning_rate:g}); "
        + ("the loss may diverge." if rate > high else "training may barely move the model.")
    )


def choose_epochs(recipe: Recipe, examples: int, batches_per_epoch: int, has_valid: bool) -> tuple[Recipe, str | None]:
    """Resolve ``train.epochs: auto``: enough passes for the method to see its usual number of
    examples, between 1 and 5, with early stopping on the validation loss when there is a validation set."""
    if recipe.train.epochs != "auto":
        return recipe, None
    spec = method_spec(recipe.method.name)
    epochs = min(MAX_AUTO_EPOCHS, max(1, math.ceil(spec.examples_to_see / max(examples, 1))))
    changes: dict = {"epochs": float(epochs)}
    note = f"--epochs auto: {epochs} epoch{'s' if epochs > 1 else ''} over {examples} examples for {spec.title}"
    if has_valid:
        steps = math.ceil(epochs * batches_per_epoch / recipe.train.grad_accumulation)
        every = max(1, steps // AUTO_VALIDATIONS)
        patience = recipe.train.early_stopping_patience or AUTO_PATIENCE
        changes |= {"eval_every": every, "early_stopping_patience": patience}
        cadence = "every step" if every == 1 else f"every {every} steps"
        note += f", validating {cadence} and stopping after {patience} without improvement"
    return recipe.replace(train=changes), note + "."
