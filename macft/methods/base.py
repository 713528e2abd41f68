"""The record every fine-tuning method declares next to its layers (``METHODS`` in its module).

    spec = method_spec("prefix")                      # macft.methods
    spec.learning_rate, spec.learning_rate_range      # 1e-2, (1e-3, 3e-2)
    spec.trainable_parameters(shape, settings)        # what the memory planner counts, without a model
    model = spec.apply(model, settings, tokenizer)    # freeze the base, insert the method

The learning rates are each method's usual order of magnitude; the ranges are where it is usually
tuned (outside them macft warns). ``examples_to_see`` is what ``--epochs auto`` aims for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from macft.errors import MacftError
from macft.options import Option

if TYPE_CHECKING:
    import mlx.nn as nn

    from macft.models.shape import ModelShape

NUM_LAYERS = Option(
    "num_layers", int, -1, "adapt (or for full fine-tuning, train) the last N transformer blocks; -1 = all",
    valid=lambda n: n == -1 or n > 0, must="-1 (all blocks) or a positive number of blocks",
)
AS_ADAPTER = "use the run directory as an adapter with chat, generate or eval, or train with --method lora to fuse."


@dataclass(frozen=True)
class MethodSpec:
    name: str
    title: str  # how messages and the README name it
    options: tuple[Option, ...]  # the ``method.*`` recipe keys it reads besides ``name``
    learning_rate: float  # the usual default
    learning_rate_range: tuple[float, float]  # where it is usually tuned; outside it macft warns
    examples_to_see: int  # examples a run sees with ``--epochs auto`` (1-5 passes, whichever is closest)
    trainable_parameters: Callable[["ModelShape", Any], int]  # (shape, method settings) -> count, from the config alone
    apply: Callable[["nn.Module", Any, Any], "nn.Module"]  # (model, method settings, tokenizer) -> the model to train
    fusable: bool  # its layers merge into the base weights (``fuse()``): fuse and full-model GGUF export
    not_fusable_because: str = ""  # the one-line refusal when it cannot
    # Its modules can be switched off (``enabled``), so the policy itself gives the base model's
    # outputs (the demo's base answers, DPO's reference); full fine-tuning changes the base itself.
    switchable: bool = True
    packing_refused: str = ""  # why packed rows cannot train it ("" = they can)
    # Its model's attention can run in query blocks (``macft.models.attention``); prefix tuning hands
    # every layer its own cache of virtual keys, so its attention stays MLX's.
    block_attention: bool = True

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def check_options(self, keys: list[str], where: str) -> None:
        """Refuse ``method.*`` settings this method never reads (``--rank`` with prompt tuning, say)."""
        unused = [k for k in keys if k != "name" and k not in self.option_names]
        if unused:
            reads = ", ".join(f"method.{o}" for o in self.option_names)
            raise MacftError(f"{where} sets method.{unused[0]}, which {self.title} does not use; it reads {reads}.")

    def problems(self, settings: Any) -> list[str]:
        """One line per option of ``settings`` this method reads that holds an invalid value."""
        return [p for o in self.options if (p := o.problem(settings, "method"))]

    def refuse_fusing(self) -> None:
        if not self.fusable:
            raise MacftError(self.not_fusable_because)


def adapted_layers(shape: "ModelShape", settings: Any) -> int:
    """How many blocks ``method.num_layers`` adapts."""
    return shape.layers if settings.num_layers < 0 else min(settings.num_layers, shape.layers)
