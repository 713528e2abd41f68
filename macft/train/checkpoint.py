"""Checkpoints: everything an exact resume needs, written atomically.

A checkpoint folder (``runs/<name>/checkpoints/last/`` or ``best/``) holds the adapter exactly as
``save_adapter`` writes it (so ``load_adapter`` opens a checkpoint too), ``optimizer.safetensors``
(moments and the step counter the schedule reads) and ``progress.json`` (step, data position,
tokens seen, best validation loss, early-stopping count, numpy's global RNG state). The MLX random
key needs no saving: the loop reseeds it from (seed, step) before every step (see ``loop.py``).

    checkpoints = Checkpoints(run_dir, recipe, identity)
    checkpoints.save("last", model, optimizer, progress)
    progress = checkpoints.restore(model, optimizer)        # from checkpoints/last
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from macft.config import Recipe
from macft.errors import MacftError
from macft.adapters.files import ADAPTER_FILE, CONFIG_FILE, save_adapter
from macft.paths import atomic_path


@dataclass
class Progress:
    """Where a run stands; saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position of the next batch: its epoch ...
    index: int = 0  # ... and its index in that epoch's plan
    tokens: int = 0  # trained tokens seen
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    elapsed: float = 0.0  # training seconds in earlier sessions of this run


INPUTS_FILE = "inputs.json"  # what the checkpoint was trained on: {"base_sha256", "data_sha256"}


class Checkpoints:
    def __init__(self, run_dir: Path, recipe: Recipe, identity: dict, data_fingerprint: str | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.recipe = recipe
        self.identity = identity
        self.inputs = {"base_sha256": identity.get("sha256"), "data_sha256": data_fingerprint}

    def path(self, kind: str) -> Path:
        return self.root / kind

    def save(self, kind: str, model: nn.Module, optimizer: optim.Optimizer | None, progress: Progress) -> Path:
        """Write checkpoint ``kind`` ("last" or "best"); the optimizer state is kept only when given."""
        with atomic_path(self.path(kind)) as tmp:
            save_adapter(model, tmp, self.recipe.method, self.identity, self.recipe.model.recorded)
            if optimizer is not None:
                mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
            state = dataclasses.asdict(progress)
            kind_, keys, pos, has_gauss, cached = np.random.get_state()
            state["numpy_rng"] = [kind_, keys.tolist(), pos, has_gauss, cached]
            (tmp / "progress.json").write_text(json.dumps(state))
            (tmp / INPUTS_FILE).write_text(json.dumps(self.inputs))
        return self.path(kind)

    def changed_inputs(self, kind: str = "last") -> list[str]:
        """What differs between this run's base model and data and those checkpoint ``kind`` was trained on."""
        folder = self.path(kind)
        try:
            recorded = json.loads((folder / INPUTS_FILE).read_text())
        except (OSError, ValueError):  # a checkpoint from before inputs were recorded: its adapter config names the base
            recorded = {"base_sha256": (json.loads((folder / CONFIG_FILE).read_text()).get("base_model") or {}).get("sha256")}
        labels = {"base_sha256": "the base model's weights", "data_sha256": "the training or validation data"}
        return [label for key, label in labels.items() if recorded.get(key) and self.inputs.get(key) and recorded[key] != self.inputs[key]]

    def restore(self, model: nn.Module, optimizer: optim.Optimizer, kind: str = "last") -> Progress:
        """Load weights, optimizer state and RNG state from checkpoint ``kind``; return its progress."""
        folder = self.path(kind)
        needed = [folder / ADAPTER_FILE, folder / "optimizer.safetensors", folder / "progress.json"]
        missing = [p.name for p in needed if not p.exists()]
        if missing:
            raise MacftError(f"Cannot resume: {folder} lacks {', '.join(missing)}; the run saved no complete checkpoint.")
        model.load_weights(list(mx.load(str(folder / ADAPTER_FILE)).items()), strict=False)
        optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
        optimizer.init(model.trainable_parameters())
        state = json.loads((folder / "progress.json").read_text())
        kind_, keys, pos, has_gauss, cached = state.pop("numpy_rng")
        np.random.set_state((kind_, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        mx.eval(model.parameters(), optimizer.state)
        return Progress(**state)
