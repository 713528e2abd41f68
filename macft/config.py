"""The recipe: one typed, frozen dataclass that holds every setting of a run.

Each section is declared by the part of macft that reads it: ``model`` by ``macft.models.load``,
``data`` by ``macft.data``, ``method`` by the methods (every option any method declares),
``align`` by the objectives (likewise); ``train``, ``output`` and ``demo`` are declared here.

A recipe is loaded from YAML, then overridden by CLI flags (``--set train.learning_rate=2e-4``
or first-class flags such as ``--iters``). Loading is strict: an unknown key is an error naming
the key, and every value is coerced to the declared field type (so ``1e-5`` is a float even
though YAML reads it as a string). ``macft.train.plan`` settles a recipe into the run's frozen
plan, which is saved in the run directory; ``fuse``, ``chat`` and ``export`` read it back.

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

from macft.data.splits import DataConfig
from macft.errors import MacftError
from macft.methods import METHODS, MethodConfig, method_spec
from macft.models.load import ModelConfig
from macft.models.spec import DEFAULT_MODEL
from macft.objectives import OBJECTIVE_NAMES, OBJECTIVES, AlignConfig, objective_named
from macft.options import names_literal
from macft.paths import RECIPES_DIR, atomic_path
from macft.units import size_bytes

__all__ = [
    "DEFAULT_MODEL", "AlignConfig", "DataConfig", "DemoConfig", "MethodConfig", "ModelConfig", "OutputConfig", "Recipe",
    "TrainConfig", "apply_overrides", "from_dict", "load_recipe", "save_recipe", "to_dict", "validate",
]

Objective = names_literal(OBJECTIVE_NAMES)


@dataclass(frozen=True)
class TrainConfig:
    iters: int = 0  # optimizer steps; 0 = derive from epochs
    epochs: float | Literal["auto"] = 1.0  # "auto": 1-5 passes chosen from the data size and method
    batch_size: int = 4
    grad_accumulation: int = 1
    learning_rate: float | None = None  # None: the method's usual default (macft.methods)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the schedule decays to learning_rate * min_lr_ratio
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # Recompute each layer's forward pass in the backward pass instead of keeping its activations;
    # unset: the memory planner turns it on when the run would not fit its budget without it.
    grad_checkpoint: bool | None = None
    # Queries per attention block: each block's scores are recomputed in the backward pass instead of
    # kept, so no layer holds an L × L matrix (macft.models.attention); 0 = the memory planner's
    # choice, -1 = MLX's fused attention.
    attention_block: int = 0
    # The memory a run may use ("16GiB", "12GB", "5.5G"); unset: this machine's memory. The planner
    # chooses the settings left to it (checkpointing, attention blocks, micro-batches) to fit.
    memory_budget: str | None = None
    seed: int = 0
    eval_every: int = 50  # validate every N optimizer steps; 0 = only at the end
    eval_batches: int = -1  # -1 = the whole validation set
    early_stopping_patience: int = 0  # stop after N validations without improvement; 0 = off
    save_every: int = 100  # checkpoint every N steps
    report_every: int = 10
    loss_chunk_size: int = 0  # compute the loss over chunks of this many positions; 0 = auto
    compile: bool = True
    lanes: int = 0  # CPU: split each batch across this many streams run side by side; 0 = one per core (one for a quantized base)
    objective: Objective = "sft"  # what training optimises (macft.objectives): sft, dpo, orpo, simpo, grpo, kto
    step_timeout: float = 900.0  # with several ranks: seconds a step (with its validation and checkpoint) may take before a stalled rank stops the run; 0 = wait forever

    def problems(self) -> list[str]:
        checks = [
            (self.batch_size > 0, "train.batch_size must be at least 1."),
            (self.grad_accumulation > 0, "train.grad_accumulation must be at least 1."),
            (self.memory_budget is None or _is_size(self.memory_budget), "train.memory_budget must be a size such as 16GiB, 12GB or 5.5G."),
            (self.attention_block >= -1, "train.attention_block must be -1 (fused), 0 (planned) or a number of query rows."),
            (self.lanes >= 0, "train.lanes must be 0 (one per CPU core) or positive."),
            (self.learning_rate is None or self.learning_rate > 0, "train.learning_rate must be positive."),
            (self.iters >= 0, "train.iters must be 0 (use epochs) or positive."),
            (self.iters > 0 or self.epochs == "auto" or self.epochs > 0, "set train.iters or train.epochs above 0 (or train.epochs: auto)."),
            (self.warmup_steps >= 0, "train.warmup_steps must be 0 or more."),
            (0 <= self.seed < 2**32, "train.seed must be between 0 and 4294967295."),
            (self.step_timeout >= 0, "train.step_timeout must be 0 (no deadline) or a number of seconds."),
        ]
        return [message for ok, message in checks if not ok]


def _is_size(text: str) -> bool:
    try:
        return size_bytes(text) > 0
    except ValueError:
        return False


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
    # Options that name files (GRPO's "rewards.py:score") resolve the same way, as their owner says.
    for section, options in (("method", method_options()), ("align", align_options())):
        values = raw.get(section)
        if not isinstance(values, dict):
            continue
        for option in options:
            if option.resolve is not None and option.name in values:
                values[option.name] = option.resolve(values[option.name], recipe_dir)


def method_options() -> list:
    return [o for spec in METHODS.values() for o in spec.options]


def align_options() -> list:
    return [o for objective in OBJECTIVES.values() for o in objective.options]


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
    """Every section's checks, and those that span sections; each failure names the key to change."""
    method, objective = method_spec(recipe.method.name), objective_named(recipe.train.objective)
    problems = [
        *recipe.model.problems(),
        *recipe.data.problems(),
        *method.problems(recipe.method),
        *recipe.train.problems(),
        *objective.problems(recipe.align),
    ]
    if recipe.data.packing and method.packing_refused:
        problems.append(f"{method.title} cannot train on packed rows: {method.packing_refused}; set data.packing: false.")
    if recipe.data.packing and not objective.data.packing:
        problems.append(f"{objective.title} scores whole {objective.data.name} one per row; set data.packing: false.")
    finite = [
        f"{section.name}.{key} must be a finite number, not {value}."
        for section in dataclasses.fields(recipe)
        if dataclasses.is_dataclass(getattr(recipe, section.name))
        for key, value in vars(getattr(recipe, section.name)).items()
        if isinstance(value, float) and not math.isfinite(value)
    ]
    for message in finite + problems:
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
            kind = "an integer that fits in 64 bits" if hint is int else "a number"
            raise MacftError(f"{where}: '{key}' must be {kind}; got '{value}'.") from None
        return number
    if hint is str:
        if value is None or isinstance(value, (dict, list)):
            raise MacftError(f"{where}: '{key}' must be a string; got '{value}'.")
        return str(value)
    raise TypeError(f"unsupported recipe field type {hint!r} for {key}")  # a bug in this module


def _to_int(value: Any) -> int:
    number = float(value)
    if not number.is_integer() or abs(number) >= 2**63:  # MLX and numpy hold 64 bits; more ends in std::bad_cast
        raise ValueError(value)
    return int(number)

