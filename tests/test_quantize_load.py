"""QLoRA's load quantizes layer by layer: the same arrays as quantizing the whole float model, without
the whole float model ever being in memory."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model as mlx_lm_load_model

from macft.backend import compute_dtype
from macft.errors import MacftError
from macft.models import load as loading
from macft.models.random_init import build_random_model


@pytest.fixture(scope="module")
def float32_model(tmp_path_factory) -> Path:
    """Eight layers, so that one layer's float weights are a small part of the model's."""
    return build_random_model("llama", tmp_path_factory.mktemp("qload"), hidden=256, layers=8, dtype="float32")


def float_bytes(model_dir: Path) -> tuple[int, int]:
    """(all float weights, the largest quantizable layer's weight) in bytes."""
    model, _ = mlx_lm_load_model(model_dir, lazy=True)
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    largest = max(m.weight.nbytes for _, m in model.named_modules() if loading.quantizable(m, 64))
    return total, largest


@pytest.fixture(scope="module")
def large_embedding_model(tmp_path_factory) -> Path:
    """Gemma-shaped with a 64k x 256 float32 embedding (64 MiB, and as much again for the head) that
    dwarfs its layers, as Gemma 3 270M's 262k x 640 one (671 MB) dwarfs its layers."""
    model_dir = build_random_model("gemma3", tmp_path_factory.mktemp("bigvocab"), hidden=256, layers=2, dtype="float32")
    config = json.loads((model_dir / "config.json").read_text())
    small, config["vocab_size"] = config["vocab_size"], 1 << 16
    (model_dir / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(model_dir / "model.safetensors"))
    mx.random.seed(1)
    for name in [k for k, v in weights.items() if v.shape[0] == small]:
        weights[name] = 0.08 * mx.random.normal((config["vocab_size"], config["hidden_size"]))
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    return model_dir


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_by_layer_gives_the_arrays_of_whole_model_quantization(float32_model, dtype, tmp_path):
    model_dir = float32_model
    if dtype != "float32":  # rows read from the file as their bits, then cast as the whole model is
        model_dir = build_random_model("llama", tmp_path / dtype, hidden=256, layers=2, dtype=dtype)
    reference, _ = mlx_lm_load_model(model_dir)
    loading.cast_floats(reference, compute_dtype())
    loading.quantize_model(reference, 4, 64)
    loaded = loading.load_model(str(model_dir), quantize_bits=4, group_size=64).model
    want, got = dict(tree_flatten(reference.parameters())), dict(tree_flatten(loaded.parameters()))
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype and mx.array_equal(got[name], value).item(), name
    kinds = {type(m).__name__ for _, m in loaded.named_modules()}
    assert "QuantizedLinear" in kinds and "Linear" not in kinds


def test_the_loader_never_holds_the_float_model(float32_model, monkeypatch):
    total, largest = float_bytes(float32_model)
    monkeypatch.setattr(loading, "QUANTIZE_BLOCK", 1 << 14)  # blocks well below a layer, as on a large model
    # Arrays earlier tests in this process keep alive count in MLX's peak: measure above them.
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    loading.load_model(str(float32_model), quantize_bits=4, group_size=64)
    layer_by_layer = mx.get_peak_memory() - before

    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    whole, _ = mlx_lm_load_model(float32_model)
    loading.quantize_model(whole, 4, 64)
    mx.eval(whole.parameters())
    at_once = mx.get_peak_memory() - before
    del whole

    # The quantized model (~1/6 of the float one at 4 bits) plus about one float layer.
    assert at_once >= total
    assert layer_by_layer < total / 6 + 2 * largest
    assert layer_by_layer < 0.5 * at_once


def test_a_large_embedding_is_read_from_its_file_a_block_at_a_time(large_embedding_model, monkeypatch):
    model, _ = mlx_lm_load_model(large_embedding_model, lazy=True)
    embedding = model.model.embed_tokens.weight.nbytes
    reference, _ = mlx_lm_load_model(large_embedding_model)
    loading.quantize_model(reference, 4, 64)
    want = dict(tree_flatten(reference.parameters()))
    del model, reference

    monkeypatch.setattr(loading, "QUANTIZE_BLOCK", 1 << 16)
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    loaded = loading.load_model(str(large_embedding_model), quantize_bits=4, group_size=64).model
    peak = mx.get_peak_memory() - before

    # The 4-bit embedding and head (with float32 scales and biases, 5/32 of the float size each) and
    # one of them again while its blocks are joined: about half the float embedding. Reading the
    # embedding whole (as MLX's lazy load of a slice of it does) would add all of it (measured 1.5x).
    assert peak < 0.6 * embedding, (peak, embedding)
    got = dict(tree_flatten(loaded.parameters()))
    assert all(mx.array_equal(got[k], v).item() for k, v in want.items())


def test_a_damaged_layer_is_named_before_it_is_quantized(float32_model, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in float32_model.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    weights = mx.load(str(broken / "model.safetensors"))
    name = next(k for k in weights if k.endswith("layers.3.mlp.down_proj.weight"))
    weights[name] = mx.where(mx.arange(weights[name].size).reshape(weights[name].shape) == 7, mx.nan, weights[name])
    mx.save_safetensors(str(broken / "model.safetensors"), weights)
    with pytest.raises(MacftError, match=r"layers\.3\.mlp\.down_proj\.weight"):
        loading.load_model(str(broken), quantize_bits=4, group_size=64)
