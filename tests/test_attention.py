"""Block attention (macft.models.attention) against MLX's fused attention and the unblocked model.

The reference everywhere is MLX's own ``mx.fast.scaled_dot_product_attention`` with an explicit
boolean mask (or mlx-lm's model run as it ships): outputs, per-token losses and gradients must agree
to float rounding, for every family, with sliding windows, grouped-query heads, packed rows of
8,192 tokens and layer checkpointing; and the blocked backward pass must not hold an L × L matrix.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import make_prompt_cache

from macft.config import MethodConfig
from macft.data import packing_cache
from macft.methods import apply_method
from macft.models.attention import BlockMask, block_attention, dense_mask, enable_block_attention
from macft.models.load import load_model
from macft.models.random_init import FAMILIES, build_random_model
from macft.train.loop import enable_grad_checkpoint
from macft.models.head import position_losses, selected_positions


def fused(q, k, v, scale, window=None, segments=None):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=dense_mask(q.shape[2], window, segments))


def attention_and_grads(attend, q, k, v):
    weights = mx.cos(mx.arange(q.size).reshape(q.shape) * 0.37)  # a cotangent that differs per element
    out = attend(q, k, v)
    grads = mx.grad(lambda *x: (attend(*x) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
    return [out, *grads]


@pytest.mark.parametrize("rows", [1, 5, 16, 53, 64])
@pytest.mark.parametrize("window,packed", [(None, False), (7, False), (None, True), (9, True)])
def test_block_attention_equals_fused_attention(rows, window, packed):
    mx.random.seed(0)
    batch, heads, kv_heads, length, dim = 2, 6, 2, 53, 16  # three query heads share each kv head
    q, k, v = (mx.random.normal((batch, h, length, dim)) for h in (heads, kv_heads, kv_heads))
    segments = mx.array([[1] * 20 + [2] * 25 + [0] * 8, [1] * 3 + [2] * 50]) if packed else None
    blocked = attention_and_grads(lambda *x: block_attention(*x, 0.3, BlockMask(rows, window, segments)), q, k, v)
    expected = attention_and_grads(lambda *x: fused(*x, 0.3, window, segments), q, k, v)
    for got, want in zip(blocked, expected):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=2e-5)


def test_block_attention_in_bfloat16_matches_float32():
    mx.random.seed(1)
    q, k, v = (mx.random.normal((1, h, 40, 32)) for h in (4, 1, 1))
    low = attention_and_grads(lambda *x: block_attention(*x, 0.2, BlockMask(8, 11)), *(t.astype(mx.bfloat16) for t in (q, k, v)))
    full = attention_and_grads(lambda *x: fused(*x, 0.2, 11), q, k, v)
    for got, want in zip(low, full):
        assert got.dtype == mx.bfloat16
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want), rtol=0.05, atol=0.05)


def lora_model(model_dir, seed=1):
    """A tiny model with LoRA on every linear layer, B matrices random so every gradient is nonzero."""
    model = apply_method(load_model(str(model_dir)).model, MethodConfig(rank=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    mx.random.seed(seed)
    model.update(tree_map(lambda p: 0.05 * mx.random.normal(p.shape), model.trainable_parameters()))
    return model


def token_losses_and_grads(model, tokens: mx.array, segment_ids: mx.array | None = None, compiled: bool = False):
    """(−log p of every next token, gradients of their sum) through the trainer's loss path; in a
    packed row, of the positions inside an example (segment > 0)."""
    trained = mx.ones(tokens[:, 1:].shape) if segment_ids is None else (segment_ids > 0).astype(mx.float32)
    targets, weights, select = selected_positions(tokens[:, 1:], trained)
    inputs = tokens[:, :-1]

    def losses(inputs, select, targets, weights, *segment_ids):
        cache = packing_cache(model, segment_ids[0] if segment_ids else None)
        per_token = position_losses(model, inputs, select, targets, weights, chunk_size=64, cache=cache)
        return per_token.sum(), per_token

    step = nn.value_and_grad(model, losses)
    if compiled:  # as the trainer's step is: the long rows' elementwise work fuses
        step = mx.compile(step, inputs=model.state, outputs=model.state)
    extra = () if segment_ids is None else (segment_ids,)
    (_, per_token), grads = step(inputs, select, targets, weights, *extra)
    return np.array(per_token), {k: np.array(v) for k, v in tree_flatten(grads)}


def assert_same(result, expected):
    np.testing.assert_allclose(result[0], expected[0], rtol=1e-5, atol=1e-5)
    assert result[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        np.testing.assert_allclose(result[1][name], grad, rtol=1e-4, atol=1e-5 * np.abs(grad).max(), err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_losses_and_gradients_equal_the_unblocked_model(family, tiny_models):
    """Longer than the tiny sliding window (32), in blocks of 16 queries, with and without checkpointing."""
    model = lora_model(tiny_models[family])
    tokens = mx.array(np.random.default_rng(0).integers(8, 300, size=(2, 97)), mx.int32)
    expected = token_losses_and_grads(model, tokens)
    prompt = tokens[:1, :20]
    generated_before = np.array(model(prompt, cache=make_prompt_cache(model)))

    enable_block_attention(model, 16)
    assert_same(token_losses_and_grads(model, tokens), expected)
    enable_grad_checkpoint(model)
    assert_same(token_losses_and_grads(model, tokens), expected)
    # A generation cache still takes mlx-lm's own attention.
    np.testing.assert_array_equal(np.array(model(prompt, cache=make_prompt_cache(model))), generated_before)


@pytest.mark.parametrize("method", ["prompt", "prefix", "adapter"])
def test_methods_that_wrap_the_body_keep_their_losses(method, tiny_models):
    """Prompt tuning runs the body on soft-prompt embeddings (blocks cover them too); prefix tuning
    hands the body its own cache (mlx-lm's attention stays); adapters add modules inside the blocks."""
    model = apply_method(load_model(str(tiny_models["gemma3"])).model, MethodConfig(name=method, num_virtual_tokens=5, prefix_length=4))
    mx.random.seed(2)
    model.update(tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), model.trainable_parameters()))
    tokens = mx.array(np.random.default_rng(1).integers(8, 300, size=(2, 70)), mx.int32)
    expected = token_losses_and_grads(model, tokens)
    enable_block_attention(model, 16)
    assert_same(token_losses_and_grads(model, tokens), expected)


@pytest.fixture(scope="module")
def tiny_gemma_long(tmp_path_factory):
    return build_random_model("gemma3", tmp_path_factory.mktemp("gemma-long"), hidden=32)


@pytest.mark.slow  # ~30 s of CPU: an 8,192-token row is the point
def test_packed_rows_of_8192_tokens_keep_examples_apart(tiny_gemma_long):
    """One 8,192-position row of four examples (and padding) in blocks: each example's per-token
    losses equal its own unpacked losses (MLX's fused attention), and the gradients equal the sum of
    the unpacked ones."""
    model = lora_model(tiny_gemma_long)
    rng = np.random.default_rng(2)
    lengths = [3001, 2500, 1700, 900]
    examples = [rng.integers(8, 300, size=n) for n in lengths]
    row = np.zeros(8193, np.int64)
    segments = np.zeros(8192, np.int32)
    start = 0
    for number, tokens in enumerate(examples, start=1):
        row[start : start + len(tokens)] = tokens
        segments[start : start + len(tokens) - 1] = number  # an example's last token is only a target
        start += len(tokens)

    alone = [token_losses_and_grads(model, mx.array(tokens[None], mx.int32), compiled=True) for tokens in examples]
    enable_block_attention(model, 512)
    packed_losses, packed_grads = token_losses_and_grads(model, mx.array(row[None], mx.int32), mx.array(segments[None]), compiled=True)
    np.testing.assert_allclose(packed_losses[: sum(lengths) - len(lengths)], np.concatenate([losses[: n - 1] for n, (losses, _) in zip(lengths, alone)]), rtol=1e-5, atol=1e-5)
    for name, grad in packed_grads.items():
        unpacked = sum(grads[name] for _, grads in alone)
        np.testing.assert_allclose(grad, unpacked, rtol=1e-4, atol=1e-4 * np.abs(unpacked).max(), err_msg=name)


def gradient_peak(attend, length: int) -> int:
    """MLX's peak memory over one compiled gradient of ``attend`` at ``length`` tokens (4 query heads
    sharing 2 kv heads of 16 dimensions, as the tiny models have), above what was allocated before."""
    q, k, v = (mx.random.normal((1, heads, length, 16), key=mx.random.key(heads)) for heads in (4, 2, 2))
    weights = mx.cos(mx.arange(q.size).reshape(q.shape) * 0.37)
    mx.eval(q, k, v, weights)
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(mx.compile(mx.grad(lambda *x: (attend(*x) * weights).sum(), argnums=(0, 1, 2)))(q, k, v))
    return mx.get_peak_memory() - before


def test_blocked_backward_memory_grows_linearly_with_length():
    """MLX's fused attention forms heads × L × L probabilities for the backward pass, so doubling the
    length more than triples the peak of its gradient; in blocks of 64 queries the peak doubles and
    stays below a quarter of one such matrix."""
    assert gradient_peak(lambda *x: fused(*x, 0.25), 4096) > 3 * gradient_peak(lambda *x: fused(*x, 0.25), 2048)
    blocked = {length: gradient_peak(lambda *x: block_attention(*x, 0.25, BlockMask(64)), length) for length in (2048, 4096)}
    assert blocked[4096] < 2.2 * blocked[2048]
    assert blocked[4096] < 4 * 4096 * 4096 * 4 / 4
