"""Training objectives: one module per objective in this folder declares ``OBJECTIVE`` (its record,
``macft.objectives.base.Objective``); this package finds them.

    objective = objective_named(recipe.train.objective)     # "sft", "dpo", "orpo", "simpo", "grpo", "kto"
    shape = data_shape_of(Path("train.jsonl"))               # which data shape a file holds

``AlignConfig`` is the recipe's ``align`` section: every option any objective declares. Adding an
objective is adding its module (and, for a new kind of data, its data shape in ``macft.data``).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from macft.data.formats import first_object
from macft.data.shapes import DataShape
from macft.errors import MacftError
from macft.objectives.base import Objective
from macft.options import settings_class

OBJECTIVES: dict[str, Objective] = {}
# Supervised fine-tuning first: it is the default, and the data shape every other one is told apart from.
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name != "sft"):
    _objective = getattr(importlib.import_module(f"{__name__}.{_module.name}"), "OBJECTIVE", None)
    if _objective is not None:
        OBJECTIVES[_objective.name] = _objective

OBJECTIVE_NAMES: tuple[str, ...] = tuple(OBJECTIVES)
AlignConfig = settings_class("AlignConfig", ((o.name, o.options) for o in OBJECTIVES.values()))


def objective_named(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise MacftError(f"Unknown objective '{name}'; choose one of {', '.join(OBJECTIVE_NAMES)}.")
    return OBJECTIVES[name]


def data_shapes() -> list[DataShape]:
    """Every data shape an objective trains on, the most specific first (supervised examples last)."""
    shapes: dict[str, DataShape] = {}
    for objective in reversed(OBJECTIVES.values()):
        shapes.setdefault(objective.data.name, objective.data)
    return list(shapes.values())


def data_shape_of(path: Path) -> DataShape:
    """The data shape a JSONL file holds, judged by its first line (supervised examples when that
    line is no JSON object: their reader then names the line's problem)."""
    obj = first_object(path)
    return next(shape for shape in data_shapes() if obj is None or shape.recognises(obj))


def refuse_other_data(objective: Objective, path: Path) -> None:
    """Stop before loading when ``path`` holds another objective's data (KTO's labelled answers read as
    supervised examples would train on the bad ones too)."""
    shape = data_shape_of(path)
    if shape.name != objective.data.name:
        fitting = " or ".join(o.name for o in OBJECTIVES.values() if o.data.name == shape.name)
        raise MacftError(f"{path} holds {shape.name} ({shape.line}), which {objective.title} does not train on; set train.objective to {fitting}.")
