"""scripts/bench.py's FLOP count, checked against the weights of the model it describes, and the
environment that gives another program macft's OpenBLAS."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model

from macft.backend import load_openblas, preload_environment
from macft.models.random_init import build_random_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_flops_per_token_counts_the_models_own_weights(bench, family, tmp_path):
    model_dir = build_random_model(family, tmp_path / family, layers=3)
    model, _ = load_model(model_dir, lazy=True)
    weights = dict(tree_flatten(model.parameters()))
    layer = [sum(v.size for k, v in weights.items() if k.startswith(f"model.layers.{i}.") and k.endswith("proj.weight")) for i in range(3)]
    head = weights["model.embed_tokens.weight"].size
    rank, adapted = 4, 2
    lora = sum(
        rank * sum(v.shape)
        for k, v in weights.items()
        if k.endswith("proj.weight") and int(k.split(".")[2]) >= 3 - adapted
    )
    counted = bench.flops_per_token(bench.counted_products(model_dir, adapted, rank))
    assert counted["forward_layers"] == 2 * sum(layer)
    assert counted["backward_layers"] == 2 * sum(layer[-adapted:])
    assert counted["forward_head"] == counted["backward_head"] == 2 * head
    assert counted["lora"] == 6 * lora
    assert counted["total"] == 4 * head + 2 * sum(layer) + 2 * sum(layer[-adapted:]) + 6 * lora


def test_shares_of_the_matmul_limit(bench):
    summary = {"a": {"tokens_per_second": {"median": 50.0}}, "b": {"runs": 0}}
    bench.add_flop_shares(summary, 1.2e9, 80.0, 200.0)
    assert summary["a"]["achieved_gflops"] == pytest.approx(60.0)
    assert summary["a"]["share_of_matmul_limit"] == pytest.approx(0.75)
    assert summary["a"]["share_of_step_matmul_limit"] == pytest.approx(0.25)
    assert "achieved_gflops" not in summary["b"]


def test_preload_environment_gives_a_child_process_the_openblas(tmp_path):
    library = load_openblas()
    if library is None:
        pytest.skip("no OpenBLAS on this machine")
    env = {**os.environ, **preload_environment(library), "MACFT_OPENBLAS": "0"}
    code = "import mlx.core as mx; print((mx.ones((64, 64)) @ mx.ones((64, 64)))[0, 0].item()); print(open('/proc/self/maps').read())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "64.0"
    assert "libopenblas" in done.stdout


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_rss_peak_is_the_childs_own_not_this_processs(bench, tmp_path):
    # On Linux a child's ru_maxrss starts at its parent's peak (exec carries it over): hold more than
    # the child ever touches here, and the child's reported peak must still be its own.
    held = bytearray(400 << 20)
    held[:: 1 << 12] = b"\1" * len(held[:: 1 << 12])
    child = (
        "touched = bytearray(100 << 20); touched[::4096] = b'\\1' * len(touched[::4096])\n"
        "for i in range(1, 4): print(f'step {i}/3  loss 1.0  lr 1e-4  5 tok/s', flush=True)\n"
    )
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(bench.PROBE)
    result = bench.run_command([sys.executable, "-c", child], {}, bench.MACFT_STEP, tmp_path / "run", probe, macft=False)
    assert result["exit_status"] == 0 and len(result["steps"]) == 3
    assert 100 << 20 < result["rss_peak_bytes"] < 300 << 20
    del held
