"""LoRA on the experts of a mixture-of-experts MLP (mlx-lm's ``SwitchLinear`` stacks).

A switch layer holds one weight per expert, W₀[e]: (out, in), and applies to each token the
experts its router picked. LoRA gives every expert its own low-rank pair:

    y = W₀[e]x + s·B[e](A[e]·dropout(x)),   s = α / r,   A[e]: in→r (random),  B[e]: r→out (zero)

stored like ``LoRALinear``'s, one per expert: ``lora_a`` (experts, in, r), ``lora_b`` (experts, r, out).
Only the experts a token was routed to take part, so each gets gradients from its own tokens.
The base may be quantized (QLoRA); ``fuse()`` returns a float ``SwitchLinear``.

    layer = LoRASwitchLinear.from_base(model.layers[0].mlp.switch_mlp.up_proj, rank=8, alpha=16)
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from macft.errors import MacftError
from macft.models.quantized import float_dtype, float_weight

EXPERT_LAYERS = (SwitchLinear, QuantizedSwitchLinear)


class LoRASwitchLinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        experts, out_dims, in_dims = base.num_experts, base.output_dims, base.input_dims
        dtype = float_dtype(base)
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.enabled = True
        self.dropout = nn.Dropout(p=dropout)
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (experts, in_dims, rank)).astype(dtype)
        self.lora_b = mx.zeros((experts, rank, out_dims), dtype=dtype)

    @classmethod
    def from_base(cls, layer: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> "LoRASwitchLinear":
        return cls(layer, rank, alpha, dropout)

    def delta_weight(self) -> mx.array:
        """s·(B[e]A[e]) for every expert as (experts, out, in) float32, the shape of the base weight."""
        a, b = self.lora_a.astype(mx.float32), self.lora_b.astype(mx.float32)
        return self.scale * (a @ b).swapaxes(-1, -2)

    def fuse(self) -> SwitchLinear:
        weight = float_weight(self.base).astype(mx.float32) + self.delta_weight()
        experts, out_dims, in_dims = weight.shape
        bias = self.base.get("bias")
        fused = SwitchLinear(in_dims, out_dims, experts, bias=bias is not None)
        fused.weight = weight.astype(float_dtype(self.base))
        if bias is not None:
            fused.bias = bias
        return fused

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = self.base(x, indices, sorted_indices=sorted_indices)
        if not self.enabled:
            return y
        low = mx.gather_mm(self.dropout(x), self.lora_a, rhs_indices=indices, sorted_indices=sorted_indices)
        update = mx.gather_mm(low, self.lora_b, rhs_indices=indices, sorted_indices=sorted_indices)
        return y + (self.scale * update).astype(y.dtype)


def expert_layer_class(method: str) -> type[LoRASwitchLinear]:
    if method != "lora":
        raise MacftError(f"The '{method}' method has no form for mixture-of-experts layers; use --method lora (or qlora) there.")
    return LoRASwitchLinear
