"""LoRA/DoRA/QLoRA layers against numpy, fusing, the method registry and adapter save/load."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from macft.config import MethodConfig, Recipe
from macft.errors import MacftError
from macft.adapters.files import load_adapter, save_adapter
from macft.methods import adapters_disabled, apply_method, fuse_model
from macft.methods.lora import DoRALinear, LoRALinear
from macft.models.load import load_model


def randomize_adapter(layer: LoRALinear, seed: int = 1) -> None:
    """B starts at zero, which would hide every bug in the update path."""
    key = mx.random.key(seed)
    layer.lora_b = 0.3 * mx.random.normal(layer.lora_b.shape, key=key)


def test_lora_matches_numpy():
    mx.random.seed(0)
    base = nn.Linear(24, 16, bias=True)
    layer = LoRALinear.from_base(base, rank=4, alpha=8.0)
    randomize_adapter(layer)
    x = mx.random.normal((3, 5, 24))
    w, b = np.array(base.weight, np.float64), np.array(base.bias, np.float64)
    a, bb = np.array(layer.lora_a, np.float64), np.array(layer.lora_b, np.float64)
    xn = np.array(x, np.float64)
    expected = xn @ w.T + b + (8.0 / 4) * ((xn @ a) @ bb)
    np.testing.assert_allclose(np.array(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_lora_starts_at_base_and_can_be_disabled():
    mx.random.seed(0)
    base = nn.Linear(32, 8, bias=False)
    layer = LoRALinear.from_base(base, rank=2, alpha=4.0)
    x = mx.random.normal((2, 32))
    np.testing.assert_array_equal(np.array(layer(x)), np.array(base(x)))  # B = 0 at init
    randomize_adapter(layer)
    assert not np.allclose(np.array(layer(x)), np.array(base(x)))
    with adapters_disabled(layer):
        np.testing.assert_array_equal(np.array(layer(x)), np.array(base(x)))
    assert layer.enabled


def test_dora_matches_numpy_and_fuses():
    mx.random.seed(0)
    base = nn.Linear(24, 16, bias=True)
    layer = DoRALinear.from_base(base, rank=4, alpha=8.0)
    randomize_adapter(layer)
    layer.magnitude = layer.magnitude * 1.5
    x = mx.random.normal((4, 24))
    w, b = np.array(base.weight, np.float64), np.array(base.bias, np.float64)
    a, bb = np.array(layer.lora_a, np.float64), np.array(layer.lora_b, np.float64)
    m = np.array(layer.magnitude, np.float64)
    merged = w + 2.0 * (bb.T @ a.T)
    direction = merged / np.linalg.norm(merged, axis=1, keepdims=True)
    expected = np.array(x, np.float64) @ (m[:, None] * direction).T + b
    np.testing.assert_allclose(np.array(layer(x)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(layer.fuse()(x)), expected, rtol=1e-5, atol=1e-5)


def test_lora_fuse_float():
    mx.random.seed(0)
    layer = LoRALinear.from_base(nn.Linear(40, 24, bias=True), rank=8, alpha=16.0)
    randomize_adapter(layer)
    fused = layer.fuse()
    assert isinstance(fused, nn.Linear)
    x = mx.random.normal((6, 40))
    np.testing.assert_allclose(np.array(fused(x)), np.array(layer(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_layer_and_fuse(bits):
    mx.random.seed(0)
    quantized = nn.Linear(64, 32, bias=False).to_quantized(group_size=64, bits=bits)
    layer = LoRALinear.from_base(quantized, rank=4, alpha=8.0)
    randomize_adapter(layer)
    dequantized = np.array(
        mx.dequantize(quantized.weight, quantized.scales, quantized.biases, group_size=64, bits=bits), np.float64
    )
    delta = 2.0 * (np.array(layer.lora_b, np.float64).T @ np.array(layer.lora_a, np.float64).T)
    fused = layer.fuse()
    assert isinstance(fused, nn.Linear) and fused.weight.dtype == mx.float32
    # The merged weight is exactly the dequantized base plus the float32 update, and that update is s·BA.
    update = np.array(layer.delta_weight())
    np.testing.assert_allclose(update, delta, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.array(fused.weight), np.array(dequantized, np.float32) + update)
    x = mx.random.normal((5, 64))
    expected = np.array(x, np.float64) @ (dequantized + delta).T
    np.testing.assert_allclose(np.array(layer(x)), expected, rtol=1e-4, atol=1e-4)


def test_apply_lora_targets_and_freezes(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    model = apply_method(loaded.model, MethodConfig(name="lora", rank=4, target_modules=("q_proj", "down_proj"), num_layers=1))
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    last = len(model.layers) - 1
    assert sorted(names) == sorted(
        f"model.layers.{last}.{p}.{w}" for p in ("self_attn.q_proj", "mlp.down_proj") for w in ("lora_a", "lora_b")
    )
    assert not isinstance(model.layers[0].self_attn.q_proj, LoRALinear)


def test_apply_all_linear_and_unknown_target(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    model = apply_method(loaded.model, MethodConfig(target_modules=("all-linear",)))
    adapted = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 7 * len(model.layers)
    with pytest.raises(MacftError, match="matches no linear layer"):
        apply_method(load_model(str(tiny_model_dir)).model, MethodConfig(target_modules=("nonexistent",)))


def test_phi3_fused_projections_are_targeted(tiny_models):
    loaded = load_model(str(tiny_models["phi3"]))
    model = apply_method(loaded.model, MethodConfig(target_modules=("q_proj", "v_proj")))
    assert isinstance(model.layers[0].self_attn.qkv_proj, LoRALinear)


def test_full_freezes_early_layers(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    model = apply_method(loaded.model, MethodConfig(name="full", num_layers=1))
    names = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert names and all(k.startswith(f"model.layers.{len(model.layers) - 1}.") for k in names)


@pytest.mark.parametrize("method,bits", [("lora", None), ("dora", None), ("lora", 4)])
def test_save_load_adapter_roundtrip(tiny_model_dir, tmp_path, method, bits):
    mx.random.seed(0)
    recipe = Recipe().replace(method={"name": method, "rank": 4}, model={"quantize_bits": bits})
    loaded = load_model(str(tiny_model_dir), quantize_bits=bits)
    model = apply_method(loaded.model, recipe.method)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            randomize_adapter(m)
    inputs = mx.array([[2, 10, 20, 30, 40, 50]])
    tuned = np.array(model(inputs))
    save_adapter(model, tmp_path, recipe.method, loaded.identity, recipe.model.recorded)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == method and config["rank"] == 4 and config["scale"] == recipe.method.alpha / recipe.method.rank
    assert config["base_model"]["sha256"] == loaded.identity["sha256"] and config["quantize_bits"] == bits

    fresh, cfg = load_adapter(load_model(str(tiny_model_dir), quantize_bits=bits).model, tmp_path / "adapters.safetensors")
    assert cfg["method"] == method
    np.testing.assert_array_equal(np.array(fresh(inputs)), tuned)
    with adapters_disabled(fresh):
        base = np.array(fresh(inputs))
    # A quantized base runs dequantize + matmul here, the plain model quantized_matmul: same maths, other rounding.
    reference = np.array(load_model(str(tiny_model_dir), quantize_bits=bits).model(inputs))
    np.testing.assert_allclose(base, reference, rtol=1e-5, atol=1e-5)


def test_quantized_layers_outside_adapters_take_the_dequantized_path(tiny_model_dir):
    """QLoRA on attention only: on CPU the untouched quantized MLP layers also dequantize then
    multiply (not MLX's slow CPU quantized_matmul), with quantized_matmul's values and gradients."""
    from macft.backend import detect
    from macft.methods.lora import DequantizingLinear

    mx.random.seed(0)
    model = apply_method(load_model(str(tiny_model_dir), quantize_bits=4).model, MethodConfig(rank=4))
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            randomize_adapter(m)
    routed = [m for _, m in model.named_modules() if isinstance(m, DequantizingLinear)]
    assert bool(routed) == detect().dequantize_for_matmul
    if not routed:
        pytest.skip("this backend multiplies quantized weights directly")
    assert isinstance(model.model.layers[0].mlp.gate_proj, DequantizingLinear)
    inputs = mx.array([[2, 10, 20, 30, 40, 50]])

    def loss_and_grads():
        return nn.value_and_grad(model, lambda x: model(x).astype(mx.float32).square().mean())(inputs)

    loss, grads = loss_and_grads()
    for layer in routed:
        layer.__class__ = nn.QuantizedLinear  # back to MLX's own quantized_matmul
    reference_loss, reference_grads = loss_and_grads()
    assert abs(loss.item() - reference_loss.item()) < 1e-5 * abs(reference_loss.item())
    for (name, value), (_, reference) in zip(tree_flatten(grads), tree_flatten(reference_grads)):
        reference = np.array(reference)
        np.testing.assert_allclose(np.array(value), reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max(), err_msg=name)


def test_fuse_model_matches_adapter(tiny_model_dir):
    mx.random.seed(0)
    loaded = load_model(str(tiny_model_dir))
    model = apply_method(loaded.model, MethodConfig(target_modules=("all-linear",)))
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            randomize_adapter(m)
    inputs = mx.array([[2, 11, 12, 13, 14]])
    before = np.array(model(inputs))
    fused = fuse_model(model)
    assert not any(isinstance(m, LoRALinear) for _, m in fused.named_modules())
    np.testing.assert_allclose(np.array(fused(inputs)), before, rtol=1e-4, atol=1e-4)


def test_load_adapter_errors(tmp_path):
    with pytest.raises(MacftError, match="No adapter weights"):
        load_adapter(nn.Linear(2, 2), tmp_path)


def test_fuse_model_refuses_modules_that_cannot_merge(tiny_model_dir):
    from macft.methods.full import apply_full

    class SoftThing(nn.Module):  # stands for a PEFT module without fuse()
        pass

    SoftThing.__module__ = "macft.methods.example"
    model = apply_full(load_model(str(tiny_model_dir)).model, MethodConfig(name="full"))
    assert fuse_model(model) is model  # full fine-tuning has nothing to merge
    model.model.extra = SoftThing()
    with pytest.raises(MacftError, match="SoftThing"):
        fuse_model(model)


def test_dequantized_matmul_matches_plain_autodiff():
    """The memory-lean CPU path for a quantized base gives plain autodiff's values and gradients."""
    from macft.methods.lora import dequantized_matmul
    from macft.models.quantized import float_weight

    mx.random.seed(3)
    layer = nn.QuantizedLinear(256, 128, bias=False, group_size=64, bits=4)
    x = mx.random.normal((5, 256))
    upstream = mx.random.normal((5, 128))

    def ours(inputs):
        return (dequantized_matmul(layer, inputs) * upstream).sum()

    def reference(inputs):
        return ((inputs @ float_weight(layer).T) * upstream).sum()

    value, grad = mx.value_and_grad(ours)(x)
    ref_value, ref_grad = mx.value_and_grad(reference)(x)
    np.testing.assert_allclose(np.array(value), np.array(ref_value), rtol=1e-5)
    np.testing.assert_allclose(np.array(grad), np.array(ref_grad), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(mx.compile(mx.grad(ours))(x)), np.array(ref_grad), rtol=1e-5, atol=1e-5)


def test_parameter_count_of_a_quantized_base_is_its_logical_size(tiny_model_dir):
    """QLoRA's summary reports the base's real parameter count, not its packed uint32 words."""
    from macft.methods import count_parameters

    config = MethodConfig(rank=4)
    float_model = apply_method(load_model(str(tiny_model_dir)).model, config)
    quantized_model = apply_method(load_model(str(tiny_model_dir), quantize_bits=4).model, config)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in quantized_model.named_modules())
    assert count_parameters(quantized_model) == count_parameters(float_model)
