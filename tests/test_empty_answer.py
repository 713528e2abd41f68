"""An answer with no text is reported as such by `generate`, `chat` and `/compare`, never printed as nothing."""

from __future__ import annotations

import shutil

import mlx.core as mx
import pytest
from click.testing import CliRunner

from macft.chat import EMPTY_ANSWER, prompt_tokens
from macft.cli import cli
from macft.models.load import load_model

PROMPT = "Say something."


@pytest.fixture(scope="module")
def silent_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny llama with its head changed so that, after PROMPT, end-of-sequence wins at once: the
    final norm keeps only the hidden dimension that is largest there, and the EOS row of the head
    reads that dimension with a weight far above every other row's."""
    folder = tmp_path_factory.mktemp("silent") / "model"
    shutil.copytree(tiny_model_dir, folder)
    loaded = load_model(str(folder))
    tokens = prompt_tokens(loaded.tokenizer, [{"role": "user", "content": PROMPT}])
    hidden = loaded.model.model(mx.array([tokens]))[0, -1]
    dim = int(mx.argmax(hidden).item())
    assert hidden[dim].item() > 0
    weights = mx.load(str(folder / "model.safetensors"))
    norm = weights["model.norm.weight"]
    weights["model.norm.weight"] = mx.where(mx.arange(norm.shape[0]) == dim, norm, 0)
    head = weights["lm_head.weight"]
    eos = loaded.tokenizer.eos_token_id
    boost = 100 * mx.abs(head[:, dim]).max()
    weights["lm_head.weight"] = mx.where((mx.arange(head.shape[0]) == eos)[:, None] & (mx.arange(head.shape[1]) == dim), boost, head)
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder


def test_generate_says_the_answer_is_empty(silent_model_dir):
    result = CliRunner().invoke(cli, ["generate", "-m", str(silent_model_dir), "-p", PROMPT, "-n", "8"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == EMPTY_ANSWER


def test_chat_says_the_answer_is_empty(silent_model_dir):
    result = CliRunner().invoke(cli, ["chat", "-m", str(silent_model_dir), "-n", "8"], input=f"{PROMPT}\n/quit\n")
    assert result.exit_code == 0, result.output
    assert f">>> {EMPTY_ANSWER}" in result.output


def test_a_model_that_answers_prints_its_text(tiny_model_dir):
    result = CliRunner().invoke(cli, ["generate", "-m", str(tiny_model_dir), "-p", PROMPT, "-n", "8"])
    assert result.exit_code == 0 and EMPTY_ANSWER not in result.output and result.output.splitlines()[0].strip()
