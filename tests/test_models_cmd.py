"""`macft models` finds models in a fake home: HF cache, Ollama (manifest + blob), LM Studio, macft's cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
from click.testing import CliRunner

from macft.cli import cli
from macft.discovery import find_models


def write_gguf(path, arch="llama", hidden=32, layers=2, vocab=64, file_type=15):
    """A tiny but valid GGUF written with gguf-py (the reference writer)."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_file_type(file_type)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_head_count(4)
    writer.add_token_list([f"t{i}" for i in range(vocab)])
    writer.add_tensor("token_embd.weight", np.zeros((vocab, hidden), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((hidden, hidden), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return vocab * hidden + hidden * hidden


def test_models_found_in_fake_home(tmp_path, monkeypatch, tiny_model_dir):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)

    # An HF hub cache entry: models--org--name/snapshots/<rev>/ with the files.
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snapshot)
    config = json.loads((snapshot / "config.json").read_text())

    # Ollama: a manifest naming the model layer's blob.
    blob_digest = "sha256:" + "ab" * 32
    blob = home / ".ollama" / "models" / "blobs" / blob_digest.replace(":", "-")
    ollama_params = write_gguf(blob, arch="qwen2", file_type=7)  # Q8_0
    manifest = home / ".ollama" / "models" / "manifests" / "registry.ollama.ai" / "library" / "tinyqwen" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "cd" * 32},
        {"mediaType": "application/vnd.ollama.image.model", "digest": blob_digest},
    ]}))

    # LM Studio: publisher/model/file.gguf
    lms_params = write_gguf(home / ".lmstudio" / "models" / "someone" / "tiny-GGUF" / "tiny-Q4_K_M.gguf", file_type=15)

    by_source = {}
    for found in find_models():
        by_source.setdefault(found.source, []).append(found)

    (hf,) = by_source["hf-cache"]
    assert hf.name == hf.spec == "tiny-org/tiny-llama"
    assert hf.family == "llama" and hf.quantization is None
    assert hf.size_bytes == (tiny_model_dir / "model.safetensors").stat().st_size
    import mlx.core as mx

    assert hf.params == sum(v.size for v in mx.load(str(tiny_model_dir / "model.safetensors")).values())
    assert config["model_type"] == hf.family

    (ollama,) = by_source["ollama"]
    assert (ollama.name, ollama.family, ollama.quantization, ollama.params) == ("tinyqwen:latest", "qwen2", "Q8_0", ollama_params)
    assert ollama.spec == str(blob) and ollama.size_bytes == blob.stat().st_size

    (lms,) = by_source["lm-studio"]
    assert lms.name == "someone/tiny-GGUF/tiny-Q4_K_M.gguf" and lms.quantization == "Q4_K_M" and lms.params == lms_params

    (embedded,) = by_source["embedded"]  # listed even before its GGUF is assembled in this (fake) home
    assert embedded.spec == "gemma3-270m" and embedded.family == "gemma3"

    runner = CliRunner()
    listed = runner.invoke(cli, ["models", "--json"])
    assert listed.exit_code == 0, listed.output
    assert {m["name"] for m in json.loads(listed.output)} >= {"tiny-org/tiny-llama", "tinyqwen:latest"}
    table = runner.invoke(cli, ["models"])
    assert table.exit_code == 0 and "tinyqwen:latest" in table.output


def test_broken_files_are_skipped(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    bad = home / ".lmstudio" / "models" / "x" / "broken.gguf"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    assert all(m.source != "lm-studio" for m in find_models())
