"""Fine-tuning methods: one module per method family in this folder declares ``METHODS`` (its records,
``macft.methods.base.MethodSpec``) next to its layers; this package finds them.

    spec = method_spec("qlora")                                          # the LoRA record (qlora: LoRA on a 4-bit base)
    model = apply_method(loaded.model, recipe.method, loaded.tokenizer)   # freezes the base
    with adapters_disabled(model): ...                                   # the base model's outputs
    merged = fuse_model(model)                                           # LoRA/DoRA layers -> plain Linear

``MethodConfig`` is the recipe's ``method`` section: ``name`` plus every option any method declares.
Conventions a method's modules follow so the rest works: a module with a ``fuse()`` method is
replaced by its result in ``fuse_model``, and any other module class defined under ``macft.methods``
makes ``fuse_model`` refuse; a module with an ``enabled`` attribute is switched off inside
``adapters_disabled`` (the demo's base answers and DPO's reference need that).
"""

from __future__ import annotations

import importlib
import pkgutil
from contextlib import contextmanager
from typing import Any, Iterator

import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from macft.errors import MacftError
from macft.families import lookup
from macft.methods.base import MethodSpec
from macft.methods.lora import DequantizingLinear, route_quantized_matmuls
from macft.methods.recompute import RecomputingMLP, recompute_gated_activations
from macft.models.quantized import QUANTIZED
from macft.options import Option, names_literal, settings_class

METHODS: dict[str, MethodSpec] = {}
# The default method's module first, so its options lead the method section of a saved recipe.
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name != "lora"):
    for _spec in getattr(importlib.import_module(f"{__name__}.{_module.name}"), "METHODS", ()):
        METHODS[_spec.name] = _spec

# CLI shorthands: the method they stand for (the CLI also sets what else they mean).
ALIASES: dict[str, str] = {"qlora": "lora"}  # qlora = lora on a base quantized to 4 bits at load
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
CLI_CHOICES: tuple[str, ...] = ("lora", "dora", "qlora", *(n for n in METHOD_NAMES if n not in ("lora", "dora")))

MethodConfig = settings_class(
    "MethodConfig",
    ((spec.name, spec.options) for spec in METHODS.values()),
    first=Option("name", names_literal(METHOD_NAMES), "lora", "the fine-tuning method"),
)


def method_spec(name: str) -> MethodSpec:
    """The record for a method name or CLI alias; an unknown name is a one-line error listing the choices."""
    spec = METHODS.get(ALIASES.get(name, name))
    if spec is None:
        raise MacftError(f"Unknown method '{name}'; choose one of {', '.join(CLI_CHOICES)}.")
    return spec


def apply_method(model: nn.Module, settings: Any, tokenizer=None) -> nn.Module:
    """Freeze the base, insert the method ``settings.name`` and return the module to train (called like the base).

    The returned module also trains lean: quantized layers multiply through dequantized weights
    where that is faster, and gated MLPs recompute their activation in the backward pass."""
    spec = method_spec(settings.name)
    family = lookup(str(getattr(model, "model_type", "")))
    if family is not None and spec.name in family.refused_methods:
        raise MacftError(f"The '{spec.name}' method cannot train a {family.name} model: {family.refused_methods[spec.name]}.")
    model = route_quantized_matmuls(spec.apply(model, settings, tokenizer))
    recompute_gated_activations(model)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a quantized weight counts as the weights it packs (its
    scales and biases are part of its storage, not parameters)."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    bits = {path: m.bits for path, m in model.named_modules() if isinstance(m, QUANTIZED)}
    total = 0
    for name, value in tree_flatten(model.parameters()):
        path, _, leaf = name.rpartition(".")
        if path not in bits:
            total += value.size
        elif leaf == "weight":
            total += value.size * 32 // bits[path]
    return trainable, total


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes as its frozen base (adapter layers are switched off)."""
    switched = [m for _, m in model.named_modules() if getattr(m, "enabled", None) is True]
    for module in switched:
        module.enabled = False
    try:
        yield model
    finally:
        for module in switched:
            module.enabled = True


def fuse_model(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by its merged plain layer; the result has no adapter left.

    Callers that know the run's method refuse unmergeable methods first, with the registry's reason
    (``method_spec(name).refuse_fusing()``); this check is the net for a model without that record."""
    modules = model.named_modules()
    # Any module a method inserted that cannot merge itself (soft prompts, prefixes, bottlenecks) blocks
    # fusing; a DequantizingLinear or RecomputingMLP is a base layer on a training fast path, not an insertion.
    blocking = sorted(
        {
            type(m).__name__
            for _, m in modules
            if type(m).__module__.startswith("macft.methods") and not hasattr(m, "fuse") and not isinstance(m, (DequantizingLinear, RecomputingMLP))
        }
    )
    if blocking:
        raise MacftError(
            f"This adapter ({', '.join(blocking)}) cannot be merged into the base weights; "
            "use the run directory as an adapter with chat, generate or eval (--adapter RUN), or train with --method lora to fuse."
        )
    fused = [(path, m.fuse()) for path, m in modules if hasattr(m, "fuse") and callable(m.fuse)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model
