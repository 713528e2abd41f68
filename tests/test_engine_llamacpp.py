"""`--engine llama.cpp`: the cached Q8_0 GGUF export generates what MLX generates (greedy), is exported
once per base + adapter, and a missing llama-cpp-python is one line naming the pip command."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_chat import PROMPT, make_run

from macft.chat import ChatSession, Sampling, open_model, prompt_tokens
from macft.cli import cli
from macft.config import MethodConfig
from macft.engines.llamacpp import EXPORT_CODE, cached_gguf, exporter_fingerprint

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    return make_run(tmp_path_factory.mktemp("runs") / "tuned", tiny_model_dir, 1, MethodConfig(name="lora", rank=4))


def generated(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["generate", "-p", PROMPT, "-n", "10", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


EXACT = 3  # tokens that must equal MLX's greedy choice outright; later ones may follow a near-tie differently


def greedy_tokens(opened, ids: list[int], max_tokens: int) -> list[int]:
    pieces = list(opened.model.stream_tokens(opened.tokenizer, ids, Sampling(max_tokens=max_tokens, temperature=0.0)))
    return [p.token for p in pieces][: pieces[-1].generation_tokens]


@pytest.mark.parametrize("source", ["base", "tuned"])
def test_greedy_tokens_follow_the_mlx_logits(tiny_model_dir, run, source):
    """The first tokens equal MLX's greedy tokens; every later one is MLX's argmax within Q8_0 rounding."""
    import mlx.core as mx
    import numpy as np

    spec, adapter = (str(tiny_model_dir), None) if source == "base" else (None, run)
    reference, llama = open_model(spec, adapter), open_model(spec, adapter, "llama.cpp")
    ids = prompt_tokens(reference.tokenizer, [{"role": "user", "content": PROMPT}], source == "tuned")
    assert ids == prompt_tokens(llama.tokenizer, [{"role": "user", "content": PROMPT}], source == "tuned")
    ours = greedy_tokens(llama, ids, 12)
    logits = np.array(reference.model(mx.array(ids + ours)[None])[0, len(ids) - 1 : -1].astype(mx.float32))
    assert ours[:EXACT] == logits[:EXACT].argmax(axis=-1).tolist()
    chosen = logits[np.arange(len(ours)), ours]
    spread = logits.max(axis=-1) - logits.min(axis=-1)
    assert np.all(logits.max(axis=-1) - chosen <= 0.02 * spread), (logits.max(axis=-1) - chosen) / spread


def generated(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["generate", "-p", PROMPT, "-n", "10", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_generate_cli_runs_the_tuned_export(tiny_model_dir, run):
    tuned = generated("--adapter", str(run), "--engine", "llama.cpp", "--no-chat")
    base = generated("-m", str(tiny_model_dir), "--engine", "llama.cpp", "--no-chat")
    assert tuned["completion"] != base["completion"]  # the adapter is fused into the export
    assert 0 < tuned["tokens"] <= 10 and tuned["tokens_per_second"] > 0


def test_chat_history_matches_the_mlx_engine(run):
    answers = {}
    for engine in ("mlx", "llama.cpp"):
        session = ChatSession(open_model(None, run, engine), system="Be brief.", sampling=Sampling(max_tokens=EXACT, temperature=0.0))
        answers[engine] = ["".join(session.reply(text)) for text in ("Hello", "Thank you")]
    assert answers["llama.cpp"] == answers["mlx"]


def test_export_is_cached_per_base_and_adapter(tiny_model_dir, run, tmp_path):
    from macft.models.load import resolve_model_dir

    _, sha = resolve_model_dir(str(tiny_model_dir))
    first, _ = cached_gguf(str(tiny_model_dir), run, sha)  # exported by an earlier test or now
    stamp = first.stat().st_mtime_ns
    again, cached = cached_gguf(str(tiny_model_dir), run, sha)
    assert cached and again == first and first.stat().st_mtime_ns == stamp
    other = make_run(tmp_path / "other", tiny_model_dir, 2, MethodConfig(name="lora", rank=4))
    fresh, cached = cached_gguf(str(tiny_model_dir), other, sha)
    assert not cached and fresh.parent != first.parent
    assert not [p for p in first.parent.parent.iterdir() if p.name.startswith(".")]  # no half-written entries


def test_cache_key_follows_the_exporting_code(tmp_path):
    import shutil

    import macft

    for package in EXPORT_CODE:
        shutil.copytree(Path(macft.__file__).parent / package, tmp_path / package)
    assert exporter_fingerprint(tmp_path) == exporter_fingerprint()
    kquants = tmp_path / "quants" / "kquants.py"
    kquants.write_text(kquants.read_text() + "\n# a changed rounding\n")
    assert exporter_fingerprint(tmp_path) != exporter_fingerprint()


def test_chat_refuses_adapter_commands(run):
    result = CliRunner().invoke(cli, ["chat", "--adapter", str(run), "--engine", "llama.cpp", "-t", "0", "-n", "4"], input="/compare\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "/compare needs the MLX engine" in result.output


def test_missing_llama_cpp_is_one_line(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` sees when it is not installed
    result = CliRunner().invoke(cli, ["generate", "-m", str(tiny_model_dir), "-p", PROMPT, "--engine", "llama.cpp"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "pip install llama-cpp-python" in errors[0], result.output
    assert "Traceback" not in result.output
