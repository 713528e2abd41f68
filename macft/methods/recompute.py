"""Gated MLPs whose activation is recomputed in the backward pass instead of kept for it.

Every supported family computes its MLP as ``down(act(gate(x)) * up(x))``. Plain autodiff keeps
each intermediate of ``act`` until the backward pass: Gemma's tanh-GELU alone holds about four
arrays of the MLP's width per token and layer, a third of a LoRA step's activation memory. Here
the pair (gate, up) is all that is kept, and the backward pass recomputes the activation from it,
an elementwise cost that is small next to the layer's matmuls. Values and gradients are those of
mlx-lm's own MLP (tests/test_recompute.py checks both).

    replaced = recompute_gated_activations(model)   # in place; returns the number of MLPs swapped
"""

from __future__ import annotations

from functools import cache, partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from macft.backend import detect
from macft.families import FAMILIES

# mlx-lm MLP classes (module.ClassName) and the activation each applies to its gate, from the family records.
GATED_MLPS: dict[str, Callable[[mx.array], mx.array]] = {
    mlp: getattr(nn, activation) for family in FAMILIES.values() for mlp, activation in family.gated_mlps.items()
}


def class_key(cls: type) -> str:
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


@cache
def gated_product(
    activation: Callable[[mx.array], mx.array], recompute: Callable[[mx.array], mx.array]
) -> Callable[[mx.array, mx.array], mx.array]:
    """``activation(gate) * up`` whose backward pass recomputes ``activation(gate)`` as ``recompute``
    (the same function, or an equal one that is cheaper to differentiate here)."""

    @mx.custom_function
    def product(gate, up):
        return activation(gate) * up

    @product.vjp
    def product_vjp(primals, cotangent, output):
        # Depending on the cotangent makes the recomputation a node of its own: compilation would
        # otherwise merge it with the forward one and keep that one's intermediates alive again.
        gate, up = mx.depends(list(primals), [cotangent])
        (activated,), (gate_grad,) = mx.vjp(recompute, [gate], [cotangent * up])
        return gate_grad, cotangent * activated

    return product


class RecomputingMLP:
    """Mixed into an mlx-lm MLP class: the same computation through ``gated_product``."""

    product: Callable[[mx.array, mx.array], mx.array]

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:  # Phi-3 packs both projections in one matrix
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.product(gate, up))


@partial(mx.compile, shapeless=True)
def gelu_approx_by_sigmoid(x: mx.array) -> mx.array:
    """``nn.gelu_approx`` as 0.5·x·(1 + tanh(u)) = x·sigmoid(2u), with x³ as x·x·x: on CPUs whose tanh and
    ``x ** 3`` are scalar library calls (``Backend.scalar_transcendentals``) its gradient is the cheaper
    one to recompute."""
    return x * mx.sigmoid(1.5957691216057308 * (x + 0.044715 * (x * x * x)))


@cache
def recomputing_class(cls: type) -> type:
    """The mlx-lm MLP class ``cls`` with ``RecomputingMLP`` mixed in."""
    activation = GATED_MLPS[class_key(cls)]
    # The forward pass keeps mlx-lm's own activation, so a model's outputs stay bit for bit mlx-lm's.
    cheaper = gelu_approx_by_sigmoid if activation is nn.gelu_approx and detect().scalar_transcendentals else activation
    product = staticmethod(gated_product(activation, cheaper))
    return type(f"Recomputing{cls.__name__}", (RecomputingMLP, cls), {"product": product})


def recompute_gated_activations(model: nn.Module) -> int:
    """Swap every known gated MLP of ``model`` for its recomputing form, in place; return how many."""
    replaced = 0
    for _, module in model.named_modules():
        if class_key(type(module)) in GATED_MLPS:
            module.__class__ = recomputing_class(type(module))
            replaced += 1
    return replaced
