"""Fine-tune the model Ollama or LM Studio already runs, and hand the result back: a fake Ollama store
and LM Studio folder built here, and a stub ``ollama`` on PATH that records its arguments."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest
from click.testing import CliRunner

from macft.cli import cli
from macft.discovery import find_models
from macft.models.spec import resolve_app_model
from macft.errors import MacftError
from macft.export.pipeline import export_gguf

STUB = """#!/bin/sh
echo "$@" >> "{log}"
if [ -n "$STUB_OLLAMA_FAILS" ]; then echo "Error: the stub refuses" >&2; exit 1; fi
echo "success"
"""


def run_cli(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def said(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture
def ollama_store(tmp_path, monkeypatch, tiny_model_dir):
    """An Ollama store holding the tiny model as ``tinyllama:1b``: a GGUF blob named by its sha256 and a manifest."""
    store = tmp_path / "ollama"
    gguf = tmp_path / "tiny.gguf"
    export_gguf(model=str(tiny_model_dir), quant="f16", out=gguf)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (store / "blobs").mkdir(parents=True)
    blob = store / "blobs" / f"sha256-{digest}"
    gguf.rename(blob)
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tinyllama" / "1b"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"layers": [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}"}]}))
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # LM Studio's folders live under it
    return blob, digest


@pytest.fixture
def stub_ollama(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    log = tmp_path / "ollama-args.txt"
    script = folder / "ollama"
    script.write_text(STUB.format(log=log))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"prompt": f"Q: {i} plus one?", "completion": f" {i + 1}"} for i in range(12)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_ollama_names_resolve_like_macft_models(ollama_store):
    blob, _ = ollama_store
    assert [m.spec for m in find_models() if m.source == "ollama"] == [str(blob)]
    assert resolve_app_model("ollama:tinyllama:1b") == resolve_app_model("ollama:TinyLlama:1b") == str(blob)
    with pytest.raises(MacftError, match=r"no such model in Ollama's store .*; close names: ollama:tinyllama:1b\.$"):
        resolve_app_model("ollama:tinylama:1b")
    with pytest.raises(MacftError, match="no such model"):
        resolve_app_model("ollama:tinyllama")  # the tag defaults to latest, which this store lacks
    assert resolve_app_model("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"  # other specs pass through
    imported = run_cli("import", "ollama:tinyllama:1b", "--json")
    assert imported.exit_code == 0, imported.output
    assert json.loads(imported.output[imported.output.index("{") :])["source"] == str(blob)


def test_train_on_an_ollama_model_and_hand_it_back(ollama_store, stub_ollama, data_dir, tmp_path):
    blob, digest = ollama_store
    miss = run_cli("lora", "--model", "ollama:tinyllama:2b", "--data", data_dir, "--iters", 1)
    assert miss.exit_code == 1 and said(miss).endswith("close names: ollama:tinyllama:1b.")

    trained = run_cli(
        "lora", "--model", "ollama:tinyllama:1b", "--data", data_dir, "--iters", 2, "--out-dir", tmp_path / "runs",
        "--name", "mine", "--set", "demo.count=0", "--json",
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    summary = json.loads(trained.output[trained.output.index("{") :])
    # Trained on exactly that blob: the GGUF import hashes the file it read.
    assert summary["model"]["source"] == "ollama:tinyllama:1b" and summary["model"]["sha256"] == digest
    run = tmp_path / "runs" / "mine"

    exported = run_cli("export", "gguf", "--adapter", run, "--quant", "q8_0", "--ollama", "Mine-Tuned")
    assert exported.exit_code == 0, exported.output
    modelfile = run / "mine-q8_0.Modelfile"
    assert stub_ollama.read_text().split() == ["create", "mine-tuned", "-f", str(modelfile)]
    assert modelfile.read_text().startswith(f"FROM {(run / 'mine-q8_0.gguf').resolve()}\n")  # the fused model
    assert "ADAPTER" not in modelfile.read_text()
    assert f"Ran: ollama create mine-tuned -f {modelfile}" in said(exported)

    os.environ["STUB_OLLAMA_FAILS"] = "1"
    try:
        refused = run_cli("export", "gguf", "--adapter", run, "--adapter-only", "--ollama", "mine-lora")
    finally:
        del os.environ["STUB_OLLAMA_FAILS"]
    assert refused.exit_code == 1
    assert "`ollama create mine-lora -f" in said(refused) and "the stub refuses" in said(refused)
    assert "0.34.1 and later refuse them" in said(refused)  # an ADAPTER Modelfile: the versions note

    os.environ["PATH"] = str(tmp_path / "nowhere")  # no ollama command here (monkeypatch restores PATH)
    by_hand = run_cli("export", "gguf", "--adapter", run, "--quant", "q8_0", "--ollama", "mine-tuned")
    assert by_hand.exit_code == 0, by_hand.output
    assert "the `ollama` command is not installed here" in said(by_hand)
    assert f"Run: ollama create mine-tuned -f {modelfile}" in said(by_hand)
    assert len(stub_ollama.read_text().splitlines()) == 2  # the stub was not called again
    bad = run_cli("export", "gguf", "--adapter", run, "--ollama", "my model!")
    assert bad.exit_code == 1 and "'my model!' is not a valid Ollama model name" in said(bad)


def test_export_into_lm_studio_and_read_it_back(ollama_store, data_dir, tmp_path, tiny_model_dir):
    exported = run_cli("export", "gguf", "--model", tiny_model_dir, "--quant", "q8_0", "--lm-studio", "--name", "tiny")
    assert exported.exit_code == 0, exported.output
    stem = f"{tiny_model_dir.name}-q8_0"
    target = tmp_path / "home" / ".lmstudio" / "models" / "macft" / stem / f"{stem}.gguf"
    assert target.is_file() and f"LM Studio lists it as macft/{stem}" in said(exported)
    listed = [m for m in find_models() if m.source == "lm-studio"]
    assert [(m.name, m.spec, m.quantization) for m in listed] == [(f"macft/{stem}/{stem}.gguf", str(target), "Q8_0")]

    for name in (stem, f"macft/{stem}", f"macft/{stem}/{stem}.gguf"):
        assert resolve_app_model(f"lmstudio:{name}") == str(target)
    estimate = run_cli("estimate", "--model", f"lmstudio:{stem}", "--json")
    assert estimate.exit_code == 0, estimate.output
    assert json.loads(estimate.output[estimate.output.index("{") :])["model"] == "tiny"  # general.name we wrote
    miss = run_cli("estimate", "--model", "lmstudio:tiny-q4")
    assert miss.exit_code == 1 and f"lmstudio:macft/{stem}/{stem}.gguf" in said(miss)

    bad = run_cli("export", "gguf", "--model", tiny_model_dir, "--lm-studio", "--out", tmp_path / "x.gguf")
    assert bad.exit_code == 1 and "drop --adapter-only and --out" in said(bad)
