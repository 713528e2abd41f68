"""One LoRA adapter from several trained on the same base, with Hugging Face PEFT's
``add_weighted_adapter`` semantics.

    result = merge_adapters(["runs/json", "runs/dates"], "runs/both", weights=[1.0, 1.0], method="cat")
    # runs/both is a run directory: chat, generate, eval, fuse, export and serve take it as --adapter

Source adapter i holds, for every adapted layer, A_i (in × r_i), B_i (r_i × out) and the scale
s_i = α_i / r_i, so it adds ΔW_i = s_i·(A_i B_i)ᵀ to the base weight; w_i is its ``--weights`` entry.
The merged adapter has alpha = rank (scale 1) and, layer by layer:

- ``cat``: A = [w_1·s_1·A_1 | w_2·s_2·A_2 | …], B = [B_1; B_2; …]; its rank is Σ r_i and
  ΔW = Σ w_i·ΔW_i exactly. Any weights, negative ones included (task subtraction).
- ``linear``: A = Σ c_i·A_i and B = Σ c_i·B_i with c_i = √(w_i·s_i). A and B are combined
  separately, so ΔW also holds the cross terms c_i·c_j·(A_i B_j)ᵀ: it is not Σ w_i·ΔW_i.
- ``ties``: on A and on B separately, each source keeps its ``density`` fraction of entries with
  the largest magnitude (the others become 0); each entry's sign is elected from the kept values
  (``sign="total"``: the sign of their sum; ``"frequency"``: the sign held by more sources; ties
  go to +); the result is the mean of c_i·value over the sources whose kept value has the elected
  sign (0 where none has).
- ``dare``: on A and on B separately, each entry of each source survives with probability
  ``density`` and survivors are divided by ``density`` (expected value unchanged); then Σ c_i·value.
  PEFT calls this ``dare_linear``.
- ``dare_ties``: DARE's random drop and rescale, then TIES's sign election and mean.

``linear``, ``ties``, ``dare`` and ``dare_ties`` need equal ranks and weights ≥ 0 (c_i is a square
root); ``density`` (0 < d ≤ 1; 1 keeps everything) is read by ``ties``, ``dare`` and ``dare_ties``
only. A layer that some sources do not adapt is combined from the sources that do (``cat`` leaves
zeros in the absent sources' places). The merged adapter adapts the union of the sources' target
modules and layers. DARE's random draws come from ``numpy.random.default_rng(seed)``, layer by layer
in sorted name order, A before B, sources in the order given: ``keep = rng.random(shape) < density``.

Only LoRA adapters (QLoRA included) of one base, loaded the same way, merge: DoRA's per-row magnitudes
and the other methods' modules have no rule in PEFT's merge, and adapters of other weights would add
deltas meant for another model; each of these is refused in one line before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from macft.errors import MacftError

METHODS = ("linear", "cat", "ties", "dare", "dare_ties")
SIGN_METHODS = ("total", "frequency")
PRUNED = ("ties", "dare", "dare_ties")  # the methods that read density
ELECTED = ("ties", "dare_ties")  # the methods that read the sign election
RECORD_KEY = "merged_from"  # the adapter_config.json key that records what a merged adapter came from
MERGE_RECORD = "macft_merge.json"  # written into the output folder: the merge and the files it wrote


@dataclass(frozen=True)
class Source:
    """One adapter to merge: its run directory, config, and per-layer (A, B) in float32."""

    path: Path
    config: dict
    layers: dict[str, tuple[np.ndarray, np.ndarray]]  # layer path -> (lora_a, lora_b)
    dtypes: dict[str, object]  # parameter name -> its mx dtype, kept in the output
    sha256: str

    @property
    def scale(self) -> float:
        return float(self.config["alpha"]) / int(self.config["rank"])


@dataclass
class MergeResult:
    path: Path
    method: str
    weights: list[float]
    rank: int
    layers: int
    sources: list[str]

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


# ---------------------------------------------------------------------------- the arithmetic


def magnitude_pruned(tensor: np.ndarray, density: float) -> np.ndarray:
    """``tensor`` with all but its int(density·size) largest-magnitude entries set to 0."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.size)
    flat = np.zeros(tensor.size, dtype=tensor.dtype)
    if keep > 0:
        top = np.argpartition(-np.abs(tensor).ravel(), keep - 1)[:keep]
        flat[top] = tensor.ravel()[top]
    return flat.reshape(tensor.shape)


def randomly_pruned(tensor: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE: each entry kept with probability ``density``, survivors divided by ``density``."""
    if density >= 1:
        return tensor
    keep = rng.random(tensor.shape) < density
    return np.where(keep, tensor / np.float32(density), np.float32(0)).astype(tensor.dtype)


def elected_mean(tensors: np.ndarray, coefficients: np.ndarray, sign: str) -> np.ndarray:
    """TIES's disjoint merge of stacked (pruned) tensors: the mean of coefficient·value over the
    sources whose value has the elected sign."""
    signs = np.sign(tensors)
    votes = tensors.sum(axis=0) if sign == "total" else signs.sum(axis=0)
    elected = np.where(votes >= 0, 1.0, -1.0).astype(tensors.dtype)
    agree = signs == elected
    weighted = tensors * coefficients.reshape((-1,) + (1,) * (tensors.ndim - 1))
    return (weighted * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1).astype(tensors.dtype)


def combine(tensors: list[np.ndarray], coefficients: list[float], method: str, density: float, sign: str, rng) -> np.ndarray:
    """One of A or B of a layer from its sources' tensors (every method but ``cat``)."""
    c = np.asarray(coefficients, dtype=np.float32)
    if method == "ties":
        tensors = [magnitude_pruned(t, density) for t in tensors]
    elif method in ("dare", "dare_ties"):
        tensors = [randomly_pruned(t, density, rng) for t in tensors]
    stacked = np.stack(tensors)
    if method in ELECTED:
        return elected_mean(stacked, c, sign)
    return np.tensordot(c, stacked, axes=1)


def merge_layer(
    present: list[tuple[np.ndarray, np.ndarray, float, float]], method: str, density: float, sign: str, rng, total_rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of one merged layer from the (A_i, B_i, s_i, w_i) of the sources that adapt it.

    A has its rank on the last axis and B on the one before (2-D layers, or stacked experts)."""
    if method == "cat":
        a = np.concatenate([w * s * a for a, _, s, w in present], axis=-1)
        b = np.concatenate([b for _, b, _, _ in present], axis=-2)
        missing = total_rank - a.shape[-1]  # sources that do not adapt this layer: zeros, as in PEFT
        if missing:
            a = np.concatenate([a, np.zeros(a.shape[:-1] + (missing,), a.dtype)], axis=-1)
            b = np.concatenate([b, np.zeros(b.shape[:-2] + (missing, b.shape[-1]), b.dtype)], axis=-2)
        return a, b
    coefficients = [math.sqrt(w * s) for _, _, s, w in present]
    a = combine([a for a, _, _, _ in present], coefficients, method, density, sign, rng)
    b = combine([b for _, b, _, _ in present], coefficients, method, density, sign, rng)
    return a, b


# ---------------------------------------------------------------------------- checks and files


def check_options(count: int, weights: list[float] | None, method: str, density: float | None, sign: str | None) -> tuple[list[float], float, str]:
    """(weights, density, sign) to use, or a one-line refusal naming the option to change."""
    if count < 2:
        raise MacftError("macft merge needs at least two adapters (run directories from `macft lora`).")
    if method not in METHODS:
        raise MacftError(f"--method {method} is not a merge method; choose {', '.join(METHODS)}.")
    weights = [1.0] * count if weights is None else list(weights)
    if len(weights) != count:
        raise MacftError(f"--weights has {len(weights)} values for {count} adapters; give one per adapter, in order.")
    if not all(math.isfinite(w) for w in weights):
        raise MacftError("--weights must be finite numbers.")
    if method != "cat" and any(w < 0 for w in weights):
        raise MacftError(f"--method {method} scales A and B by √(weight·scale), so weights must be 0 or more; use --method cat for negative weights.")
    if method in PRUNED:
        if density is None:
            raise MacftError(f"--method {method} needs --density: the fraction of each adapter's values kept, above 0 and at most 1 (0.5 is a common start).")
        if not 0 < density <= 1:
            raise MacftError(f"--density must be above 0 and at most 1 (got {density}).")
    elif density is not None:
        raise MacftError(f"--density is read by {', '.join(PRUNED)}; --method {method} keeps every value.")
    if sign is not None and method not in ELECTED:
        raise MacftError(f"--sign is read by {' and '.join(ELECTED)}; --method {method} elects no signs.")
    if sign is not None and sign not in SIGN_METHODS:
        raise MacftError(f"--sign {sign} is not known; choose {' or '.join(SIGN_METHODS)}.")
    return weights, 1.0 if density is None else density, sign or "total"


def read_source(path: Path) -> Source:
    import mlx.core as mx

    from macft.adapters.files import adapter_files

    weights_file, config_file = adapter_files(path)
    config = json.loads(config_file.read_text())
    method = config.get("method")
    if method == "dora":
        raise MacftError(f"{path} is a DoRA adapter: its per-row magnitudes have no rule in PEFT's merge; merge LoRA adapters (method lora).")
    if method != "lora":
        raise MacftError(f"{path} is a '{method}' adapter; only LoRA adapters (QLoRA included) can be merged.")
    arrays = mx.load(str(weights_file))
    layers: dict[str, dict[str, np.ndarray]] = {}
    for name, value in arrays.items():
        layer, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise MacftError(f"{weights_file} holds '{name}', which is not a LoRA matrix; was it written by `macft lora`?")
        layers.setdefault(layer, {})[leaf] = np.array(value.astype(mx.float32))
    pairs = {}
    for layer, pair in layers.items():
        if set(pair) != {"lora_a", "lora_b"}:
            raise MacftError(f"{weights_file} has only half of the LoRA pair of '{layer}'; the file is damaged.")
        pairs[layer] = (pair["lora_a"], pair["lora_b"])
    digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    return Source(weights_file.parent, config, pairs, {k: v.dtype for k, v in arrays.items()}, digest)


def check_same_base(sources: list[Source]) -> None:
    """Refuse sources trained on other weights, or loaded another way (QLoRA bits, group size, recipe's model section)."""
    first = sources[0]
    first_base = first.config.get("base_model") or {}
    for other in sources[1:]:
        base = other.config.get("base_model") or {}
        same = base.get("sha256") == first_base.get("sha256") if base.get("sha256") and first_base.get("sha256") else base.get("source") == first_base.get("source")
        if not same:
            raise MacftError(
                f"{other.path} was trained on {base.get('source', '?')} and {first.path} on {first_base.get('source', '?')} "
                "(different weights): only adapters of one base merge."
            )
        for key in ("quantize_bits", "quantize_group_size"):
            if other.config.get(key) != first.config.get(key):
                raise MacftError(f"{other.path} loaded its base with {key}={other.config.get(key)} and {first.path} with {first.config.get(key)}; merge adapters trained on the same load of the base.")
        for layer in set(first.layers) & set(other.layers):
            (a1, b1), (a2, b2) = first.layers[layer], other.layers[layer]
            if a1.shape[:-1] != a2.shape[:-1] or b1.shape[:-2] + b1.shape[-1:] != b2.shape[:-2] + b2.shape[-1:]:
                raise MacftError(f"'{layer}' has other dimensions in {other.path} than in {first.path}: they were not trained on the same base.")
    recipes = [_recipe_model(s.path) for s in sources]
    known = [(s.path, r) for s, r in zip(sources, recipes) if r is not None]
    for path, model in known[1:]:
        if model != known[0][1]:
            raise MacftError(f"{path}/recipe.yaml loads its base with other model settings than {known[0][0]}/recipe.yaml; merge adapters trained on the same load of the base.")


def _recipe_model(run_dir: Path):
    from macft.config import load_recipe

    recipe_file = Path(run_dir) / "recipe.yaml"
    return load_recipe(recipe_file).model if recipe_file.is_file() else None


def merged_config(sources: list[Source], rank: int, record: dict) -> dict:
    """The merged run's adapter_config.json: the first source's, with the merged rank (alpha = rank,
    as PEFT sets it), the union of targets and layers, and the merge's record."""
    from macft import __version__

    targets: list[str] = []
    for source in sources:
        targets += [t for t in source.config.get("target_modules", []) if t not in targets]
    layer_counts = [int(s.config.get("num_layers", -1)) for s in sources]
    return {
        **sources[0].config,
        "rank": rank,
        "alpha": float(rank),
        "scale": 1.0,
        "target_modules": targets,
        "num_layers": -1 if -1 in layer_counts else max(layer_counts),
        RECORD_KEY: record,
        "macft_version": __version__,
    }


def merge_adapters(
    adapters: list[str | Path],
    out: str | Path,
    *,
    weights: list[float] | None = None,
    method: str = "linear",
    density: float | None = None,
    sign: str | None = None,
    seed: int = 0,
    force: bool = False,
) -> MergeResult:
    """Merge ``adapters`` (run directories) into the run directory ``out`` (see the module docstring)."""
    import mlx.core as mx

    from macft.config import load_recipe, save_recipe
    from macft.adapters.files import ADAPTER_FILE, CONFIG_FILE
    from macft.outputs import check_output, manifest
    from macft.paths import atomic_path

    weights, density, sign = check_options(len(adapters), weights, method, density, sign)
    out = Path(out)
    check_output(out, "merge", record=MERGE_RECORD, inputs=adapters, force=force)
    sources = [read_source(Path(p)) for p in adapters]
    check_same_base(sources)
    ranks = [int(s.config["rank"]) for s in sources]
    if method != "cat" and len(set(ranks)) > 1:
        raise MacftError(f"--method {method} adds A and B matrices of equal rank, and these have ranks {ranks}; use --method cat (rank {sum(ranks)}).")
    rank = sum(ranks) if method == "cat" else ranks[0]
    rng = np.random.default_rng(seed)
    merged: dict[str, mx.array] = {}
    for layer in sorted(set().union(*(s.layers for s in sources))):
        present = [(*s.layers[layer], s.scale, w) for s, w in zip(sources, weights) if layer in s.layers]
        a, b = merge_layer(present, method, density, sign, rng, rank)
        dtypes = next(s.dtypes for s in sources if layer in s.layers)
        merged[f"{layer}.lora_a"] = mx.array(a).astype(dtypes[f"{layer}.lora_a"])
        merged[f"{layer}.lora_b"] = mx.array(b).astype(dtypes[f"{layer}.lora_b"])
    record = {
        "method": method,
        "weights": weights,
        "density": density if method in PRUNED else None,
        "sign": sign if method in ELECTED else None,
        "seed": seed if method in ("dare", "dare_ties") else None,
        "adapters": [{"path": str(s.path.resolve()), "sha256": s.sha256, "rank": int(s.config["rank"]), "alpha": s.config["alpha"]} for s in sources],
    }
    config = merged_config(sources, rank, record)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        mx.save_safetensors(str(tmp / ADAPTER_FILE), merged, metadata={"format": "mlx"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        first_recipe = sources[0].path / "recipe.yaml"
        if first_recipe.is_file():
            # chat, fuse and export load the base with the recipe's model settings; its data (the first
            # adapter's) is what export's importance matrix and fidelity sample read.
            recipe = load_recipe(first_recipe)
            method_cfg = {"name": "lora", "rank": rank, "alpha": float(rank), "target_modules": tuple(config["target_modules"]), "num_layers": config["num_layers"]}
            recipe = recipe.replace(method=method_cfg, name=out.name, description=f"{method} merge of {', '.join(str(s.path) for s in sources)}")
            save_recipe(recipe, tmp / "recipe.yaml")
        (tmp / MERGE_RECORD).write_text(json.dumps({**record, "files": manifest(tmp)}, indent=2))
    return MergeResult(out, method, weights, rank, len(merged) // 2, [str(s.path) for s in sources])
