"""Fine-tuning methods: insert one into a model, save and reload its weights, merge it back.

    model = apply_method(loaded.model, recipe.method, loaded.tokenizer)   # freezes the base
    save_adapter(model, run_dir, recipe, loaded.identity)                # adapters.safetensors + adapter_config.json
    model, config = load_adapter(fresh_model, run_dir)                   # re-applies the recorded method
    with adapters_disabled(model): ...                                   # the base model's outputs
    merged = fuse_model(model)                                           # LoRA/DoRA layers -> plain Linear

``APPLY`` maps each method of ``macft.method_registry.METHODS`` to ``apply(model, method_cfg, tokenizer)
-> module to train``; what else macft knows about a method (options, fusability, learning rates,
trainable-parameter count) is its registry entry. Conventions a method's modules follow so the rest works:
a module with a ``fuse()`` method is replaced by its result in ``fuse_model``, and any other module
class defined under ``macft.methods`` makes ``fuse_model`` refuse; a module with an ``enabled``
attribute is switched off inside ``adapters_disabled`` (the demo's base answers need that).
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from macft.config import MethodConfig, Recipe
from macft.errors import MacftError
from macft.families import lookup
from macft.families.base import Family
from macft.method_registry import method_spec
from macft.methods.bottleneck import apply_adapters
from macft.methods.expert_lora import EXPERT_LAYERS, expert_layer_class
from macft.methods.full import apply_full
from macft.methods.lora import DequantizingLinear, DoRALinear, LoRALinear, route_quantized_matmuls
from macft.methods.prefix import apply_prefix_tuning
from macft.methods.prompt import apply_prompt_tuning
from macft.methods.recompute import RecomputingMLP, recompute_gated_activations
from macft.models.quantized import QUANTIZED
from macft.paths import atomic_path
from macft.run_files import ADAPTER_FIX, check_adapter_files, load_safetensors, read_json

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
ALL_LINEAR = "all-linear"


def family_of(model: nn.Module) -> Family | None:
    """The family record of an mlx-lm model (None for a model type macft has no record of)."""
    return lookup(str(getattr(model, "model_type", "")))


def apply_lora(model: nn.Module, cfg: MethodConfig, tokenizer=None) -> nn.Module:
    """Freeze the model and wrap the targeted linear layers of the last ``num_layers`` blocks
    in LoRA (or DoRA when ``cfg.name == "dora"``) layers."""
    layer_class = DoRALinear if cfg.name == "dora" else LoRALinear
    targets = set(cfg.target_modules)
    family = family_of(model)
    aliases = family.lora_aliases if family is not None else {}  # fused or renamed projections
    model.freeze()
    blocks = model.layers if cfg.num_layers == -1 else model.layers[max(0, len(model.layers) - cfg.num_layers) :]
    seen: set[str] = set()
    replaced = 0
    for block in blocks:
        swaps = []
        for path, module in block.named_modules():
            if not isinstance(module, (nn.Linear, nn.QuantizedLinear, *EXPERT_LAYERS)):
                continue
            leaf = path.rsplit(".", 1)[-1]
            seen.add(leaf)
            if ALL_LINEAR in targets or leaf in targets or targets & set(aliases.get(leaf, ())):
                kind = expert_layer_class(cfg.name) if isinstance(module, EXPERT_LAYERS) else layer_class
                swaps.append((path, kind.from_base(module, cfg.rank, cfg.alpha, cfg.dropout)))
        block.update_modules(tree_unflatten(swaps))
        replaced += len(swaps)
    if replaced == 0:
        raise MacftError(
            f"method.target_modules {list(cfg.target_modules)} matches no linear layer of this model; "
            f"choose from {', '.join(sorted(seen))} or '{ALL_LINEAR}'."
        )
    return model


APPLY: dict[str, Callable[[nn.Module, MethodConfig, Any], nn.Module]] = {
    "lora": apply_lora,
    "dora": apply_lora,
    "full": apply_full,
    "prompt": apply_prompt_tuning,
    "ptuning": apply_prompt_tuning,
    "prefix": apply_prefix_tuning,
    "adapter": apply_adapters,
}


def apply_method(model: nn.Module, method_cfg: MethodConfig, tokenizer=None) -> nn.Module:
    """Freeze the base, insert the method and return the module to train (called like the base).

    The returned module also trains lean: quantized layers multiply through dequantized weights
    where that is faster, and gated MLPs recompute their activation in the backward pass."""
    method_spec(method_cfg.name)  # an unknown name is a one-line error
    family = family_of(model)
    if family is not None and method_cfg.name in family.refused_methods:
        raise MacftError(f"The '{method_cfg.name}' method cannot train a {family.name} model: {family.refused_methods[method_cfg.name]}.")
    model = route_quantized_matmuls(APPLY[method_cfg.name](model, method_cfg, tokenizer))
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


def adapter_config(recipe: Recipe, identity: dict) -> dict:
    method = recipe.method
    options = {k: v for k, v in dataclasses.asdict(method).items() if k not in ("name", "rank", "alpha", "dropout")}
    from macft import __version__

    return {
        "method": method.name,
        "rank": method.rank,
        "alpha": method.alpha,
        "scale": method.scale,
        "dropout": method.dropout,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "base_model": identity,
        "quantize_bits": recipe.model.quantize_bits,
        "quantize_group_size": recipe.model.quantize_group_size,
        "macft_version": __version__,
    }


def save_adapter(model: nn.Module, run_dir: Path, recipe: Recipe, identity: dict) -> Path:
    """Write the trainable weights and the adapter config into ``run_dir`` (each file atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    with atomic_path(run_dir / ADAPTER_FILE) as tmp, open(tmp, "wb") as fh:
        mx.save_safetensors(fh, weights, metadata={"format": "mlx"})
    with atomic_path(run_dir / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(adapter_config(recipe, identity), indent=2))
    return run_dir / ADAPTER_FILE


def adapter_files(path: Path) -> tuple[Path, Path]:
    """(weights, config) for a run dir, a checkpoint dir or an adapters.safetensors file."""
    path = Path(path)
    weights = path if path.suffix == ".safetensors" else path / ADAPTER_FILE
    config = weights.parent / CONFIG_FILE
    if not weights.is_file():
        raise MacftError(f"No adapter weights at {weights}; pass a run directory from `macft lora` or its adapters.safetensors.")
    if not config.is_file():
        raise MacftError(f"No {CONFIG_FILE} beside {weights}; the adapter cannot be re-applied without it.")
    check_adapter_files(weights, config)
    return weights, config


def method_config(config: dict) -> MethodConfig:
    """The MethodConfig recorded in an adapter config."""
    fields = {f.name for f in dataclasses.fields(MethodConfig)}
    values = {k: v for k, v in config.items() if k in fields}
    values["name"] = config["method"]
    if "target_modules" in values:
        values["target_modules"] = tuple(values["target_modules"])
    return MethodConfig(**values)


def load_adapter(model: nn.Module, path: Path) -> tuple[nn.Module, dict]:
    """Re-apply the method recorded beside ``path`` to ``model`` and load its trained weights."""
    weights_file, config_file = adapter_files(path)
    config = read_json(config_file, fix=ADAPTER_FIX, keys=("method",))
    model = apply_method(model, method_config(config), None)
    weights = load_safetensors(weights_file, fix=ADAPTER_FIX, finite=True)
    expected = dict(tree_flatten(model.parameters()))
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise MacftError(
            f"{weights_file} holds weights this model does not have (e.g. '{unknown[0]}'); "
            "was it trained on another base model?"
        )
    mismatched = [k for k, v in weights.items() if v.shape != expected[k].shape]
    if mismatched:
        raise MacftError(f"{weights_file}: '{mismatched[0]}' has shape {weights[mismatched[0]].shape}, the model expects {expected[mismatched[0]].shape}.")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model, config


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
