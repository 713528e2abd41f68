"""LoRA and DoRA linear layers over a float or a quantized (QLoRA) frozen base.

LoRA (Hu et al., 2021) adds a trainable low-rank update to a frozen linear layer W₀:

    y = W₀x + b + s·B(A·dropout(x)),   s = α / r,   A: in→r (random),  B: r→out (zero)

so training starts exactly at the base model. DoRA (Liu et al., 2024) splits the adapted weight
into a direction and a trainable per-output magnitude m (initialised to the row norms of W₀):

    y = m ⊙ (W₀x + s·B(A·dropout(x))) / ‖W₀ + s·(BA)‖_row + b

QLoRA is LoRA whose base is an ``nn.QuantizedLinear``. On CPU, ``mx.quantized_matmul`` is far
slower than dequantizing the weight and calling the BLAS matmul, so the frozen base is applied
that way when ``macft.backend.detect().dequantize_for_matmul`` says so. ``fuse()`` merges in
float32 and returns a float ``nn.Linear``; re-quantizing the merged weight is the fuse command's job.

    model = apply_lora(model, settings)           # the recipe's method section: rank, alpha, targets...
    layer = LoRALinear.from_base(model.layers[0].self_attn.q_proj, rank=8, alpha=16, dropout=0.05)
    merged = layer.fuse()

``METHODS`` declares both methods for the rest of macft (``macft.methods.base.MethodSpec``).
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from macft.backend import detect
from macft.errors import MacftError
from macft.families import lookup
from macft.methods.base import NUM_LAYERS, MethodSpec, adapted_layers
from macft.methods.expert_lora import EXPERT_LAYERS, expert_layer_class
from macft.models.quantized import QUANTIZED, float_dtype, float_linear, float_weight
from macft.options import Option

ALL_LINEAR = "all-linear"
OPTIONS = (
    Option("rank", int, 8, "the rank r of the low-rank update", valid=lambda r: r > 0, must="a positive integer"),
    Option("alpha", float, 16.0, "the update is scaled by alpha / rank"),
    Option("dropout", float, 0.0, "dropout on the adapter's input", valid=lambda p: 0.0 <= p < 1.0, must="in [0, 1)"),
    Option(
        "target_modules", tuple[str, ...], ("q_proj", "k_proj", "v_proj", "o_proj"),
        f"the linear layers to adapt, by name ({ALL_LINEAR} for every one)",
    ),
    NUM_LAYERS,
    Option(
        "init_adapter", str | None, None,
        "start from this Hugging Face PEFT LoRA/DoRA adapter (a folder or a hub id; macft.adapters.peft)",
        resolve=lambda value, recipe_dir: str((recipe_dir / value).resolve()) if isinstance(value, str) and (recipe_dir / value).exists() else value,
    ),
)


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(input features, output features) of a float or quantized linear layer."""
    out_dims, packed = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        return packed * 32 // layer.bits, out_dims
    return packed, out_dims


def apply_base(layer: nn.Module, x: mx.array) -> mx.array:
    """The frozen base layer's output, dequantizing first where that is the faster path."""
    if isinstance(layer, nn.QuantizedLinear) and detect().dequantize_for_matmul:
        y = dequantized_matmul(layer, x)
        return y + layer.bias if "bias" in layer else y
    return layer(x)


class DequantizingLinear(nn.QuantizedLinear):
    """A frozen quantized linear layer outside any adapter that multiplies through its dequantized
    weight, like an adapted layer's base (``route_quantized_matmuls`` swaps it in)."""

    def __call__(self, x: mx.array) -> mx.array:
        return apply_base(self, x)


def route_quantized_matmuls(model: nn.Module) -> nn.Module:
    """Where dequantize-then-matmul is the faster path (CPU), make every quantized linear layer of
    ``model`` take it, in place. Adapted layers already do; this covers the layers a method leaves
    alone (QLoRA on attention only, prompt tuning on a quantized base), which would otherwise run
    MLX's slow CPU ``quantized_matmul`` in every training step."""
    if detect().dequantize_for_matmul:
        for _, module in model.named_modules():
            if type(module) is nn.QuantizedLinear:
                module.__class__ = DequantizingLinear
    return model


def dequantized_matmul(layer: nn.Module, x: mx.array) -> mx.array:
    """``x @ W.T`` for a frozen quantized layer through a float copy of W that lives one matmul long.

    Plain autodiff would keep every layer's dequantized weight until the backward pass, a float
    copy of the whole model; here the backward pass dequantizes again. ``mx.depends`` ties each
    dequantization to the array that arrives just before it is needed (the input going forward,
    the cotangent going back): that keeps the backward one a separate node, which compilation
    cannot merge with the forward one, and stops MLX from dequantizing every layer up front.
    """

    @mx.custom_function
    def matmul(inputs):
        return inputs @ float_weight(layer, packed=mx.depends(layer.weight, inputs)).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        return (cotangent @ float_weight(layer, packed=mx.depends(layer.weight, cotangent)),)

    return matmul(x)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        in_dims, out_dims = linear_dims(base)
        dtype = float_dtype(base)
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.enabled = True  # switched off by macft.methods.adapters_disabled to get the base model back
        self.dropout = nn.Dropout(p=dropout)
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank)).astype(dtype)
        self.lora_b = mx.zeros((rank, out_dims), dtype=dtype)

    @classmethod
    def from_base(cls, layer: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> "LoRALinear":
        return cls(layer, rank, alpha, dropout)

    def delta_weight(self) -> mx.array:
        """s·(BA) as an (out, in) float32 matrix, the shape of the base weight."""
        a, b = self.lora_a.astype(mx.float32), self.lora_b.astype(mx.float32)
        return self.scale * (b.T @ a.T)

    def fuse(self) -> nn.Linear:
        """A float ``nn.Linear`` computing what this layer computes (merged in float32)."""
        weight = float_weight(self.base).astype(mx.float32) + self.delta_weight()
        return float_linear(weight, self.base.get("bias"), float_dtype(self.base))

    def __call__(self, x: mx.array) -> mx.array:
        y = apply_base(self.base, x)
        if not self.enabled:
            return y
        update = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return y + (self.scale * update).astype(y.dtype)


class DoRALinear(LoRALinear):
    """LoRA with a trainable per-output magnitude (see the module docstring)."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        self.magnitude = mx.linalg.norm(float_weight(base).astype(mx.float32), axis=1).astype(float_dtype(base))

    def adapted_weight(self) -> mx.array:
        return float_weight(self.base).astype(mx.float32) + self.delta_weight()

    def fuse(self) -> nn.Linear:
        weight = self.adapted_weight()
        norms = mx.linalg.norm(weight, axis=1, keepdims=True)
        weight = (self.magnitude.astype(mx.float32)[:, None] / norms) * weight
        return float_linear(weight, self.base.get("bias"), float_dtype(self.base))

    def __call__(self, x: mx.array) -> mx.array:
        if not self.enabled:
            return apply_base(self.base, x)
        weight = float_weight(self.base)
        y = x @ weight.T + ((self.dropout(x) @ self.lora_a) @ self.lora_b) * self.scale
        # The norm is of the merged weight, so the gradient also flows through it into A and B.
        norms = mx.linalg.norm(weight.astype(mx.float32) + self.delta_weight(), axis=1)
        y = y * (self.magnitude / norms.astype(self.magnitude.dtype)).astype(y.dtype)
        return y + self.base.bias if "bias" in self.base else y


def apply_lora(model: nn.Module, settings: Any, tokenizer: Any = None) -> nn.Module:
    """Freeze the model and wrap the targeted linear layers of the last ``num_layers`` blocks
    in LoRA (or DoRA when ``settings.name == "dora"``) layers."""
    layer_class = DoRALinear if settings.name == "dora" else LoRALinear
    targets = set(settings.target_modules)
    family = lookup(str(getattr(model, "model_type", "")))
    aliases = family.lora_aliases if family is not None else {}  # fused or renamed projections
    model.freeze()
    blocks = model.layers if settings.num_layers == -1 else model.layers[max(0, len(model.layers) - settings.num_layers) :]
    seen: set[str] = set()
    replaced = 0
    for block in blocks:
        swaps = []
        for path, module in block.named_modules():
            if not isinstance(module, (nn.Linear, nn.QuantizedLinear, *EXPERT_LAYERS)):
                continue
            leaf = path.rsplit(".", 1)[-1]
            seen.add(leaf)
            if ALL_LINEAR in targets or leaf in targets or targets & set(aliases.get(leaf, ())):
                kind = expert_layer_class(settings.name) if isinstance(module, EXPERT_LAYERS) else layer_class
                swaps.append((path, kind.from_base(module, settings.rank, settings.alpha, settings.dropout)))
        block.update_modules(tree_unflatten(swaps))
        replaced += len(swaps)
    if replaced == 0:
        raise MacftError(
            f"method.target_modules {list(settings.target_modules)} matches no linear layer of this model; "
            f"choose from {', '.join(sorted(seen))} or '{ALL_LINEAR}'."
        )
    return model


def lora_parameters(shape, settings: Any, magnitudes: bool = False) -> int:
    """A·B per targeted layer of every adapted block (one pair per expert of a mixture-of-experts MLP),
    plus DoRA's magnitude per output row."""
    modules = shape.module_shapes()
    targets = modules if ALL_LINEAR in settings.target_modules else settings.target_modules
    per_layer = 0
    for name in targets:
        fan_in, fan_out = modules.get(name, (shape.hidden, shape.hidden))
        per_layer += (settings.rank * (fan_in + fan_out) + (fan_out if magnitudes else 0)) * shape.copies(name)
    return adapted_layers(shape, settings) * per_layer


METHODS = (
    MethodSpec("lora", "LoRA", OPTIONS, 2e-4, (1e-4, 1e-3), 1000, lora_parameters, apply_lora, fusable=True),
    MethodSpec(
        "dora", "DoRA", OPTIONS, 2e-4, (1e-4, 1e-3), 1000,
        lambda shape, settings: lora_parameters(shape, settings, magnitudes=True), apply_lora, fusable=True,
    ),
)
