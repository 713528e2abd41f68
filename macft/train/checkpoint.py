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
from macft.outputs import record_run_base
from macft.paths import atomic_path
from macft.run_files import check_safetensors, damaged, load_safetensors, read_json


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
PROGRESS_FILE = "progress.json"
OPTIMIZER_FILE = "optimizer.safetensors"


class Checkpoints:
    def __init__(self, run_dir: Path, recipe: Recipe, identity: dict, data_fingerprint: str | None = None):
        self.root = Path(run_dir) / "checkpoints"
        self.recipe = recipe
        self.identity = identity
        self.inputs = {"base_sha256": identity.get("sha256"), "data_sha256": data_fingerprint}
        record_run_base(run_dir, identity)  # so that no command's --force writes over the base this run needs

    def path(self, kind: str) -> Path:
        return self.root / kind

    def save(self, kind: str, model: nn.Module, optimizer: optim.Optimizer | None, progress: Progress) -> Path:
        """Write checkpoint ``kind`` ("last" or "best"); the optimizer state is kept only when given."""
        with atomic_path(self.path(kind)) as tmp:
            save_adapter(model, tmp, self.recipe.method, self.identity, self.recipe.model.recorded)
            if optimizer is not None:
                mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
            state = dataclasses.asdict(progress)
            kind_, keys, pos, has_gauss, cached = np.random.get_state()
            state["numpy_rng"] = [kind_, keys.tolist(), pos, has_gauss, cached]
            (tmp / PROGRESS_FILE).write_text(json.dumps(state))
            (tmp / INPUTS_FILE).write_text(json.dumps(self.inputs))
        return self.path(kind)

    def changed_inputs(self, kind: str = "last") -> list[str]:
        """What differs between this run's base model and data and those checkpoint ``kind`` was trained
        on; a checkpoint that does not record them counts as changed (nothing says it is the same run)."""
        path = self.path(kind) / INPUTS_FILE
        try:
            recorded = read_json(path, fix="")
        except MacftError:
            state = "missing" if not path.exists() else "damaged"
            return [f"possibly the base model and data ({path}, which records them, is {state})"]
        labels = {"base_sha256": "the base model's weights", "data_sha256": "the training or validation data"}
        return [label for key, label in labels.items() if self.inputs.get(key) and recorded.get(key) != self.inputs[key]]

    def restore(self, model: nn.Module, optimizer: optim.Optimizer, kind: str = "last") -> Progress:
        """Load weights, optimizer state and RNG state from checkpoint ``kind``; return its progress."""
        folder = self.path(kind)
        progress, rng = check_checkpoint(folder)
        model.load_weights(list(load_safetensors(folder / ADAPTER_FILE, fix=RESUME_FIX, finite=True).items()), strict=False)
        optimizer.state = tree_unflatten(list(load_safetensors(folder / OPTIMIZER_FILE, fix=RESUME_FIX).items()))
        optimizer.init(model.trainable_parameters())
        np.random.set_state(rng)
        mx.eval(model.parameters(), optimizer.state)
        return progress


RESUME_FIX = "this checkpoint cannot be resumed: start a new run (the run's adapters.safetensors still serves chat, fuse and export)"


def check_checkpoint(folder: Path) -> tuple[Progress, tuple]:
    """A checkpoint's files are whole (checked before any model loads): its progress and numpy RNG state."""
    needed = [folder / ADAPTER_FILE, folder / OPTIMIZER_FILE, folder / PROGRESS_FILE]
    missing = [p.name for p in needed if not p.exists()]
    if missing:
        raise MacftError(f"Cannot resume: {folder} lacks {', '.join(missing)}; the run saved no complete checkpoint.")
    read_json(folder / CONFIG_FILE, fix=RESUME_FIX, keys=("method",))
    for name in (ADAPTER_FILE, OPTIMIZER_FILE):
        check_safetensors(folder / name, fix=RESUME_FIX)
    state = read_json(folder / PROGRESS_FILE, fix=RESUME_FIX, keys=("step", "numpy_rng"))
    try:
        kind_, keys, pos, has_gauss, cached = state.pop("numpy_rng")
        rng = (str(kind_), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
        if rng[1].shape != (624,):
            raise ValueError
        progress = Progress(**state)
        if not all(isinstance(getattr(progress, f.name), (int, float, type(None))) for f in dataclasses.fields(Progress)):
            raise TypeError
    except (TypeError, ValueError, OverflowError):
        raise damaged(folder / PROGRESS_FILE, "its entries are not what macft writes", RESUME_FIX) from None
    return progress, rng
