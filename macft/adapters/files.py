"""macft's adapter format: the trainable weights and the method that made them, in a run directory.

    save_adapter(model, run_dir, recipe.method, identity, base_load)   # adapters.safetensors + adapter_config.json
    model, config = load_adapter(fresh_model, run_dir)                 # re-applies the recorded method

``adapter_config.json`` records the method and its settings, the base model's identity (source,
family, sha256) and how the base was loaded (QLoRA's bits and group size), so every command can
rebuild the trained model from the run directory alone.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from macft.errors import MacftError
from macft.methods import MethodConfig, apply_method
from macft.paths import atomic_path
from macft.run_files import ADAPTER_FIX, check_adapter_files, load_safetensors, read_json

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def adapter_config(settings: Any, identity: dict, base_load: dict) -> dict:
    """The adapter config of a method's ``settings`` trained on the base ``identity`` loaded with
    ``base_load`` (``quantize_bits``, ``quantize_group_size``)."""
    from macft import __version__

    options = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items() if k != "name"}
    return {
        "method": settings.name,
        **options,
        "scale": settings.alpha / settings.rank,
        "base_model": identity,
        **base_load,
        "macft_version": __version__,
    }


def save_adapter(model: nn.Module, run_dir: Path, settings: Any, identity: dict, base_load: dict) -> Path:
    """Write the trainable weights and the adapter config into ``run_dir`` (each file atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    with atomic_path(run_dir / ADAPTER_FILE) as tmp, open(tmp, "wb") as fh:
        mx.save_safetensors(fh, weights, metadata={"format": "mlx"})
    with atomic_path(run_dir / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(adapter_config(settings, identity, base_load), indent=2))
    return run_dir / ADAPTER_FILE


def adapter_paths(path: Path) -> tuple[Path, Path]:
    """(weights, config) for a run dir, a checkpoint dir or an adapters.safetensors file, both present."""
    path = Path(path)
    weights = path if path.suffix == ".safetensors" else path / ADAPTER_FILE
    config = weights.parent / CONFIG_FILE
    if not weights.is_file():
        raise MacftError(f"No adapter weights at {weights}; pass a run directory from `macft lora` or its adapters.safetensors.")
    if not config.is_file():
        raise MacftError(f"No {CONFIG_FILE} beside {weights}; the adapter cannot be re-applied without it.")
    return weights, config


def adapter_files(path: Path) -> tuple[Path, Path]:
    """``adapter_paths``, with both files checked whole before any model is loaded for them."""
    weights, config = adapter_paths(path)
    check_adapter_files(weights, config)
    return weights, config


def method_config(config: dict) -> Any:
    """The recipe's method settings (``MethodConfig``) recorded in an adapter config."""
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
