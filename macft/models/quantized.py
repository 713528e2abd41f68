"""Quantized weights in one place: which layers are quantized, their float values, and float models.

MLX keeps a quantized linear, embedding or expert-stack layer's weight packed, with a scale and a bias per
group. Training dequantizes slices of it inside a step (LoRA bases, the sliced loss head), chat
and generation on CPU dequantize whole layers once, and export and fuse need every weight in float.

    weight = float_weight(layer)                 # (out, in) float, any layer
    rows = float_weight(head, rows=(0, 4096))    # only those rows are dequantized
    dequantize_model(model, mx.float32)          # every quantized layer becomes a float one, in place
    dequantize_for_generation(model)             # the same where quantized matmuls are slow (CPU)
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from macft.backend import detect
from macft.memory_limit import check_room

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)


def has_quantized_layers(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED) for _, m in model.named_modules())


def float_weight(
    layer: nn.Module, packed: mx.array | None = None, rows: tuple[int, int] | None = None, index: mx.array | None = None
) -> mx.array:
    """The layer's weight as a float array (dequantized for a quantized linear or embedding layer).

    ``rows=(start, end)`` or ``index`` (an array of row numbers) take only those rows, dequantizing
    only them; ``packed`` stands in for ``layer.weight``, e.g. to make the dequantization depend on
    another array."""
    weight = layer.weight if packed is None else packed
    pick = slice(*rows) if rows is not None else index
    if pick is not None:
        weight = weight[pick]
    if isinstance(layer, QUANTIZED):
        biases = layer.get("biases")
        scales = layer.scales if pick is None else layer.scales[pick]
        biases = biases if biases is None or pick is None else biases[pick]
        if unpacks_faster(layer, scales, biases):
            return unpacked(weight, scales, biases, layer.group_size, layer.bits)
        return mx.dequantize(weight, scales, biases, group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    return weight


def unpacks_faster(layer: nn.Module, scales: mx.array, biases: mx.array | None) -> bool:
    """Whether ``unpacked`` gives this layer's float weight: float32 affine groups whose values fill
    32-bit words exactly, on a backend that dequantizes for its matmuls (CPU)."""
    affine = layer.mode == "affine" and biases is not None and scales.dtype == mx.float32
    return affine and layer.bits in (2, 4, 8) and detect().dequantize_for_matmul


@mx.compile
def unpacked(packed: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """``mx.dequantize`` of affine-quantized float32 groups as one compiled elementwise kernel: on CPU
    several times faster than MLX's own, the same values bit for bit (tests/test_quantized_unpack.py).
    QLoRA dequantizes its whole base twice per step."""
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    values = values.reshape(*packed.shape[:-1], -1, group_size).astype(mx.float32)
    return (values * scales[..., None] + biases[..., None]).reshape(*packed.shape[:-1], -1)


def float_dtype(layer: nn.Module) -> mx.Dtype:
    """The float dtype the layer computes in (a quantized layer's scales carry it)."""
    return layer.scales.dtype if isinstance(layer, QUANTIZED) else layer.weight.dtype


def float_linear(weight: mx.array, bias: mx.array | None, dtype: mx.Dtype) -> nn.Linear:
    out_dims, in_dims = weight.shape
    linear = nn.Linear(in_dims, out_dims, bias=bias is not None)
    linear.weight = weight.astype(dtype)
    if bias is not None:
        linear.bias = bias.astype(dtype)
    return linear


def dequantize_model(model: nn.Module, dtype: mx.Dtype | None = None) -> nn.Module:
    """Replace every quantized linear and embedding layer of ``model`` by a float one, in place;
    ``dtype`` None keeps each layer's own float dtype."""
    sizes = [m.weight.size * (32 // m.bits) * (dtype or float_dtype(m)).size for _, m in model.named_modules() if isinstance(m, QUANTIZED)]
    # Each layer is evaluated before the next, so the peak is the float copies plus one layer's
    # temporaries; under a memory limit MLX would crash mid-way, so that is checked first.
    check_room(sum(sizes) + max(sizes, default=0) // 2, "dequantizing the model's quantized layers")
    swaps = []
    for path, module in model.named_modules():
        if not isinstance(module, QUANTIZED):
            continue
        weight = float_weight(module).astype(dtype or float_dtype(module))
        mx.eval(weight)
        if isinstance(module, nn.QuantizedEmbedding):
            layer = nn.Embedding(*weight.shape)
        elif isinstance(module, QuantizedSwitchLinear):  # a mixture-of-experts stack
            layer = SwitchLinear(weight.shape[2], weight.shape[1], weight.shape[0], bias="bias" in module)
            if "bias" in module:
                layer.bias = module.bias
        else:
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            if "bias" in module:
                layer.bias = module.bias
        layer.weight = weight
        swaps.append((path, layer))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return model


def dequantize_for_generation(model: nn.Module) -> nn.Module:
    """Where quantized matmuls are slow (CPU), replace quantized layers by float ones, in place.

    Training dequantizes inside every step to keep memory low; generation runs the model many
    times, so dequantizing once is the faster trade. Use it when training is over.
    """
    if detect().dequantize_for_matmul:
        dequantize_model(model)
        mx.eval(model.parameters())
    return model
