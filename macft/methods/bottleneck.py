"""Bottleneck adapters: small residual MLPs inserted after the MLP and/or attention of each layer.

An adapter (Houlsby et al., 2019) maps a sub-layer's output y to y + up(gelu(down(y))), with
``down``: hidden → ``adapter_size`` and ``up``: ``adapter_size`` → hidden. ``up`` starts at zero, so
the adapted model computes exactly what the base model does until training moves it. The base stays
frozen; ``adapter_placement`` chooses the sub-layers ("mlp", "attention" or "both") and
``num_layers`` the last N layers (-1: all).

    model = apply_adapters(model, recipe.method)
    logits = model(tokens)

Adapters add a nonlinearity, so they cannot be folded into the base's linear weights: a model with
adapters is used with its adapter file, never fused or exported to GGUF.
"""

from __future__ import annotations

from typing import Any, Literal

import mlx.core as mx
import mlx.nn as nn

from macft.backend import compute_dtype
from macft.errors import MacftError
from macft.methods.base import AS_ADAPTER, NUM_LAYERS, MethodSpec, adapted_layers
from macft.options import Option

PLACEMENTS = {"mlp": ("mlp",), "attention": ("self_attn",), "both": ("self_attn", "mlp")}
OPTIONS = (
    Option("adapter_size", int, 64, "the bottleneck's width", valid=lambda n: n > 0, must="at least 1"),
    Option("adapter_placement", Literal["mlp", "attention", "both"], "mlp", "after which sub-layers adapters go"),
    NUM_LAYERS,
)


class Bottleneck(nn.Module):
    """x ↦ up(gelu(down(x))), zero at initialisation."""

    def __init__(self, dims: int, size: int):
        super().__init__()
        self.down = nn.Linear(dims, size)
        self.up = nn.Linear(size, dims)
        self.up.weight = mx.zeros_like(self.up.weight)
        self.up.bias = mx.zeros_like(self.up.bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.up(nn.gelu(self.down(x)))


class Adapted(nn.Module):
    """A frozen sub-layer followed by a residual bottleneck on its output; the sub-layer's call
    signature (``mlp(x)``, ``self_attn(x, mask, cache)``) passes straight through."""

    def __init__(self, base: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base = base
        self.adapter = adapter
        self.enabled = True  # off inside macft.methods.adapters_disabled: the base model

    def __call__(self, *args, **kwargs) -> mx.array:
        y = self.base(*args, **kwargs)
        return y + self.adapter(y) if self.enabled else y


def apply_adapters(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    """Freeze ``model`` and insert bottleneck adapters in place; returns the same model.

    ``tokenizer`` is unused (adapters need no text to start from); it keeps the signature every
    method shares.
    """
    layers = model.layers
    count = len(layers) if cfg.num_layers < 0 else min(cfg.num_layers, len(layers))
    dims = model.args.hidden_size
    model.freeze()
    for layer in layers[len(layers) - count :]:
        for name in PLACEMENTS[cfg.adapter_placement]:
            sub = getattr(layer, name, None)
            if sub is None:
                raise MacftError(f"Adapters need a '{name}' sub-layer in every layer; {type(layer).__name__} has none.")
            if isinstance(sub, Adapted):
                raise MacftError("This model already has adapters; load the base model again to apply others.")
            adapter = Bottleneck(dims, cfg.adapter_size)
            adapter.set_dtype(compute_dtype())
            setattr(layer, name, Adapted(sub, adapter))
    mx.eval(model.trainable_parameters())
    return model


def adapter_parameters(shape, settings: Any) -> int:
    h, s = shape.hidden, settings.adapter_size
    per_adapter = (h * s + s) + (s * h + h)
    return adapted_layers(shape, settings) * len(PLACEMENTS[settings.adapter_placement]) * per_adapter


METHODS = (
    MethodSpec(
        "adapter", "bottleneck adapters", OPTIONS, 1e-3, (1e-4, 5e-3), 1000, adapter_parameters, apply_adapters,
        fusable=False,
        not_fusable_because="Bottleneck adapters cannot be merged into the base weights (their GELU is not linear); " + AS_ADAPTER,
    ),
)
