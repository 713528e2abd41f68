"""Hugging Face PEFT adapters in and out, against the real transformers + PEFT on CPU torch.

For every supported family (a tiny random model that transformers and macft both load from the same
folder): macft's LoRA/DoRA adapter exported with ``macft export peft`` has exactly the keys, shapes and
config PEFT saves for it, loads in ``PeftModel.from_pretrained`` with no warning beyond those PEFT's own
file gives, and computes macft's logits; a PEFT adapter (random weights, saved by PEFT) computes PEFT's
logits in macft. Logits agree to 1e-4 (float32; the adapters move them by more than 0.05). The torch
side runs in ``tests/peft_reference.py``, a process of its own (torch and macft's OpenBLAS do not mix).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from macft.errors import MacftError
from macft.models.random_init import FAMILIES, build_random_model

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "peft", "transformers")),
    reason="needs the test extra's torch, transformers and peft",
)

IDS = [2, 10, 20, 30, 40, 50, 60, 70, 80, 90]
TOLERANCE = 1e-4  # max |logit difference|, float32 on both sides
# Qwen3-MoE's experts and router are parameters, not linear layers, in transformers: attention only.
TARGETS = {"qwen3_moe": ("q_proj", "k_proj", "v_proj", "o_proj")}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-models")
    return {family: build_random_model(family, root / family, hf_layout=True) for family in FAMILIES}


def macft_logits(model) -> np.ndarray:
    import mlx.core as mx

    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


def macft_run(model_dir: Path, run_dir: Path, method: str, targets=("all-linear",), num_layers: int = -1, seed: int = 1):
    """A macft run directory whose LoRA/DoRA weights are all random (B and magnitudes too); also its logits."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from macft.config import Recipe
    from macft.adapters.files import save_adapter
    from macft.methods import apply_method
    from macft.models.load import load_model

    recipe = Recipe().replace(
        model={"path": str(model_dir)},
        method={"name": method, "rank": 4, "alpha": 8.0, "target_modules": tuple(targets), "num_layers": num_layers},
    )
    loaded = load_model(str(model_dir))
    base_logits = macft_logits(loaded.model)
    model = apply_method(loaded.model, recipe.method)
    mx.random.seed(seed)
    params = tree_flatten(model.trainable_parameters())
    model.load_weights([(k, 0.1 * mx.random.normal(v.shape)) for k, v in params if k.endswith("lora_b")], strict=False)
    model.load_weights([(k, v * (1 + 0.1 * mx.random.normal(v.shape))) for k, v in params if k.endswith("magnitude")], strict=False)
    save_adapter(model, run_dir, recipe.method, loaded.identity, recipe.model.recorded)
    return macft_logits(model), base_logits


def assert_close(ours: np.ndarray, theirs: np.ndarray, base: np.ndarray) -> None:
    assert np.abs(theirs - base).max() > 0.05, "the adapter must move the logits, or the comparison proves nothing"
    assert np.abs(ours - theirs).max() <= TOLERANCE


def peft_config_of(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def tensor_shapes(folder: Path) -> dict[str, tuple]:
    import mlx.core as mx

    return {k: tuple(v.shape) for k, v in mx.load(str(folder / "adapter_model.safetensors")).items()}


def lora_keywords(config: dict) -> dict:
    keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "layers_to_transform", "layers_pattern", "task_type")
    return {k: config[k] for k in keys}


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_out_and_in_match_transformers(family, method, hf_models, peft_reference, tmp_path):
    from macft.adapters.peft import adapter_run
    from macft.chat import open_model
    from macft.export.peft import export_peft

    model_dir = hf_models[family]
    # out: macft's adapter as PEFT saves it
    ours, base = macft_run(model_dir, tmp_path / "run", method, TARGETS.get(family, ("all-linear",)))
    export = export_peft(tmp_path / "run", tmp_path / "peft")
    config = peft_config_of(export.path)
    assert config["base_model_name_or_path"] == str(model_dir.resolve()) and config["use_dora"] == (method == "dora")
    peft_reference.call("save", model=str(model_dir.resolve()), config=lora_keywords(config), out=str(tmp_path / "peft-own"))
    assert tensor_shapes(export.path) == tensor_shapes(tmp_path / "peft-own")  # every key and shape PEFT saves
    own = peft_config_of(tmp_path / "peft-own")
    own["target_modules"] = sorted(own["target_modules"])  # PEFT writes a set's order
    assert {k: own[k] for k in config} == config  # every field macft writes, as PEFT writes it
    theirs, warned = peft_reference.logits(model_dir, export.path, IDS, tmp_path / "out.npy")
    _, own_warned = peft_reference.logits(model_dir, tmp_path / "peft-own", IDS, tmp_path / "own.npy")
    assert set(warned) <= set(own_warned), warned
    assert_close(ours, theirs, base)

    # in: a PEFT adapter with random weights, in macft
    peft_reference.call("save", model=str(model_dir), config=lora_keywords(config), out=str(tmp_path / "peft-in"), seed=7)
    theirs, _ = peft_reference.logits(model_dir, tmp_path / "peft-in", IDS, tmp_path / "in.npy")
    opened = open_model(None, tmp_path / "peft-in")  # the base: the adapter's base_model_name_or_path
    assert opened.adapter == adapter_run(tmp_path / "peft-in") and opened.adapter_config["method"] == method
    assert_close(macft_logits(opened.model), theirs, base)


def test_partial_layers_and_the_check_catches_wrong_keys_and_transposes(hf_models, peft_reference, tmp_path):
    """Adapting the last layer only writes layers_to_transform; a swapped pair of B matrices or a renamed
    key (what a wrong name map or transpose produces) fails the comparison."""
    from safetensors.numpy import load_file, save_file

    from macft.export.peft import export_peft

    model_dir = hf_models["llama"]
    ours, base = macft_run(model_dir, tmp_path / "run", "lora", ("q_proj", "v_proj"), num_layers=1)
    export = export_peft(tmp_path / "run", tmp_path / "peft")
    config = peft_config_of(export.path)
    assert config["layers_to_transform"] == [1] and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    theirs, warned = peft_reference.logits(model_dir, export.path, IDS, tmp_path / "a.npy")
    assert not [w for w in warned if "key" in w.lower()]
    assert_close(ours, theirs, base)

    tensors = load_file(str(export.path / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.self_attn."
    swapped = dict(tensors)
    swapped[f"{prefix}q_proj.lora_A.weight"], swapped[f"{prefix}v_proj.lora_A.weight"] = tensors[f"{prefix}v_proj.lora_A.weight"], tensors[f"{prefix}q_proj.lora_A.weight"]
    broken = tmp_path / "swapped"
    shutil.copytree(export.path, broken)
    save_file(swapped, str(broken / "adapter_model.safetensors"), metadata={"format": "pt"})
    wrong, _ = peft_reference.logits(model_dir, broken, IDS, tmp_path / "b.npy")
    assert np.abs(ours - wrong).max() > 100 * TOLERANCE

    renamed = {k.replace("q_proj.lora_B", "q_proj.lora_b"): v for k, v in tensors.items()}
    save_file(renamed, str(broken / "adapter_model.safetensors"), metadata={"format": "pt"})
    wrong, warned = peft_reference.logits(model_dir, broken, IDS, tmp_path / "c.npy")
    assert any("key" in w.lower() for w in warned) and np.abs(ours - wrong).max() > 100 * TOLERANCE


def test_a_mismatching_base_is_one_line_naming_both(hf_models, peft_reference, tmp_path):
    from macft.adapters.peft import adapter_run

    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    peft_reference.call("save", model=str(hf_models["llama"]), config=config, out=str(tmp_path / "peft"), seed=3)
    other = build_random_model("llama", tmp_path / "narrow", hidden=32)
    with pytest.raises(MacftError) as caught:
        adapter_run(tmp_path / "peft", str(other))
    message = str(caught.value)
    assert "\n" not in message and str(hf_models["llama"]) in message and str(other) in message and "64→64" in message

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/home/someone/models/llama"  # trained on another machine
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MacftError, match=r"^The PEFT adapter .* was trained on '/home/someone/models/llama', which macft cannot open here .*pass --model"):
        adapter_run(tmp_path / "peft")


def test_a_hub_id_resolves_through_the_hub_cache_offline(hf_models, peft_reference, tmp_path, monkeypatch):
    """huggingface_hub's real snapshot_download, offline: a cached adapter is found, an uncached one is one line."""
    from huggingface_hub import constants

    from macft.adapters.peft import adapter_run, read_peft

    config = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM", "use_dora": True}
    peft_reference.call("save", model=str(hf_models["qwen2"]), config=config, out=str(tmp_path / "peft"), seed=5)
    cache = tmp_path / "hub"
    commit = "0" * 40
    snapshot = cache / "models--someone--tiny-dora" / "snapshots" / commit
    shutil.copytree(tmp_path / "peft", snapshot)
    (cache / "models--someone--tiny-dora" / "refs").mkdir()
    (cache / "models--someone--tiny-dora" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    adapter = read_peft("someone/tiny-dora")
    assert adapter.method == "dora" and adapter.alpha == 16 and adapter.folder.resolve() == snapshot.resolve()
    assert (adapter_run("someone/tiny-dora") / "adapters.safetensors").is_file()
    with pytest.raises(MacftError, match=r"^No adapter at someone/missing: no such folder here, and fetching it from the Hugging Face Hub failed \("):
        read_peft("someone/missing")


def test_what_peft_or_macft_cannot_carry_is_refused_in_one_line(hf_models, tmp_path):
    from macft.adapters.peft import read_peft
    from macft.export.peft import export_peft

    # qwen3_moe experts: 3-D stacks in transformers
    macft_run(hf_models["qwen3_moe"], tmp_path / "moe", "lora", ("q_proj", "gate_proj"))
    with pytest.raises(MacftError, match="mixture-of-experts"):
        export_peft(tmp_path / "moe", tmp_path / "moe-peft")
    assert not (tmp_path / "moe-peft").exists()

    folder = tmp_path / "other"
    folder.mkdir()
    cases = [
        ({"peft_type": "PREFIX_TUNING"}, "is a PEFT PREFIX_TUNING adapter"),
        ({"peft_type": "LORA", "r": 4, "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "LORA", "r": 4, "rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ]
    for config, expected in cases:
        (folder / "adapter_config.json").write_text(json.dumps(config))
        with pytest.raises(MacftError, match=expected):
            read_peft(str(folder))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(MacftError, match="pickled adapter_model.bin"):
        read_peft(str(folder))
