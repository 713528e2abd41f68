"""The fine-tuning methods macft knows: one entry each, read by every part that needs to know about methods.

    spec = method_spec("prefix")
    spec.learning_rate, spec.learning_rate_range     # 1e-2, (1e-3, 3e-2)
    spec.fusable, spec.not_fusable_because           # False, "Prefix tuning has nothing to merge ..."
    spec.trainable_parameters(shape, plan)           # what the memory planner counts, without a model

Config validation (``macft.config``), the CLI's ``--method`` choices (``macft lora``, ``macft estimate``),
the memory planner (``macft.memory``), fuse and export refusals and the learning-rate defaults all read
this table; ``macft.methods.APPLY`` holds the code that inserts each method into a model. This module
imports no MLX, so ``macft --help`` and recipe loading stay light.

The learning rates are each method's usual order of magnitude: the README's method comparison on Gemma 3
270M (prompt tuning 3e-2, prefix 1e-2, P-tuning and bottleneck adapters 1e-3, LoRA 2e-4) and full
fine-tuning, which overwrites a pretrained model at LoRA's rates (1e-5 trains it, 2e-4 wrecks it in three
steps). The ranges are where those methods are usually tuned (LoRA 1e-4 to 1e-3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from macft.memory import ModelShape, Plan


@dataclass(frozen=True)
class MethodSpec:
    name: str
    title: str  # how the README and messages name it
    options: tuple[str, ...]  # the ``method.*`` recipe keys it reads besides ``name``
    learning_rate: float  # the usual default
    learning_rate_range: tuple[float, float]  # where it is usually tuned; outside it macft warns
    # Examples a run sees with ``--epochs auto`` (1-5 passes over the data, whichever is closest).
    examples_to_see: int
    trainable_parameters: Callable[["ModelShape", "Plan"], int]
    fusable: bool  # can be merged into the base weights (fuse, full-model GGUF export)
    not_fusable_because: str = ""  # the one-line refusal when it cannot

    def check_options(self, keys: list[str], where: str) -> None:
        """Refuse ``method.*`` settings this method never reads (``--rank`` with prompt tuning, say)."""
        from macft.errors import MacftError

        unused = [k for k in keys if k != "name" and k not in self.options]
        if unused:
            reads = ", ".join(f"method.{o}" for o in self.options)
            raise MacftError(f"{where} sets method.{unused[0]}, which {self.title} does not use; it reads {reads}.")

    def refuse_fusing(self) -> None:
        from macft.errors import MacftError

        if not self.fusable:
            raise MacftError(self.not_fusable_because)


def _adapted_layers(shape: "ModelShape", plan: "Plan") -> int:
    return shape.layers if plan.num_layers < 0 else min(plan.num_layers, shape.layers)


def _lora(shape: "ModelShape", plan: "Plan") -> int:
    modules = shape.module_shapes()
    per_layer = 0
    for name in plan.target_modules:
        fan_in, fan_out = modules.get(name, (shape.hidden, shape.hidden))
        # DoRA adds a magnitude per output row; a mixture-of-experts MLP adapts every expert.
        per_layer += (plan.rank * (fan_in + fan_out) + (fan_out if plan.method == "dora" else 0)) * shape.copies(name)
    return _adapted_layers(shape, plan) * per_layer


def _full(shape: "ModelShape", plan: "Plan") -> int:
    layers = _adapted_layers(shape, plan)
    # Training every layer includes the embeddings; training the last N layers does not.
    return shape.params if layers == shape.layers else layers * shape.layer_params


def _prompt(shape: "ModelShape", plan: "Plan") -> int:
    return plan.num_virtual_tokens * shape.hidden


def _ptuning(shape: "ModelShape", plan: "Plan") -> int:
    # Seed embeddings plus the residual MLP hidden -> ptuning_hidden_size -> hidden (with biases).
    h, k = shape.hidden, plan.ptuning_hidden_size
    return plan.num_virtual_tokens * h + (h * k + k) + (k * h + h)


def _prefix(shape: "ModelShape", plan: "Plan") -> int:
    # A key and a value prefix in every attention layer.
    return shape.layers * 2 * plan.prefix_length * shape.kv_dim


def _adapter(shape: "ModelShape", plan: "Plan") -> int:
    h, s = shape.hidden, plan.adapter_size
    per_adapter = (h * s + s) + (s * h + h)
    placements = 2 if plan.adapter_placement == "both" else 1
    return _adapted_layers(shape, plan) * placements * per_adapter


_LORA_OPTIONS = ("rank", "alpha", "dropout", "target_modules", "num_layers", "init_adapter")
_AS_ADAPTER = "use the run directory as an adapter with chat, generate or eval, or train with --method lora to fuse."

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("lora", "LoRA", _LORA_OPTIONS, 2e-4, (1e-4, 1e-3), 1000, _lora, True),
        MethodSpec("dora", "DoRA", _LORA_OPTIONS, 2e-4, (1e-4, 1e-3), 1000, _lora, True),
        MethodSpec("full", "full fine-tuning", ("num_layers",), 1e-5, (1e-6, 5e-5), 500, _full, True),
        MethodSpec(
            "prompt", "prompt tuning", ("num_virtual_tokens", "init_text"), 3e-2, (3e-3, 3e-1), 2000, _prompt, False,
            "Prompt tuning has nothing to merge into the base weights (it trains a soft prompt read before every "
            "input); " + _AS_ADAPTER,
        ),
        MethodSpec(
            "ptuning", "P-tuning", ("num_virtual_tokens", "init_text", "ptuning_hidden_size"), 1e-3, (1e-4, 1e-2), 2000,
            _ptuning, False,
            "P-tuning has nothing to merge into the base weights (it trains a soft prompt read before every "
            "input); " + _AS_ADAPTER,
        ),
        MethodSpec(
            "prefix", "prefix tuning", ("prefix_length", "init_text"), 1e-2, (1e-3, 3e-2), 2000, _prefix, False,
            "Prefix tuning has nothing to merge into the base weights (it trains attention keys and values placed "
            "before every input); " + _AS_ADAPTER,
        ),
        MethodSpec(
            "adapter", "bottleneck adapters", ("adapter_size", "adapter_placement", "num_layers"), 1e-3, (1e-4, 5e-3),
            1000, _adapter, False,
            "Bottleneck adapters cannot be merged into the base weights (their GELU is not linear); " + _AS_ADAPTER,
        ),
    )
}

# CLI shorthands: the method they stand for and what else they set.
ALIASES: dict[str, str] = {"qlora": "lora"}  # qlora = lora on a base quantized to 4 bits at load

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
CLI_CHOICES: tuple[str, ...] = ("lora", "dora", "qlora", *(n for n in METHOD_NAMES if n not in ("lora", "dora")))


def method_spec(name: str) -> MethodSpec:
    """The entry for a method name or CLI alias; an unknown name is a one-line error listing the choices."""
    spec = METHODS.get(ALIASES.get(name, name))
    if spec is None:
        from macft.errors import MacftError

        raise MacftError(f"Unknown method '{name}'; choose one of {', '.join(CLI_CHOICES)}.")
    return spec
