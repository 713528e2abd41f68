"""The importance matrix of a run: which input columns of each linear layer its training data uses.

For every linear layer (and the output head) the tuned model is run over the run's training
examples and each input column gets the mean of x² over the examples' tokens, llama.cpp's
"imatrix" idea. A quantization error e in column j changes the layer's output by x_j·e, so
sum_j importance_j·e_j² is the expected squared output error on the data the model was tuned for;
the importance-weighted encoders of ``macft.quants`` minimise exactly that. Every token of an
example counts, the prompt's too: the keys and values of the prompt are what the completion attends to.

    imatrix = compute_imatrix(model, train_examples, max_tokens=8192)
    save_imatrix(imatrix, run_dir / IMATRIX_FILE)
    imatrix, computed = run_imatrix(run_dir, loaded)  # the run's file, computed and saved when missing or stale

``imatrix.columns`` maps an mlx-lm weight name (``model.layers.0.self_attn.q_proj.weight``) to a
float32 vector as long as the layer's input.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from macft.errors import MacftError
from macft.paths import atomic_path

IMATRIX_FILE = "imatrix.safetensors"
DEFAULT_TOKENS = 8192  # enough for stable column means, and cheap next to the export itself
_BATCH_TOKENS = 1024


@dataclass
class Imatrix:
    columns: dict[str, np.ndarray]  # mlx-lm weight name -> mean x² per input column
    tokens: int  # token positions averaged over
    examples: int
    adapter_sha256: str = ""  # the adapter it was computed with (a retrained run makes it stale)


class _Recorder:
    """Sums x² per input column of named layers over the real (unpadded) positions of a batch."""

    def __init__(self):
        self.sums: dict = {}
        self.mask = None  # (batch, length, 1) float32, 1 at real tokens

    def add(self, name: str, x) -> None:
        import mlx.core as mx

        x = x.astype(mx.float32)
        total = (mx.square(x) * self.mask).sum(axis=(0, 1))
        self.sums[name] = self.sums[name] + total if name in self.sums else total


def _recording_layer(inner, name: str, recorder: _Recorder):
    import mlx.nn as nn

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def __call__(self, x, *args, **kwargs):
            recorder.add(name, x)
            return self.inner(x, *args, **kwargs)

    return Recording()


def _linear_layers(model) -> list[tuple[str, object]]:
    import mlx.nn as nn

    return [(path, m) for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]


def compute_imatrix(model, examples: list, *, max_tokens: int = DEFAULT_TOKENS, seed: int = 0) -> Imatrix:
    """Mean x² per input column of every linear layer and of the output head, over up to
    ``max_tokens`` tokens of ``examples`` (``macft.data.Example``, taken in a seeded order)."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from macft.models.head import body_and_head

    split = body_and_head(model)
    if split is None:
        raise MacftError("This model does not expose its body and output head; an importance matrix cannot be computed.")
    body, head = split
    head_name = next(f"{path}.weight" for path, m in model.named_modules() if m is head)
    chosen, total = [], 0
    for index in np.random.default_rng(seed).permutation(len(examples)):
        tokens = examples[index].tokens[:-1]  # the last token is never an input
        if len(tokens) == 0:
            continue
        chosen.append(tokens[: max_tokens - total])
        total += len(chosen[-1])
        if total >= max_tokens:
            break
    if not chosen:
        raise MacftError("The run has no training examples to compute an importance matrix from.")

    recorder = _Recorder()
    layers = _linear_layers(model)
    model.update_modules(tree_unflatten([(path, _recording_layer(m, f"{path}.weight", recorder)) for path, m in layers]))
    try:
        for batch in _batches(sorted(chosen, key=len)):  # similar lengths share a batch: little padding
            width = len(batch[-1])
            ids = np.zeros((len(batch), width), np.int32)
            mask = np.zeros((len(batch), width, 1), np.float32)
            for row, tokens in enumerate(batch):
                ids[row, : len(tokens)] = tokens
                mask[row, : len(tokens)] = 1  # right padding: causal attention keeps real positions exact
            recorder.mask = mx.array(mask)
            hidden = body(mx.array(ids))
            recorder.add(head_name, hidden)
            mx.eval(list(recorder.sums.values()))
    finally:
        model.update_modules(tree_unflatten(layers))
    columns = {name: np.array(value) / np.float32(total) for name, value in recorder.sums.items()}
    return Imatrix(columns, total, len(chosen))


def _batches(by_length: list[list[int]]) -> list[list[list[int]]]:
    batches: list[list[list[int]]] = [[]]
    for tokens in by_length:
        if batches[-1] and (len(batches[-1]) + 1) * len(tokens) > _BATCH_TOKENS:
            batches.append([])
        batches[-1].append(tokens)
    return batches


def save_imatrix(imatrix: Imatrix, path: Path) -> Path:
    import mlx.core as mx

    metadata = {"tokens": str(imatrix.tokens), "examples": str(imatrix.examples), "adapter_sha256": imatrix.adapter_sha256}
    with atomic_path(Path(path)) as tmp:
        named = tmp.with_name(tmp.name + ".safetensors")  # mx.save_safetensors appends the suffix otherwise
        mx.save_safetensors(str(named), {k: mx.array(v) for k, v in imatrix.columns.items()}, metadata=metadata)
        named.rename(tmp)
    return Path(path)


def load_imatrix(path: Path) -> Imatrix:
    import mlx.core as mx

    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
        return Imatrix(
            {k: np.array(v.astype(mx.float32)) for k, v in arrays.items()},
            int(metadata.get("tokens", 0)),
            int(metadata.get("examples", 0)),
            metadata.get("adapter_sha256", ""),
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise MacftError(f"{path} is not a readable importance matrix ({exc}); recompute it with `macft export imatrix`.") from exc


def adapter_digest(run_dir: Path) -> str:
    from macft.adapters.files import adapter_files

    weights, config = adapter_files(Path(run_dir))
    digest = hashlib.sha256(weights.read_bytes())
    digest.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    return digest.hexdigest()


def run_imatrix(run_dir: str | Path, loaded, *, max_tokens: int = DEFAULT_TOKENS, recompute: bool = False) -> tuple[Imatrix, bool]:
    """The importance matrix of a run for its tuned model ``loaded`` (a fused ``LoadedModel``):
    read from ``RUN/imatrix.safetensors`` when it belongs to the run's current adapter, otherwise
    computed from the run's training data and saved there. Returns (imatrix, computed now)."""
    from macft.config import load_recipe
    from macft.data import load_splits

    run_dir = Path(run_dir)
    path = run_dir / IMATRIX_FILE
    digest = adapter_digest(run_dir)
    if path.is_file() and not recompute:
        saved = load_imatrix(path)
        if saved.adapter_sha256 == digest:
            return saved, False
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise MacftError(f"{recipe_file} is missing: the run's training data is needed for its importance matrix.")
    recipe = load_recipe(recipe_file)
    splits = load_splits(recipe.data, loaded.tokenizer)
    imatrix = compute_imatrix(loaded.model, splits.train, max_tokens=max_tokens, seed=recipe.train.seed)
    imatrix.adapter_sha256 = digest
    save_imatrix(imatrix, path)
    return imatrix, True
