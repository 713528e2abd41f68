"""Hugging Face PEFT LoRA/DoRA adapters, in and out.

    write_peft(to_peft("runs/quickstart", base="google/gemma-3-270m"), folder)   # adapter_config.json + adapter_model.safetensors
    run = adapter_run("org/some-peft-adapter", model=None)     # a macft adapter folder chat/eval/fuse/export read
    model = init_from_peft(model, "path/to/adapter", base)     # `macft lora --init-adapter`: training continues from it

What PEFT saves (``PeftModel.save_pretrained``) and how it maps onto macft's layers:

    base_model.model.<HF module>.lora_A.weight          (r, in)   = macft lora_a (in, r), transposed
    base_model.model.<HF module>.lora_B.weight          (out, r)  = macft lora_b (r, out), transposed
    base_model.model.<HF module>.lora_magnitude_vector  (out,)    = macft DoRA magnitude
    scale = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora) = macft alpha / rank

and both compute y = W₀x + b + s·BAx (LoRA), y = m ⊙ (W₀x + s·BAx) / ‖W₀ + s·BA‖_row + b (DoRA).
A decoder block is ``…layers.N.<path>`` in mlx-lm and in transformers alike; what comes before it
differs (mlx-lm's ``language_model.model.`` for Qwen3.5, transformers' ``model.language_model.`` for
the multimodal Gemma checkpoints), so names are matched from ``layers.N`` on. Only LoRA and DoRA on
linear layers of the decoder blocks travel; anything else is refused in one line before any
weights are read. No PEFT, torch or transformers code runs here: the tests check the files against
the real libraries.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from macft.errors import MacftError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

_BLOCK = re.compile(r"^(?P<prefix>(?:.*\.)?)(?P<block>layers\.(?P<index>\d+)\..+)$")
# Where AutoModelForCausalLM keeps the decoder blocks, by config.json model_type: the multimodal Gemma
# checkpoints load as *ForConditionalGeneration; every other supported type as a text *ForCausalLM.
_HF_DECODER = {"gemma3": "model.language_model.", "gemma4": "model.language_model."}
_DECODER_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
# mlx-lm linear layers that transformers keeps as plain parameters (PEFT's LoRA cannot wrap them)
_NOT_LINEAR_IN_HF = {"qwen3_moe": ("mlp.gate",)}
_MACFT_PARTS = ("lora_a", "lora_b", "magnitude")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)(?:\.default)?(?:\.weight)?$")


def block_name(path: str) -> str | None:
    """``layers.N.<path>`` for a module inside a decoder block (any prefix before it), else None."""
    match = _BLOCK.match(path)
    return match["block"] if match else None


def is_peft_folder(path: Path) -> bool:
    """A folder holding a PEFT ``adapter_config.json`` (macft's own run folders use the same file name)."""
    try:
        return "peft_type" in json.loads((Path(path) / PEFT_CONFIG).read_text())
    except (OSError, ValueError, TypeError):
        return False


def looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and all(source.split("/"))


# ---------------------------------------------------------------------------- out: macft adapter -> PEFT


@dataclass(frozen=True)
class PeftFiles:
    """A macft LoRA/DoRA adapter in PEFT's form: the weights file's tensors and adapter_config.json."""

    tensors: dict[str, Any]  # PEFT key -> mx.array (float32)
    config: dict  # adapter_config.json
    method: str
    modules: int  # adapted layers


def peft_method(adapter_config: dict) -> str:
    """The adapter's method when PEFT can carry it (lora, dora); any other is one line naming it."""
    from macft.methods import METHODS

    method = adapter_config.get("method", "?")
    if method not in ("lora", "dora"):
        title = METHODS[method].title if method in METHODS else method
        raise MacftError(
            f"PEFT has no LoRA/DoRA form for this run's method '{method}' ({title}); `macft export peft` writes LoRA and DoRA "
            "adapters: use the run with macft's own commands (chat, eval), or train with --method lora or dora."
        )
    return method


def to_peft(run_dir: str | Path, base: str, revision: str | None = None) -> PeftFiles:
    """The adapter in ``run_dir`` (macft's format) as PEFT saves it for ``base`` (base_model_name_or_path).
    A method or a layer PEFT cannot carry is refused in one line; the method before any weights are read."""
    import mlx.core as mx

    from macft.adapters.files import adapter_files

    weights_file, config_file = adapter_files(Path(run_dir))
    config = json.loads(config_file.read_text())
    method = peft_method(config)
    recorded = config.get("base_model") or {}
    family, model_type = recorded.get("family", ""), _model_type(recorded)
    prefix = KEY_PREFIX + _HF_DECODER.get(model_type, "model.")
    layers = _macft_layers(mx.load(str(weights_file)), weights_file)
    tensors = {}
    for path, parts in layers.items():
        block, lora_a = block_name(path), parts["lora_a"]
        if block is None or lora_a.ndim != 2:
            why = "a mixture-of-experts stack, which transformers keeps as 3-D parameters, not linear layers" if lora_a.ndim == 3 else "outside the decoder blocks"
            raise MacftError(f"This run adapts {path}, {why}; PEFT's LoRA cannot load it there. Train with method.target_modules that leave it out to export for PEFT.")
        rest = block.split(".", 2)[2]
        if any(rest == name or rest.startswith(name + ".") for name in _NOT_LINEAR_IN_HF.get(family, ())):
            raise MacftError(f"This run adapts {path}, which transformers' {family} keeps as a parameter, not a linear layer, so PEFT cannot load it; train without it to export for PEFT.")
        tensors[f"{prefix}{block}.lora_A.weight"] = lora_a.T.astype(mx.float32)
        tensors[f"{prefix}{block}.lora_B.weight"] = parts["lora_b"].T.astype(mx.float32)
        if method == "dora":
            tensors[f"{prefix}{block}.lora_magnitude_vector"] = parts["magnitude"].astype(mx.float32)
    return PeftFiles(tensors, lora_config(config, base, revision, sorted(layers), model_type), method, len(layers))


def write_peft(files: PeftFiles, folder: Path) -> None:
    """Write adapter_model.safetensors and adapter_config.json into ``folder`` as PEFT's save_pretrained does."""
    import mlx.core as mx

    mx.save_safetensors(str(folder / PEFT_WEIGHTS), files.tensors, metadata={"format": "pt"})
    (folder / PEFT_CONFIG).write_text(json.dumps(files.config, indent=2, sort_keys=True) + "\n")


def _macft_layers(weights: dict, where: Path) -> dict[str, dict]:
    """macft's adapter weights grouped by module: {module path: {"lora_a", "lora_b"[, "magnitude"]}}."""
    layers: dict[str, dict] = {}
    for name, value in weights.items():
        path, _, part = name.rpartition(".")
        if part not in _MACFT_PARTS:
            raise MacftError(f"{where} holds '{name}', which is not part of a LoRA/DoRA layer.")
        layers.setdefault(path, {})[part] = value
    return layers


def _model_type(recorded: dict) -> str:
    """config.json's model_type of the run's base (the family's first type when the folder is gone)."""
    try:
        return str(json.loads((Path(recorded["path"]) / "config.json").read_text())["model_type"])
    except (KeyError, TypeError, OSError, ValueError):
        from macft.families import FAMILIES

        family = FAMILIES.get(recorded.get("family", ""))
        return family.model_types[0] if family else ""


def lora_config(config: dict, base: str, revision: str | None, module_paths: list[str], model_type: str) -> dict:
    """PEFT's ``LoraConfig`` (as ``save_pretrained`` writes it) for a macft adapter config and its adapted modules."""
    blocks = [block_name(p) for p in module_paths]
    leaves = sorted({b.rsplit(".", 1)[-1] for b in blocks})
    indices = sorted({int(b.split(".")[1]) for b in blocks})
    prefix = _HF_DECODER.get(model_type, "model.")
    if prefix == "model.":
        # a text model: its only `layers.N` are the decoder blocks, so PEFT's short names say exactly what is adapted
        targets: Any = leaves
        layers = None if int(config.get("num_layers", -1)) < 0 else indices
    else:
        # a multimodal checkpoint: its vision tower has layers of the same names, so name the decoder's alone
        rests = sorted({b.split(".", 2)[2] for b in blocks})
        targets = rf"{re.escape(prefix)}layers\.({'|'.join(map(str, indices))})\.({'|'.join(map(re.escape, rests))})"
        layers = None
    alpha = float(config["alpha"])
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": "layers" if layers is not None else None,
        "layers_to_transform": layers,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(config.get("dropout", 0.0)),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": int(config["rank"]),
        "rank_pattern": {},
        "revision": revision,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": config.get("method") == "dora",
        "use_rslora": False,
    }


# ---------------------------------------------------------------------------- in: PEFT -> macft


@dataclass(frozen=True)
class PeftLayer:
    lora_a: Any  # (r, in), as PEFT stores it
    lora_b: Any  # (out, r)
    magnitude: Any = None  # (out,), DoRA


@dataclass(frozen=True)
class PeftAdapter:
    source: str  # as the user named it
    folder: Path
    base: str | None  # base_model_name_or_path
    revision: str | None
    method: str  # "lora" or "dora"
    rank: int
    scale: float
    dropout: float
    layers: dict[str, PeftLayer]  # by block name, "layers.N.self_attn.q_proj"
    digest: str  # sha256 of the config and weight files

    @property
    def alpha(self) -> float:
        """macft's alpha for the same scale (alpha / rank)."""
        return self.scale * self.rank

    def method_settings(self, blocks: int | None = None) -> dict[str, Any]:
        """The ``method`` recipe section that re-creates these layers; ``blocks``: the base's decoder block count,
        needed only when the adapter leaves the first blocks out."""
        names = list(self.layers)
        first = min(int(b.split(".")[1]) for b in names)
        if first > 0 and blocks is None:
            raise MacftError(f"{self.source} adapts blocks {first} and up only; the base's block count is needed.")
        return {
            "name": self.method,
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": tuple(sorted({b.rsplit(".", 1)[-1] for b in names})),
            "num_layers": -1 if first == 0 else blocks - first,
        }


def locate(source: str) -> Path:
    """The local folder of a PEFT adapter: ``source`` itself, or its snapshot from the Hugging Face Hub."""
    path = Path(source).expanduser()
    if path.exists():
        if not (path / PEFT_CONFIG).is_file():
            raise MacftError(f"{source} has no {PEFT_CONFIG}: pass a macft run directory, a PEFT adapter folder or a hub id.")
        return path
    if not looks_like_hub_id(source):
        raise MacftError(f"No adapter at {source}: pass a macft run directory, a PEFT adapter folder or a hub id (org/name).")
    from huggingface_hub import snapshot_download

    from macft.phases import phase

    try:
        with phase(f"Fetching the adapter {source}"):
            return Path(snapshot_download(source, allow_patterns=[PEFT_CONFIG, PEFT_WEIGHTS, PICKLED_WEIGHTS]))
    except Exception as exc:  # the hub client raises many types (offline, missing repo, no access): the user needs one line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MacftError(f"No adapter at {source}: no such folder here, and fetching it from the Hugging Face Hub failed ({reason}).") from None


def read_peft(source: str) -> PeftAdapter:
    """Read a PEFT LoRA/DoRA adapter (folder or hub id); anything macft cannot carry is one line naming it."""
    import mlx.core as mx

    folder = locate(str(source))
    config_file, weights_file = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise MacftError(f"{config_file} is not readable JSON ({exc}).") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise MacftError(f"{config_file} is not a PEFT adapter config (it has no peft_type).")
    _check_supported(config, source)
    if not weights_file.is_file():
        if (folder / PICKLED_WEIGHTS).is_file():
            raise MacftError(
                f"{source} holds its weights as a pickled {PICKLED_WEIGHTS}, which macft does not unpickle; "
                "save it with PEFT's save_pretrained(..., safe_serialization=True) for adapter_model.safetensors."
            )
        raise MacftError(f"{source} has no {PEFT_WEIGHTS}.")
    try:
        weights = mx.load(str(weights_file))
    except (RuntimeError, ValueError) as exc:
        raise MacftError(f"Could not read {weights_file} ({str(exc).splitlines()[0]}).") from None
    rank, dora = int(config["r"]), bool(config.get("use_dora"))
    layers = _peft_layers(weights, source, rank, dora)
    alpha = float(config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    digest = hashlib.sha256(config_file.read_bytes() + _file_digest(weights_file).encode()).hexdigest()
    return PeftAdapter(
        str(source), folder, config.get("base_model_name_or_path"), config.get("revision"), "dora" if dora else "lora",
        rank, scale, float(config.get("lora_dropout") or 0.0), layers, digest,
    )


def _check_supported(config: dict, source: str) -> None:
    kind = config.get("peft_type")
    if kind != "LORA":
        raise MacftError(f"{source} is a PEFT {kind} adapter; macft reads LoRA and DoRA adapters.")
    refusals = {
        "rank_pattern": "a rank per module (rank_pattern)",
        "alpha_pattern": "an alpha per module (alpha_pattern)",
        "modules_to_save": "whole trained copies of some modules (modules_to_save)",
        "target_parameters": "LoRA on parameters (target_parameters, e.g. mixture-of-experts stacks)",
        "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
        "layer_replication": "replicated layers (layer_replication)",
        "lora_bias": "trained LoRA biases (lora_bias)",
        "fan_in_fan_out": "Conv1D-style transposed layers (fan_in_fan_out)",
    }
    for key, what in refusals.items():
        if config.get(key):
            raise MacftError(f"{source} uses {what}, which macft's LoRA layers cannot carry.")
    if config.get("bias", "none") != "none":
        raise MacftError(f"{source} also trains biases (bias: {config['bias']}), which macft's LoRA layers cannot carry.")


def _peft_layers(weights: dict, source: str, rank: int, dora: bool) -> dict[str, PeftLayer]:
    parts: dict[str, dict] = {}
    for key, value in weights.items():
        match = _PEFT_KEY.match(key.removeprefix(KEY_PREFIX))
        if match is None:
            what = "the embeddings" if "lora_embedding" in key else f"'{key}'"
            raise MacftError(f"{source} holds {what}, which is not a LoRA/DoRA weight of a linear layer macft can load.")
        parts.setdefault(match["module"], {})[match["part"]] = value
    layers = {}
    for module, found in parts.items():
        prefix_match = _BLOCK.match(module)
        if prefix_match is None or prefix_match["prefix"] not in _DECODER_PREFIXES:
            raise MacftError(f"{source} adapts {module}, outside the decoder blocks macft adapts (e.g. model.layers.N.self_attn.q_proj).")
        if "lora_A" not in found or "lora_B" not in found or dora != ("lora_magnitude_vector" in found):
            raise MacftError(f"{source}: the layer {module} lacks part of its {'DoRA' if dora else 'LoRA'} weights.")
        a, b = found["lora_A"], found["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise MacftError(f"{source}: {module}'s lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not rank {rank} (r in {PEFT_CONFIG}).")
        layers[prefix_match["block"]] = PeftLayer(a, b, found.get("lora_magnitude_vector"))
    if not layers:
        raise MacftError(f"{source} holds no LoRA weights.")
    return layers


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def linear_layers(model) -> dict[str, tuple[str, Any]]:
    """{block name: (module path, module)} for every linear layer (or LoRA layer) in the decoder blocks."""
    import mlx.nn as nn

    from macft.methods.lora import LoRALinear

    table = {}
    for path, module in model.named_modules():
        block = block_name(path)
        if block is not None and isinstance(module, (nn.Linear, nn.QuantizedLinear, LoRALinear)):
            table[block] = (path, module)
    return table


def fit(adapter: PeftAdapter, model, base: str) -> dict[str, tuple[str, Any]]:
    """Each adapter layer's (module path, module) in ``model``; a layer ``model`` lacks, or whose
    shape differs, is one line naming the adapter's base and ``base``."""
    from macft.methods.lora import LoRALinear, linear_dims

    table = linear_layers(model)
    placed = {}
    for block, layer in adapter.layers.items():
        if block not in table:
            _mismatch(adapter, base, f"it adapts {block}, a linear layer {base} does not have")
        path, module = table[block]
        dims = linear_dims(module.base if isinstance(module, LoRALinear) else module)
        theirs = (int(layer.lora_a.shape[1]), int(layer.lora_b.shape[0]))
        if theirs != dims:
            _mismatch(adapter, base, f"its {block} maps {theirs[0]}→{theirs[1]} features, {base}'s {dims[0]}→{dims[1]}")
        placed[block] = (path, module)
    return placed


def _mismatch(adapter: PeftAdapter, base: str, detail: str) -> None:
    trained = f"was trained on {adapter.base}" if adapter.base else "names no base model"
    if adapter.base == base:
        raise MacftError(f"The PEFT adapter {adapter.source} does not fit its base {base}: {detail}.")
    raise MacftError(f"The PEFT adapter {adapter.source} {trained} and does not fit {base}: {detail}; pass --model with the base it was trained on.")


def adapter_run(source: str | Path, model: str | None = None) -> Path:
    """A macft adapter folder for ``--adapter SOURCE``: a macft run (or checkpoint) as it is; a PEFT
    adapter (folder or hub id) converted once for its base (``model``, else its base_model_name_or_path)
    into ``<home>/peft/<key>/``, whose adapter_config.json records that base for chat, eval, fuse and export."""
    path = Path(source).expanduser()
    if not is_peft_source(source):
        return path  # macft's own format (macft.methods.adapter_files says what a broken or missing one lacks)
    adapter = read_peft(str(source))
    base = model or adapter.base
    if not base:
        raise MacftError(f"The PEFT adapter {source} names no base model (base_model_name_or_path); pass --model.")
    try:
        return _converted(adapter, base, adapter.revision if model is None else None)
    except MacftError as exc:
        if model is not None or "does not fit" in str(exc):
            raise
        # e.g. a path on the machine it was trained on, or a bitsandbytes 4-bit checkpoint (Unsloth's "-bnb-4bit")
        reason = str(exc).split(":")[0].rstrip(".")
        raise MacftError(f"The PEFT adapter {source} was trained on '{base}', which macft cannot open here ({reason}); pass --model with that model's float weights.") from None


def _converted(adapter: PeftAdapter, base: str, revision: str | None) -> Path:
    import mlx.core as mx
    from mlx_lm.utils import load_model as mlx_load_model

    from macft import __version__
    from macft.adapters.files import ADAPTER_FILE, CONFIG_FILE
    from macft.models.load import model_family, resolve_model_dir
    from macft.paths import atomic_path, cache_dir, mark_used
    from macft.phases import phase

    model_dir, sha = resolve_model_dir(base, revision=revision)
    folder = cache_dir("peft") / hashlib.sha256(f"{adapter.digest} {base} {sha} {__version__}".encode()).hexdigest()[:24]
    if (folder / ADAPTER_FILE).is_file() and (folder / CONFIG_FILE).is_file():
        mark_used(folder)
        return folder
    with phase(f"Converting the PEFT adapter {adapter.source}"):
        skeleton, config = mlx_load_model(Path(model_dir), lazy=True, strict=False)  # the module tree: nothing is read
        placed = fit(adapter, skeleton, base)
        weights = {}
        for block, (path, _) in placed.items():
            layer = adapter.layers[block]
            weights[f"{path}.lora_a"] = layer.lora_a.T.astype(mx.float32)
            weights[f"{path}.lora_b"] = layer.lora_b.T.astype(mx.float32)
            if layer.magnitude is not None:
                weights[f"{path}.magnitude"] = layer.magnitude.astype(mx.float32)
        settings = adapter.method_settings(len(skeleton.layers))
        record = {
            "method": settings["name"],
            **{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items() if k != "name"},
            "scale": adapter.scale,
            "base_model": {"source": base, "path": str(model_dir), "family": model_family(config), "sha256": sha},
            "quantize_bits": None,
            "quantize_group_size": 64,
            "peft": {"source": adapter.source, "base_model_name_or_path": adapter.base},
            "macft_version": __version__,
        }
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            mx.save_safetensors(str(tmp / ADAPTER_FILE), weights, metadata={"format": "mlx"})
            (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2))
    return folder


def source_name(source: str | Path) -> str:
    """A short name for outputs made from an adapter source (a folder's name, a hub id's name)."""
    return Path(str(source).rstrip("/")).name or "adapter"


def is_peft_source(source: str | Path) -> bool:
    """Whether ``--adapter SOURCE`` names a PEFT adapter: a PEFT folder (not a macft run or checkpoint, which
    hold adapters.safetensors) or, when no such path exists, a hub id."""
    from macft.adapters.files import ADAPTER_FILE

    path = Path(source).expanduser()
    if path.exists():
        return path.is_dir() and not (path / ADAPTER_FILE).is_file() and is_peft_folder(path)
    return looks_like_hub_id(str(source))


# ---------------------------------------------------------------------------- training from a PEFT adapter


def peft_recipe(recipe, explicit: dict[str, Any], model_given: bool):
    """The recipe for ``macft lora --init-adapter``: the method section re-creates the adapter's layers
    and the base is ``--model`` when given, else the adapter's; ``explicit`` (method keys the command
    line set) may not contradict the adapter. Returns (recipe, notes)."""
    adapter = read_peft(recipe.method.init_adapter)
    base = recipe.model.path if model_given else adapter.base
    if not base:
        raise MacftError(f"The PEFT adapter {adapter.source} names no base model (base_model_name_or_path); pass --model.")
    blocks = None
    if min(int(b.split(".")[1]) for b in adapter.layers) > 0:
        from macft.families.base import text_config
        from macft.models.load import resolve_model_dir

        model_dir, _ = resolve_model_dir(base, revision=None if model_given else adapter.revision)
        blocks = int(text_config(json.loads((model_dir / "config.json").read_text()))["num_hidden_layers"])
    settings = adapter.method_settings(blocks)
    for key, value in explicit.items():
        if key in settings and key != "dropout" and not _same_setting(value, settings[key]):
            raise MacftError(
                f"The command line sets method.{key} to {value!r}, but the adapter {adapter.source} has {settings[key]!r}; "
                f"training continues the adapter as it is, so leave method.{key} out."
            )
    changes: dict[str, dict] = {"method": {k: v for k, v in settings.items() if not (k == "dropout" and k in explicit)}}
    if Path(adapter.source).expanduser().exists():  # a resume from another folder still finds it
        changes["method"]["init_adapter"] = str(Path(adapter.source).expanduser().resolve())
    if not model_given:
        changes["model"] = {"path": base, "revision": adapter.revision}
    notes = [
        f"Continuing the PEFT adapter {adapter.source}: {settings['name']}, rank {settings['rank']}, alpha {settings['alpha']:g}, "
        f"{', '.join(settings['target_modules'])} in {len(adapter.layers)} layers"
        + ("" if model_given else f", on its base {base}")
        + "."
    ]
    return recipe.replace(**changes), notes


def _same_setting(given: Any, adapters: Any) -> bool:
    if isinstance(adapters, tuple):
        return set(given) == set(adapters)
    if isinstance(adapters, float):
        return math.isclose(float(given), adapters, rel_tol=1e-6)
    return given == adapters


def init_from_peft(model, source: str, base: str):
    """Load a PEFT adapter's weights into the LoRA/DoRA layers ``apply_method`` inserted; layers the
    adapter does not have go back to their frozen base, so training continues exactly its layers."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from macft.methods.lora import DoRALinear, LoRALinear

    adapter = read_peft(source)
    placed = fit(adapter, model, base)
    for block, (path, module) in placed.items():
        layer = adapter.layers[block]
        kind = DoRALinear if adapter.method == "dora" else LoRALinear
        if not isinstance(module, kind) or isinstance(module, DoRALinear) != (adapter.method == "dora"):
            raise MacftError(f"The recipe's method does not put a {adapter.method} layer at {path}, where the adapter {adapter.source} has one.")
        if module.rank != adapter.rank or not math.isclose(module.scale, adapter.scale, rel_tol=1e-6):
            raise MacftError(f"The recipe's rank {module.rank} and scale {module.scale:g} differ from the adapter's {adapter.rank} and {adapter.scale:g}.")
        dtype = module.lora_a.dtype
        module.lora_a = layer.lora_a.T.astype(dtype)
        module.lora_b = layer.lora_b.T.astype(dtype)
        if layer.magnitude is not None:
            module.magnitude = layer.magnitude.astype(module.magnitude.dtype)
    unused = [(path, module.base) for block, (path, module) in linear_layers(model).items() if isinstance(module, LoRALinear) and block not in placed]
    if unused:
        model.update_modules(tree_unflatten(unused))
    mx.eval(model.trainable_parameters())
    return model
