"""The commands with PEFT adapters: ``export peft``, ``lora --init-adapter``, and ``generate``, ``fuse`` and
``export gguf`` given a PEFT adapter; the reference is transformers + PEFT (``tests/peft_reference.py``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from macft.cli import cli
from macft.models.random_init import build_random_model

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "peft", "transformers")),
    reason="needs the test extra's torch, transformers and peft",
)

IDS = [2, 10, 20, 30, 40, 50, 60, 70]
DORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True, "layers_to_transform": [1], "layers_pattern": "layers", "task_type": "CAUSAL_LM"}
LORA = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "task_type": "CAUSAL_LM"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, peft_reference) -> dict[str, Path]:
    """A tiny llama, a small dataset, and two PEFT adapters for it (random weights): DoRA on the last layer, LoRA on all."""
    root = tmp_path_factory.mktemp("peft-cli")
    model = build_random_model("llama", root / "model", hf_layout=True)
    data = root / "data"
    data.mkdir()
    rows = [{"prompt": f"Q: {i} plus one?", "completion": f" {i + 1}"} for i in range(30)]
    for name, part in (("train", rows[:20]), ("valid", rows[20:25]), ("test", rows[25:])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    for name, config in (("dora", DORA), ("lora", LORA)):
        peft_reference.call("save", model=str(model), config=config, out=str(root / name), seed=11)
    return {"model": model, "data": data, "dora": root / "dora", "lora": root / "lora", "root": root}


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def peft_tensors(folder: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(folder / "adapter_model.safetensors")).items()}


def test_lora_continues_a_peft_adapter(setup, tmp_path):
    common = ("--init-adapter", setup["dora"], "--data", setup["data"], "--out-dir", tmp_path, "--set", "demo.count=0", "--json")
    # With a learning rate too small to move anything, the run's adapter is the PEFT adapter: the
    # weights went in exactly, into exactly its layers, and come back out as PEFT saved them.
    still = invoke("lora", *common, "--name", "still", "--iters", 1, "--lr", 1e-12)
    assert still.exit_code == 0, still.output
    summary = json.loads(still.output)
    assert summary["method"] == "dora" and summary["model"]["source"] == str(setup["model"])  # the adapter's base
    original = peft_tensors(setup["dora"])
    assert summary["trainable_parameters"] == sum(v.size for v in original.values())  # its layers only (layer 1)
    exported = invoke("export", "peft", "--adapter", tmp_path / "still", "--out", tmp_path / "back")
    assert exported.exit_code == 0, exported.output
    back = peft_tensors(tmp_path / "back")
    assert back.keys() == original.keys() and all(np.allclose(back[k], original[k], atol=1e-6) for k in original)
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1] and config["use_dora"] and config["r"] == 4 and config["lora_alpha"] == 8

    trained = invoke("lora", *common, "--name", "trained", "--iters", 8, "--lr", 1e-3)
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.output)["best_val_loss"] < summary["best_val_loss"] - 0.05  # training goes on from there

    conflict = invoke("lora", *common, "--name", "conflict", "--iters", 1, "--rank", 8)
    assert conflict.exit_code == 1 and "sets method.rank to 8, but the adapter" in conflict.output
    assert len(conflict.output.strip().splitlines()) == 1


def test_fuse_generate_and_export_gguf_take_a_peft_adapter(setup, peft_reference, tmp_path, monkeypatch):
    import mlx.core as mx

    from macft.models.load import load_model

    monkeypatch.chdir(tmp_path)
    theirs, _ = peft_reference.logits(setup["model"], setup["lora"], IDS, tmp_path / "peft.npy")
    fused = invoke("fuse", "--adapter", setup["lora"], "--json")
    assert fused.exit_code == 0, fused.output
    path = Path(json.loads(fused.output)["path"])
    assert path == Path("lora-fused")  # named after the adapter, here; never inside a cache
    merged = np.array(load_model(str(path)).model(mx.array([IDS]))[0].astype(mx.float32))
    assert np.abs(merged - theirs).max() <= 1e-4

    generated = invoke("generate", "--adapter", setup["lora"], "-p", "Q: 3 plus one?", "-n", 3, "--no-chat", "--json")
    assert generated.exit_code == 0, generated.output
    assert json.loads(generated.output)["tokens"] > 0

    adapter_gguf = invoke("export", "gguf", "--adapter", setup["lora"], "--adapter-only", "--model", setup["model"])
    assert adapter_gguf.exit_code == 0, adapter_gguf.output
    assert (tmp_path / "lora-lora.gguf").is_file()

    with_other_model = invoke("fuse", "--adapter", setup["lora"], "--model", build_random_model("llama", tmp_path / "narrow", hidden=32), "--out", "x")
    assert with_other_model.exit_code == 1 and "does not fit" in with_other_model.output and not Path("x").exists()


def test_export_peft_refusals_and_overwrite_policy(setup, tmp_path):
    import mlx.core as mx

    from macft.config import Recipe
    from macft.adapters.files import save_adapter
    from macft.methods import apply_method
    from macft.models.load import load_model

    loaded = load_model(str(setup["model"]))
    recipe = Recipe().replace(model={"path": str(setup["model"])}, method={"name": "prompt", "num_virtual_tokens": 4})
    save_adapter(apply_method(loaded.model, recipe.method), tmp_path / "prompt-run", recipe.method, loaded.identity, recipe.model.recorded)
    (tmp_path / "prompt-run" / "adapters.safetensors").write_bytes(b"not weights")  # refused before it is read
    refused = invoke("export", "peft", "--adapter", tmp_path / "prompt-run")
    assert refused.exit_code == 1 and "method 'prompt' (prompt tuning)" in refused.output
    assert len(refused.output.strip().splitlines()) == 1

    recipe = Recipe().replace(model={"path": str(setup["model"])}, method={"name": "lora", "rank": 2})
    run = tmp_path / "run"
    save_adapter(apply_method(load_model(str(setup["model"])).model, recipe.method), run, recipe.method, loaded.identity, recipe.model.recorded)
    mx.eval()
    assert invoke("export", "peft", "--adapter", run).exit_code == 0 and (run / "peft" / "adapter_model.safetensors").is_file()
    again = invoke("export", "peft", "--adapter", run)
    assert again.exit_code == 0, again.output  # its own earlier output: replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    blocked = invoke("export", "peft", "--adapter", run, "--out", mine)
    assert blocked.exit_code == 1 and "--force" in blocked.output and (mine / "notes.txt").read_text() == "keep me"
    assert invoke("export", "peft", "--adapter", run, "--out", mine, "--force").exit_code == 0
    assert not (mine / "notes.txt").exists() and (mine / "adapter_config.json").is_file()
    onto_input = invoke("export", "peft", "--adapter", run, "--out", run, "--force")
    assert onto_input.exit_code == 1 and "this command's input" in onto_input.output
