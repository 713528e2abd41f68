"""The base model a run was trained on: where it was, how it was loaded, and that it is still the same.

chat, generate and eval (``macft.chat.open_model``) and fuse and export (``macft.export.fuse``)
load a run's base here. The base is loaded with the run's options (QLoRA bits and group size,
revision, GGUF dequantization), and its weights' sha256 must be the one recorded in
``adapter_config.json``: an adapter on other weights would run, and silently mean something else.

    loaded = load_run_base("runs/quickstart")                   # refuses a base whose weights changed
    loaded = load_run_base("runs/quickstart", model="other")    # an explicit --model is the user's choice
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macft.errors import MacftError
from macft.run_files import ADAPTER_FIX, read_json


@dataclass(frozen=True)
class RecordedBase:
    spec: str  # a model spec (see macft.models.load)
    options: dict[str, Any] = field(default_factory=dict)  # load_model keyword arguments
    sha256: str | None = None  # None when the spec is a stand-in whose hash differs by construction


def recorded_base(run_dir: str | Path) -> RecordedBase:
    """The base recorded in a run directory (recipe.yaml, else adapter_config.json)."""
    from macft.adapters.files import adapter_files

    weights, config_file = adapter_files(Path(run_dir))
    config = read_json(config_file, fix=ADAPTER_FIX)
    base = config.get("base_model") or {}
    options: dict[str, Any] = {"quantize_bits": config.get("quantize_bits"), "group_size": config.get("quantize_group_size") or 64}
    recipe_file = weights.parent / "recipe.yaml"
    if recipe_file.is_file():
        from macft.config import load_recipe

        model = load_recipe(recipe_file).model
        options |= {"revision": model.revision, "dequantize": model.dequantize, "trust_remote_code": model.trust_remote_code}
        return RecordedBase(model.path, options, base.get("sha256"))
    source, model_dir = base.get("source"), base.get("path")
    if source and (Path(source).expanduser().exists() or not source.startswith((".", "/", "~"))):
        return RecordedBase(source, options, base.get("sha256"))  # a path that still exists, a hub id or the embedded default
    if model_dir and Path(model_dir).is_dir():
        return RecordedBase(model_dir, options)  # the MLX directory it was loaded from (e.g. a GGUF import)
    if source:
        return RecordedBase(source, options, base.get("sha256"))
    raise MacftError(f"{run_dir} does not say which base model it was trained on; pass --model.")


def load_run_base(run_dir: str | Path, model: str | None = None):
    """The run's base as a ``LoadedModel``; ``model`` replaces the recorded spec (and its check)."""
    from macft.models.load import load_model

    recorded = recorded_base(run_dir)
    loaded = load_model(model or recorded.spec, **recorded.options)
    if model is None and recorded.sha256 and loaded.identity["sha256"] != recorded.sha256:
        raise MacftError(
            f"The base model '{recorded.spec}' is not the one the adapter in {run_dir} was trained on (its weights changed); "
            "point the run at the original base, or pass --model to use another one on purpose."
        )
    return loaded
