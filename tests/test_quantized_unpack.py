"""The compiled unpacking QLoRA dequantizes with on CPU gives MLX's own dequantized values, bit for bit."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.switch_layers import SwitchLinear

from macft.backend import detect
from macft.models.quantized import float_weight, unpacked, unpacks_faster


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_unpacked_equals_mx_dequantize(bits, group_size):
    mx.random.seed(bits * 1000 + group_size)
    layer = nn.Linear(256, 40).to_quantized(group_size=group_size, bits=bits)
    layer.scales = layer.scales * mx.random.uniform(0.5, 2.0, layer.scales.shape)  # not only the quantizer's own scales
    reference = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=group_size, bits=bits)
    assert unpacks_faster(layer, layer.scales, layer.biases) == detect().dequantize_for_matmul  # CPU
    assert mx.array_equal(unpacked(layer.weight, layer.scales, layer.biases, group_size, bits), reference).item()
    assert mx.array_equal(float_weight(layer), reference).item()
    assert mx.array_equal(float_weight(layer, rows=(7, 19)), reference[7:19]).item()
    index = mx.array([39, 0, 5, 5])
    assert mx.array_equal(float_weight(layer, index=index), reference[index]).item()


def test_expert_stacks_and_embeddings_unpack_the_same():
    experts = SwitchLinear(128, 64, 3).to_quantized(group_size=64, bits=4)
    want = mx.dequantize(experts.weight, experts.scales, experts.biases, group_size=64, bits=4)
    assert want.shape == (3, 64, 128) and mx.array_equal(float_weight(experts), want).item()
    embedding = nn.Embedding(300, 128).to_quantized(group_size=32, bits=8)
    want = mx.dequantize(embedding.weight, embedding.scales, embedding.biases, group_size=32, bits=8)
    assert mx.array_equal(float_weight(embedding), want).item()


def test_other_layouts_keep_mx_dequantize():
    three_bit = nn.Linear(256, 16).to_quantized(group_size=64, bits=3)  # values straddle 32-bit words
    assert not unpacks_faster(three_bit, three_bit.scales, three_bit.biases)
    want = mx.dequantize(three_bit.weight, three_bit.scales, three_bit.biases, group_size=64, bits=3)
    assert mx.array_equal(float_weight(three_bit), want).item()
    half = nn.Linear(256, 16).to_quantized(group_size=64, bits=4)
    half.scales, half.biases = half.scales.astype(mx.bfloat16), half.biases.astype(mx.bfloat16)
    assert not unpacks_faster(half, half.scales, half.biases)
