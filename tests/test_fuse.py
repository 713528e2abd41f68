"""`macft fuse`: the merged model computes what base + adapter computed, and mlx-lm opens it."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_unflatten

from macft.cli import cli
from macft.config import Recipe
from macft.errors import MacftError
from macft.export.fuse import fuse_adapter, load_fused
from macft.adapters.files import save_adapter
from macft.methods import apply_method
from macft.models.load import load_model

TEXT = "The quick brown fox jumps over the lazy dog. SELECT name FROM users WHERE age > 30;"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_run(model_dir: Path, run_dir: Path, *, method: str = "lora", quantize_bits: int | None = None, seed: int = 1, targets=ALL_LINEAR):
    """A run directory as `macft lora` leaves it, with random (non-zero) trained weights.

    Returns the adapted model's logits on TEXT (the reference a fused model must reproduce)."""
    recipe = Recipe().replace(
        model={"path": str(model_dir), "quantize_bits": quantize_bits},
        method={"name": method, "rank": 4, "alpha": 8.0, "target_modules": targets, "num_virtual_tokens": 4},
    )
    loaded = load_model(str(model_dir), quantize_bits=quantize_bits, group_size=recipe.model.quantize_group_size)
    model = apply_method(loaded.model, recipe.method, loaded.tokenizer)
    mx.random.seed(seed)
    trained = [(k, v + 0.2 * mx.random.normal(v.shape).astype(v.dtype)) for k, v in tree_flatten(model.trainable_parameters())]
    model.update(tree_unflatten(trained))
    save_adapter(model, run_dir, recipe.method, loaded.identity, recipe.model.recorded)
    return np.array(model(mx.array(loaded.tokenizer.encode(TEXT))[None])[0].astype(mx.float32)), loaded.tokenizer


def mlx_logits(model, tokenizer) -> np.ndarray:
    return np.array(model(mx.array(tokenizer.encode(TEXT))[None])[0].astype(mx.float32))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fused_float_model_matches_base_plus_adapter(tiny_models, tmp_path, method):
    import mlx_lm

    reference, tokenizer = make_run(tiny_models["llama"], tmp_path / "run", method=method)
    result = fuse_adapter(tmp_path / "run", tmp_path / "fused")
    assert result.fused_layers == 14 and result.quantization == "float"
    model, fused_tokenizer = mlx_lm.load(str(tmp_path / "fused"))
    fused = mlx_logits(model, fused_tokenizer)
    assert fused_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)
    np.testing.assert_allclose(fused, reference, atol=5e-5, rtol=0)
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert not any(k.endswith(("lora_a", "lora_b", "magnitude")) for k in names)
    assert json.loads((tmp_path / "fused" / "macft_fuse.json").read_text())["method"] == method


def test_fuse_phi3_fused_projections(tiny_models, tmp_path):
    import mlx_lm

    reference, _ = make_run(tiny_models["phi3"], tmp_path / "run")
    fuse_adapter(tmp_path / "run", tmp_path / "fused")
    model, tokenizer = mlx_lm.load(str(tmp_path / "fused"))
    np.testing.assert_allclose(mlx_logits(model, tokenizer), reference, atol=5e-5, rtol=0)


def test_qlora_fuse_keeps_base_quantization_exactly_and_requantizes_once(tiny_models, tmp_path):
    import mlx_lm

    # hidden 64 only allows group size 64 for the 64-wide inputs; the base is quantized at load like QLoRA.
    reference, _ = make_run(tiny_models["qwen3"], tmp_path / "run", quantize_bits=4)

    as_base = fuse_adapter(tmp_path / "run", tmp_path / "as-base")
    model, tokenizer = mlx_lm.load(str(tmp_path / "as-base"))
    assert as_base.quantization == "as base"
    np.testing.assert_allclose(mlx_logits(model, tokenizer), reference, atol=5e-5, rtol=0)
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    assert "QuantizedEmbedding" in kinds and "Linear" in kinds  # untouched layers stay quantized

    fuse_adapter(tmp_path / "run", tmp_path / "float", dequantize=True)
    model, tokenizer = mlx_lm.load(str(tmp_path / "float"))
    assert not any("Quantized" in type(m).__name__ for _, m in model.named_modules())
    np.testing.assert_allclose(mlx_logits(model, tokenizer), reference, atol=5e-5, rtol=0)

    fuse_adapter(tmp_path / "run", tmp_path / "q8", quantize_bits=8)
    model, tokenizer = mlx_lm.load(str(tmp_path / "q8"))
    requantized = mlx_logits(model, tokenizer)
    # One 8-bit quantization of the merged weights: logits move by a small fraction of their spread.
    bound = 0.05 * np.abs(reference).max()
    assert np.abs(requantized - reference).max() < bound
    assert (requantized.argmax(-1) == reference.argmax(-1)).mean() > 0.9


def test_fuse_refuses_what_cannot_be_merged(tiny_models, tmp_path):
    for method in ("prompt", "adapter"):
        make_run(tiny_models["llama"], tmp_path / method, method=method)
        with pytest.raises(MacftError, match="merge"):
            load_fused(tmp_path / method)
    with pytest.raises(MacftError, match="not both"):
        fuse_adapter(tmp_path / "prompt", dequantize=True, quantize_bits=4)


def test_fuse_cli_json(tiny_models, tmp_path):
    make_run(tiny_models["gemma3"], tmp_path / "run")
    result = CliRunner().invoke(cli, ["fuse", "--adapter", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert Path(info["path"]) == tmp_path / "run" / "fused"
    assert (tmp_path / "run" / "fused" / "tokenizer.json").is_file()
    missing = CliRunner().invoke(cli, ["fuse", "--adapter", str(tmp_path)])
    assert missing.exit_code == 1 and "No adapter weights" in missing.output
