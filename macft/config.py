"""The recipe: one typed, frozen dataclass that holds every setting of a run.

A recipe is loaded from YAML, then overridden by CLI flags (``--set train.learning_rate=2e-4``
or first-class flags such as ``--iters``). Loading is strict: an unknown key is an error naming
the key, and every value is coerced to the declared field type (so ``1e-5`` is a float even
though YAML reads it as a string). The resolved recipe is saved in the run directory, and
``fuse``, ``chat`` and ``export`` read it back from there.

    recipe = load_recipe("recipes/quickstart.yaml", overrides=["train.iters=50"])
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from macft.errors import MacftError
from macft.method_registry import METHOD_NAMES
from macft.paths import RECIPES_DIR, atomic_path

DEFAULT_MODEL = "gemma3-270m"  # the embedded Gemma 3 270M base (Q4_K_M GGUF package)

Method = Literal[METHOD_NAMES]  # type: ignore[valid-type]  # the names in macft.method_registry
Objective = Literal["sft", "dpo", "orpo", "simpo", "grpo"]


@dataclass(frozen=True)
class ModelConfig:
    path: str = DEFAULT_MODEL  # hub id, local MLX/HF directory, a .gguf file, or "gemma3-270m"
    revision: str | None = None  # hub revision
    quantize_bits: int | None = None  # QLoRA: quantize the frozen base to 4 or 8 bits at load
    quantize_group_size: int = 64
    dequantize: bool = False  # GGUF import: a float model instead of exact quantized weights
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DataConfig:
    train: str | None = None  # a .jsonl file, or a folder with train.jsonl [valid.jsonl test.jsonl]
    valid: str | None = None
    test: str | None = None
    split_valid: float = 0.0  # hold out this fraction of train as validation when none is given
    split_seed: int = 0
    max_seq_length: int = 512
    mask_prompt: bool = True  # train on completions / assistant turns only
    use_chat_template: bool | None = None  # None: use it when the tokenizer has one
    packing: bool = False  # pack several examples per row (attention never crosses them)
    bucket_by_length: bool = True  # batch examples of similar length to save padding


@dataclass(frozen=True)
class MethodConfig:
    name: Method = "lora"
    rank: int = 8
    alpha: float = 16.0  # LoRA scale = alpha / rank
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    num_layers: int = -1  # adapt (or for "full", train) the last N layers; -1 = all
    # prompt tuning / P-tuning
    num_virtual_tokens: int = 20
    init_text: str | None = None  # initialise soft-prompt embeddings from this text's tokens
    ptuning_hidden_size: int = 128
    # prefix tuning
    prefix_length: int = 16
    # bottleneck adapters
    adapter_size: int = 64
    adapter_placement: Literal["mlp", "attention", "both"] = "mlp"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class TrainConfig:
    iters: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float | Literal["auto"] = 1.0  # "auto": 1-5 passes chosen from the data size and method
    batch_size: int = 4
    grad_accumulation: int = 1
    learning_rate: float | None = None  # None: the method's usual default (macft.method_registry)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the schedule decays to learning_rate * min_lr_ratio
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    grad_checkpoint: bool = False
    seed: int = 0
    eval_every: int = 50  # validate every N optimizer steps; 0 = only at the end
    eval_batches: int = -1  # -1 = the whole validation set
    early_stopping_patience: int = 0  # stop after N validations without improvement; 0 = off
    save_every: int = 100  # checkpoint every N steps
    report_every: int = 10
    loss_chunk_size: int = 0  # compute the loss over chunks of this many positions; 0 = auto
    compile: bool = True
    lanes: int = 0  # CPU: split each batch across this many streams run side by side; 0 = one per core (one for a quantized base)
    objective: Objective = "sft"  # sft, or preference pairs (dpo, orpo, simpo), or rewards (grpo); see align
    step_timeout: float = 900.0  # with several ranks: seconds a step (with its validation and checkpoint) may take before a stalled rank stops the run; 0 = wait forever


@dataclass(frozen=True)
class AlignConfig:
    """Settings of the alignment objectives (``train.objective``); see macft/align/."""

    beta: float = 0.1  # DPO/IPO: KL strength; ORPO: odds-ratio weight; SimPO: reward scale; GRPO: KL weight
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0  # DPO/SimPO: the share of pairs assumed mislabelled
    simpo_gamma: float = 0.5  # SimPO: the target reward margin
    group_size: int = 4  # GRPO: completions sampled per prompt
    temperature: float = 1.0  # GRPO: sampling temperature
    max_completion_tokens: int = 64  # GRPO: longest sampled completion
    clip_epsilon: float = 0.2  # GRPO: the ratio is clipped to [1 - eps, 1 + eps]
    # GRPO rewards, summed: built-ins (exact_match[=field], json_valid, json_keys=a,b, regex=PATTERN,
    # length_penalty=TOKENS) or your own "module:function" / "file.py:function" (completion, example) -> float
    rewards: tuple[str, ...] = ("exact_match",)


@dataclass(frozen=True)
class OutputConfig:
    runs_dir: str = "runs"
    name: str | None = None  # run directory name; default: <recipe>-<timestamp>
    resume: str | None = None  # a run directory to resume from its last checkpoint


@dataclass(frozen=True)
class DemoConfig:
    """Held-out prompts answered by the base and the tuned model after training."""

    prompts: str | None = None  # prompt/completion .jsonl; default: data.test
    count: int = 5
    max_tokens: int = 48


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    name: str = "run"
    description: str = ""

    def replace(self, **sections: Any) -> "Recipe":
        """``recipe.replace(train={"iters": 10})``: a copy with some fields of some sections changed."""
        updates = {}
        for key, value in sections.items():
            current = getattr(self, key)
            updates[key] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
        return dataclasses.replace(self, **updates)


# ---------------------------------------------------------------------------- loading


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe by file path, or by name from the recipes folder (``quickstart``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise MacftError(f"Recipe file {path} does not exist.")
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise MacftError(f"No recipe named '{name_or_path}'; known recipes: {known}.")


def load_recipe(source: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (or name), apply ``section.key=value`` overrides, validate it."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if source is not None:
        path = recipe_path(source)
        where = str(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise MacftError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)}).") from None
        if not isinstance(raw, dict):
            raise MacftError(f"{path}: a recipe must be a mapping of sections (model, data, method, train, output).")
        raw.setdefault("name", path.stem)
        _resolve_data_paths(raw, path.parent)
    recipe = from_dict(raw, where)
    if overrides:
        recipe = apply_overrides(recipe, overrides)
    return validate(recipe)


def _resolve_data_paths(raw: dict[str, Any], recipe_dir: Path) -> None:
    """A relative data path in a recipe file means "next to the recipe" when it exists there,
    so bundled recipes work from any directory; otherwise it stays relative to where macft runs."""
    for section, keys in (("data", ("train", "valid", "test")), ("demo", ("prompts",))):
        values = raw.get(section)
        if not isinstance(values, dict):
            continue
        for key in keys:
            value = values.get(key)
            if isinstance(value, str) and not Path(value).is_absolute() and (recipe_dir / value).exists():
                values[key] = str((recipe_dir / value).resolve())
    align = raw.get("align")
    if isinstance(align, dict) and isinstance(align.get("rewards"), list):
        # A reward function in a file next to the recipe ("rewards.py:score") resolves like data.
        for i, spec in enumerate(align["rewards"]):
            target, colon, function = str(spec).rpartition(":")
            if colon and target.endswith(".py") and not Path(target).is_absolute() and (recipe_dir / target).is_file():
                align["rewards"][i] = f"{(recipe_dir / target).resolve()}:{function}"


def from_dict(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    return _build(Recipe, raw, where, prefix="")


def to_dict(recipe: Recipe) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return list(value)
        return value

    return {
        f.name: (
            {k: plain(v) for k, v in dataclasses.asdict(getattr(recipe, f.name)).items()}
            if dataclasses.is_dataclass(getattr(recipe, f.name))
            else getattr(recipe, f.name)
        )
        for f in dataclasses.fields(recipe)
    }


def save_recipe(recipe: Recipe, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply ``section.key=value`` strings (values parsed as YAML, then coerced)."""
    raw = to_dict(recipe)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise MacftError(f"Override '{item}' must look like section.key=value (e.g. train.learning_rate=2e-4).")
        set_dotted(raw, key.strip(), yaml.safe_load(text) if text.strip() else None, where="--set")
    return from_dict(raw, "--set")


def set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node: Any = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise MacftError(f"{where}: unknown recipe section '{part}' in '{key}'.")
        node = node[part]
    node[parts[-1]] = value


def validate(recipe: Recipe) -> Recipe:
    """Checks that span fields; each failure names the key to change."""
    checks = [
        (recipe.method.rank > 0, "method.rank must be a positive integer."),
        (0.0 <= recipe.method.dropout < 1.0, "method.dropout must be in [0, 1)."),
        (recipe.train.batch_size > 0, "train.batch_size must be at least 1."),
        (recipe.train.grad_accumulation > 0, "train.grad_accumulation must be at least 1."),
        (recipe.train.lanes >= 0, "train.lanes must be 0 (one per CPU core) or positive."),
        (recipe.train.learning_rate is None or recipe.train.learning_rate > 0, "train.learning_rate must be positive."),
        (recipe.train.iters >= 0, "train.iters must be 0 (use epochs) or positive."),
        (
            recipe.train.iters > 0 or recipe.train.epochs == "auto" or recipe.train.epochs > 0,
            "set train.iters or train.epochs above 0 (or train.epochs: auto).",
        ),
        (recipe.data.max_seq_length >= 8, "data.max_seq_length must be at least 8."),
        (0.0 <= recipe.data.split_valid < 1.0, "data.split_valid must be a fraction in [0, 1)."),
        (recipe.model.quantize_bits in (None, 2, 3, 4, 5, 6, 8), "model.quantize_bits must be 4 or 8 (or 2, 3, 5, 6)."),
        (recipe.model.quantize_group_size in (32, 64, 128), "model.quantize_group_size must be 32, 64 or 128."),
        (recipe.method.num_virtual_tokens >= 0, "method.num_virtual_tokens must be 0 or more."),
        (recipe.method.prefix_length > 0, "method.prefix_length must be at least 1."),
        (recipe.method.adapter_size > 0, "method.adapter_size must be at least 1."),
        (
            not (recipe.data.packing and recipe.method.name in ("prompt", "ptuning", "prefix")),
            "prompt, P- and prefix tuning need one example per row; set data.packing: false.",
        ),
        (recipe.train.warmup_steps >= 0, "train.warmup_steps must be 0 or more."),
        (recipe.train.step_timeout >= 0, "train.step_timeout must be 0 (no deadline) or a number of seconds."),
        (recipe.align.beta > 0, "align.beta must be positive."),
        (0.0 <= recipe.align.label_smoothing < 0.5, "align.label_smoothing must be in [0, 0.5)."),
        (recipe.align.group_size >= 2, "align.group_size must be at least 2 (GRPO compares completions within a group)."),
        (recipe.align.max_completion_tokens >= 1, "align.max_completion_tokens must be at least 1."),
        (
            recipe.train.objective == "sft" or not recipe.data.packing,
            "alignment objectives score whole answers one per row; set data.packing: false.",
        ),
    ]
    finite = [
        (math.isfinite(value), f"{section.name}.{key} must be a finite number, not {value}.")
        for section in dataclasses.fields(recipe)
        if dataclasses.is_dataclass(getattr(recipe, section.name))
        for key, value in vars(getattr(recipe, section.name)).items()
        if isinstance(value, float)
    ]
    for ok, message in finite + checks:
        if not ok:
            raise MacftError(f"Invalid recipe '{recipe.name}': {message}")
    return recipe


# ---------------------------------------------------------------------------- coercion


def _build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise MacftError(f"{where}: '{prefix.rstrip('.') or 'recipe'}' must be a mapping, got {type(raw).__name__}.")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = prefix + unknown[0]
        known = ", ".join(sorted(names))
        raise MacftError(f"{where}: unknown recipe key '{key}' (known in this section: {known}).")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, {} if value is None else value, where, prefix=f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, where, prefix + name)
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str, key: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where, key)
            except MacftError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise MacftError(f"{where}: '{key}' must be one of {choices}; got '{value}'.")
        return value
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise MacftError(f"{where}: '{key}' must be a list; got '{value}'.")
        return tuple(_coerce(v, args[0], where, key) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise MacftError(f"{where}: '{key}' must be true or false; got '{value}'.")
    if hint in (int, float):
        if isinstance(value, bool):
            raise MacftError(f"{where}: '{key}' must be a number; got '{value}'.")
        try:
            number = float(value) if hint is float else _to_int(value)
        except (TypeError, ValueError):
            kind = "an integer" if hint is int else "a number"
            raise MacftError(f"{where}: '{key}' must be {kind}; got '{value}'.") from None
        return number
    if hint is str:
        if value is None or isinstance(value, (dict, list)):
            raise MacftError(f"{where}: '{key}' must be a string; got '{value}'.")
        return str(value)
    raise TypeError(f"unsupported recipe field type {hint!r} for {key}")  # a bug in this module


def _to_int(value: Any) -> int:
    number = float(value)
    if not number.is_integer():
        raise ValueError(value)
    return int(number)

