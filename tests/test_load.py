"""Model loading: float32 compute on CPU, QLoRA quantization at load, content identity, clear errors."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load

from macft.backend import detect
from macft.errors import MacftError
from macft.models.load import load_model
from macft.paths import atomic_path


def test_loads_in_compute_dtype_with_identity(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    expected = mx.float32 if detect().device == "cpu" else mx.bfloat16
    assert {v.dtype for _, v in tree_flatten(loaded.model.parameters())} == {expected}
    assert loaded.family == "llama" and len(loaded.identity["sha256"]) == 64
    reference, _ = mlx_lm_load(str(tiny_model_dir))
    ids = mx.array([loaded.tokenizer.encode("SELECT name FROM users")])
    np.testing.assert_allclose(np.array(loaded.model(ids)), np.array(reference(ids).astype(mx.float32)), atol=1e-5)


def test_quantize_bits_quantizes_the_frozen_base(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), quantize_bits=4, group_size=32)
    layer = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, nn.QuantizedLinear) and layer.bits == 4 and layer.group_size == 32


@pytest.mark.parametrize("spec, fragment", [("missing.gguf", "does not exist"), ("not/a/dir/x", "not found")])
def test_bad_model_specs(spec, fragment, tmp_path):
    with pytest.raises(MacftError, match=fragment):
        load_model(spec)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(MacftError, match="no config.json"):
        load_model(str(tmp_path))


def test_atomic_path_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("original")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "original"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
