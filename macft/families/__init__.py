"""The model families macft supports: one module per family in this folder, found here.

Each module defines ``FAMILY``, a ``macft.families.base.Family`` record; adding a module adds
the family to loading, GGUF import and export, training, the Modelfile, the memory planner and
the tests' tiny random models (see docs/architecture.md, "How to add a model family").

    family = family_named("llama")                    # by macft's name, as recorded with a run
    family = for_model_type(config["model_type"])     # mlx-lm's name; a clear error when unknown
    family = for_gguf_arch("qwen3")                   # llama.cpp's name, or None
"""

from __future__ import annotations

import importlib
import pkgutil

from macft.errors import MacftError
from macft.families.base import Family

FAMILIES: dict[str, Family] = {}
for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        _family = importlib.import_module(f"{__name__}.{_module.name}").FAMILY
        FAMILIES[_family.name] = _family


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise MacftError(f"The '{name}' family is not supported; supported: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def for_model_type(model_type: str) -> Family:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise MacftError(f"Model type '{model_type}' is not supported; supported families: {', '.join(sorted(FAMILIES))}.")


def for_gguf_arch(arch: str) -> Family | None:
    return next((f for f in FAMILIES.values() if f.gguf_arch == arch), None)


def lookup(name: str) -> Family | None:
    """The family a shape's name denotes: a model_type (config.json) or a GGUF architecture."""
    return next((f for f in FAMILIES.values() if name in f.model_types or name == f.gguf_arch), None)
