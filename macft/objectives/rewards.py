"""GRPO reward functions: built-ins and the user's own, named in ``align.rewards``.

Every reward is ``reward(completion: str, example: dict) -> float``, where ``example`` is the
prompt line's JSON object (so its ``answer`` or any other field is there). The recipe lists them
and their scores are summed:

    exact_match            1 if the stripped completion equals example["answer"] (exact_match=FIELD for another field)
    json_valid             1 if the completion is one JSON value
    json_keys=name,age     1 if it is a JSON object holding these keys (0.5 if valid JSON without them)
    regex=^\\d+$           1 if the pattern matches the stripped completion (re.search)
    length_penalty=200     −0.01 per character of the completion beyond 200
    my_rewards:score       score(completion, example) from an importable module
    rewards.py:score       ... or from a Python file (relative to where macft runs)

    rewards = load_rewards(["exact_match", "json_keys=name,age"])
    scores = score(rewards, completions, examples, sources)    # [n] float
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from macft.errors import MacftError

RewardFn = Callable[[str, dict], float]


@dataclass(frozen=True)
class Reward:
    name: str  # as written in the recipe
    fn: RewardFn


def exact_match(field: str = "answer") -> RewardFn:
    def reward(completion: str, example: dict) -> float:
        if field not in example:
            raise KeyError(f"the line has no '{field}' field")
        return float(completion.strip() == str(example[field]).strip())

    return reward


def _json(text: str) -> Any:
    return json.loads(text.strip())


def json_valid(_: str = "") -> RewardFn:
    def reward(completion: str, example: dict) -> float:
        try:
            _json(completion)
        except ValueError:
            return 0.0
        return 1.0

    return reward


def json_keys(keys: str) -> RewardFn:
    wanted = [k.strip() for k in keys.split(",") if k.strip()]

    def reward(completion: str, example: dict) -> float:
        try:
            value = _json(completion)
        except ValueError:
            return 0.0
        return 1.0 if isinstance(value, dict) and all(k in value for k in wanted) else 0.5

    return reward


def regex(pattern: str) -> RewardFn:
    compiled = re.compile(pattern)
    return lambda completion, example: float(compiled.search(completion.strip()) is not None)


def length_penalty(limit: str = "64") -> RewardFn:
    characters = int(limit)
    return lambda completion, example: -0.01 * max(0, len(completion) - characters)


BUILT_INS: dict[str, Callable[..., RewardFn]] = {
    "exact_match": exact_match,
    "json_valid": json_valid,
    "json_keys": json_keys,
    "regex": regex,
    "length_penalty": length_penalty,
}


def load_reward(spec: str) -> Reward:
    """One reward from its recipe entry; a bad entry is a one-line error naming it."""
    name, sep, argument = spec.partition("=")
    if name in BUILT_INS:
        try:
            fn = BUILT_INS[name](argument) if sep else BUILT_INS[name]()
        except (TypeError, ValueError, re.error) as exc:
            raise MacftError(f"align.rewards entry '{spec}': bad argument ({exc}).") from None
        return Reward(spec, fn)
    target, colon, function = spec.rpartition(":")
    if not colon or not target or not function:
        known = ", ".join(BUILT_INS)
        raise MacftError(f"align.rewards entry '{spec}' is neither a built-in ({known}) nor 'module:function'.")
    module = _import(target, spec)
    fn = getattr(module, function, None)
    if not callable(fn):
        raise MacftError(f"align.rewards entry '{spec}': {target} has no function '{function}'.")
    return Reward(spec, fn)


def _import(target: str, spec: str) -> Any:
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise MacftError(f"align.rewards entry '{spec}': file {path} does not exist.")
            module_spec = importlib.util.spec_from_file_location(f"macft_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
        if "" not in sys.path:  # `python -m` and the console script differ; the working directory counts
            sys.path.insert(0, "")
        return importlib.import_module(target)
    except MacftError:
        raise
    except Exception as exc:
        raise MacftError(f"align.rewards entry '{spec}': importing {target} failed ({type(exc).__name__}: {exc}).") from None


def beside_recipe(specs: Any, recipe_dir: Path) -> Any:
    """A reward in a file next to the recipe ("rewards.py:score") resolves like the recipe's data."""
    if not isinstance(specs, list):
        return specs
    resolved = []
    for spec in specs:
        target, colon, function = str(spec).rpartition(":")
        if colon and target.endswith(".py") and not Path(target).is_absolute() and (recipe_dir / target).is_file():
            spec = f"{(recipe_dir / target).resolve()}:{function}"
        resolved.append(spec)
    return resolved


def load_rewards(specs: tuple[str, ...] | list[str]) -> list[Reward]:
    if not specs:
        raise MacftError("GRPO needs at least one reward: set align.rewards (e.g. [exact_match]).")
    return [load_reward(spec) for spec in specs]


def score(rewards: list[Reward], completions: list[str], examples: list[dict], sources: list[str]) -> np.ndarray:
    """The summed reward of each completion; a failing or non-numeric reward is a one-line error
    naming the function and the example's line."""
    totals = np.zeros(len(completions), np.float64)
    for i, (completion, example, source) in enumerate(zip(completions, examples, sources)):
        for reward in rewards:
            try:
                value = float(reward.fn(completion, example))
            except Exception as exc:
                raise MacftError(f"Reward '{reward.name}' failed on {source} ({type(exc).__name__}: {exc}).") from None
            if not math.isfinite(value):
                raise MacftError(f"Reward '{reward.name}' returned {value} on {source}; return a finite number.")
            totals[i] += value
    return totals
