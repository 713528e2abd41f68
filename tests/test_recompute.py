"""Gated MLPs that recompute their activation in the backward pass, against mlx-lm's own MLPs."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from macft.config import MethodConfig
from macft.methods import apply_method, fuse_model
from macft.methods.recompute import RecomputingMLP, recompute_gated_activations
from macft.models.random_init import FAMILIES, family_config


def mlp_of(family: str, hidden: int = 64) -> nn.Module:
    config = family_config(family, 128, hidden=hidden, layers=1)
    model_class, args_class = _get_classes(config)
    mx.random.seed(1)
    model = model_class(args_class.from_dict(config))
    return model.layers[0].mlp


def loss_and_grads(mlp: nn.Module, x: mx.array, probe: mx.array):
    """A scalar of the MLP's output, its gradient in the input and in every MLP weight."""

    def loss(params, inputs):
        mlp.update(params)
        return (mlp(inputs) * probe).sum()

    value, (weight_grads, input_grad) = mx.value_and_grad(loss, argnums=(0, 1))(mlp.trainable_parameters(), x)
    mx.eval(value, weight_grads, input_grad)
    return value, dict(tree_flatten(weight_grads)), input_grad


# A mixture-of-experts block keeps mlx-lm's own experts (their activation is not swapped).
DENSE = [f for f in FAMILIES if "num_experts" not in family_config(f, 128)]


@pytest.mark.parametrize("family", DENSE)
def test_recomputing_mlp_matches_mlx_lm_values_and_gradients(family):
    mlp = mlp_of(family)
    x = mx.random.normal((2, 5, 64), key=mx.random.key(2))
    probe = mx.random.normal((2, 5, 64), key=mx.random.key(3))
    reference = loss_and_grads(mlp, x, probe)
    assert recompute_gated_activations(mlp) == 1 and isinstance(mlp, RecomputingMLP)
    value, weight_grads, input_grad = loss_and_grads(mlp, x, probe)
    np.testing.assert_allclose(np.array(value), np.array(reference[0]), rtol=1e-5)
    np.testing.assert_allclose(np.array(input_grad), np.array(reference[2]), rtol=1e-4, atol=1e-6)
    assert weight_grads.keys() == reference[1].keys()
    for name, grad in weight_grads.items():
        np.testing.assert_allclose(np.array(grad), np.array(reference[1][name]), rtol=1e-4, atol=1e-6, err_msg=name)


def backward_peak(mlp: nn.Module, x: mx.array, depth: int = 8) -> int:
    """Peak memory of the gradient through ``depth`` residual applications of ``mlp`` (what each
    application keeps for the backward pass adds up, as over a model's layers)."""

    def forward(h):
        for _ in range(depth):
            h = h + mlp(h)
        return h.sum()

    grad = mx.compile(mx.grad(forward))
    mx.eval(grad(x))
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(grad(x))
    return mx.get_peak_memory() - before


def test_recomputing_keeps_less_for_the_backward_pass():
    """Gemma's tanh-GELU keeps several arrays of the MLP's width per token under plain autodiff;
    recomputed, only gate and up are kept (also inside a compiled function)."""
    mlp = mlp_of("gemma3", hidden=256)
    mlp.freeze()
    x = mx.random.normal((4, 256, 256), key=mx.random.key(4))
    plain = backward_peak(mlp, x)
    recompute_gated_activations(mlp)
    assert backward_peak(mlp, x) < 0.8 * plain


def test_apply_method_recomputes_and_fuse_still_merges(tiny_model_dir):
    from macft.models.load import load_model

    model = apply_method(load_model(str(tiny_model_dir)).model, MethodConfig(rank=4, target_modules=("all-linear",)))
    mlps = [m for _, m in model.named_modules() if isinstance(m, RecomputingMLP)]
    assert len(mlps) == len(model.layers)
    fused = fuse_model(model)  # a recomputing MLP is a base layer, not an insertion that blocks fusing
    assert not any("lora" in name for name, _ in tree_flatten(fused.parameters()))


def test_gelu_by_sigmoid_matches_float64_tanh_gelu():
    """The CPU's form of Gemma's GELU, value and derivative, against the tanh formula in float64."""
    from macft.methods.recompute import gelu_approx_by_sigmoid

    x = np.linspace(-20, 20, 200_001).astype(np.float32)
    value, grad = mx.vjp(gelu_approx_by_sigmoid, [mx.array(x)], [mx.ones(x.shape)])
    x64 = x.astype(np.float64)
    k = np.sqrt(2 / np.pi)
    tanh = np.tanh(k * (x64 + 0.044715 * x64**3))
    expected = 0.5 * x64 * (1 + tanh)
    expected_grad = 0.5 * (1 + tanh) + 0.5 * x64 * (1 - tanh**2) * k * (1 + 3 * 0.044715 * x64**2)
    np.testing.assert_allclose(np.array(value[0]), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array(grad[0]), expected_grad, rtol=1e-5, atol=1e-6)
