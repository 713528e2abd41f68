"""Exporting a run: importance-weighted, delta-aware types, and the fidelity report, whose numbers are
recomputed here by other means (macft.evaluate's loss on the fused model, llama.cpp's logits summed by numpy)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from test_fuse import make_run

from macft.cli import cli
from macft.config import Recipe, save_recipe
from macft.evaluate import example_loss
from macft.export.fidelity import Fidelity, fidelity_warning, measure_fidelity, validation_sample
from macft.export.fuse import load_fused
from macft.export.imatrix import IMATRIX_FILE, run_imatrix
from macft.models.random_init import build_random_model

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A LoRA run of a llama with 256-wide rows (so K-quants apply), with its data and recipe."""
    root = tmp_path_factory.mktemp("quant-run")
    model_dir = build_random_model("llama", root / "model", hidden=256, layers=2)
    rng = np.random.default_rng(0)
    (root / "data").mkdir()
    for split, count in (("train", 24), ("valid", 6)):
        lines = [
            json.dumps({"prompt": " ".join(rng.choice(WORDS, 5)) + " ->", "completion": " " + " ".join(rng.choice(WORDS, 3))})
            for _ in range(count)
        ]
        (root / "data" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    make_run(model_dir, root / "run")
    recipe = Recipe().replace(model={"path": str(model_dir)}, data={"train": str(root / "data")})
    save_recipe(recipe, root / "run" / "recipe.yaml")
    return root / "run"


@pytest.fixture(scope="module")
def exported(run):
    out = run / "tuned-q4_k_m.gguf"
    result = CliRunner().invoke(cli, ["export", "gguf", "--adapter", str(run), "--quant", "q4_k_m", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def llama_cpp_reference(path: Path, examples: list) -> tuple[float, list[np.ndarray]]:
    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    total, count, top1 = 0.0, 0, []
    for example in examples:
        model.reset()
        model.eval(example.tokens[:-1])
        logits = np.array(model.scores[: len(example.tokens) - 1], dtype=np.float64)
        at = np.flatnonzero(example.mask[1:])
        targets = np.array(example.tokens[1:])[at]
        total += float((np.logaddexp.reduce(logits[at], axis=1) - logits[at, targets]).sum())
        count += len(at)
        top1.append(logits[at].argmax(axis=1))
    model.close()
    return total / count, top1


def test_guided_export_and_its_fidelity_numbers(run, exported):
    out, payload = exported
    guided = payload["gguf"]["guided"]
    assert guided["importance_weighted"] == 15  # every quantized tensor of the 2-layer model
    assert guided["upgraded"] and guided["plain_tensor_bytes"] < guided["guided_tensor_bytes"] <= 1.15 * guided["plain_tensor_bytes"]
    assert (run / IMATRIX_FILE).is_file() and any("importance matrix computed" in n for n in payload["notes"])

    report = payload["fidelity"]
    loaded, _, _ = load_fused(run, dequantize=True)
    examples, split = validation_sample(run, loaded.tokenizer)
    assert split == "valid" and len(examples) == report["examples"] == 6
    assert all("valid.jsonl" in e.source for e in examples)
    # The float model's loss by macft.evaluate's own code; the file's by llama.cpp logits and numpy.
    sums = [example_loss(loaded.model, e.tokens, e.mask) for e in examples]
    assert report["tokens"] == sum(n for _, n in sums)
    assert report["float_loss"] == pytest.approx(sum(s for s, _ in sums) / report["tokens"], rel=1e-4)
    export_loss, export_top1 = llama_cpp_reference(out, examples)
    assert report["export_loss"] == pytest.approx(export_loss, rel=1e-4)
    float_top1 = [np.array(loaded.model(mx.array(e.tokens[:-1])[None])[0]).argmax(axis=1)[np.flatnonzero(e.mask[1:])] for e in examples]
    agreement = np.concatenate([a == b for a, b in zip(float_top1, export_top1)]).mean()
    assert report["agreement"] == pytest.approx(agreement)
    targets = [np.array(e.tokens[1:])[np.flatnonzero(e.mask[1:])] for e in examples]
    assert report["float_exact"] == sum(bool((t == y).all()) for t, y in zip(float_top1, targets))
    assert report["export_exact"] == sum(bool((t == y).all()) for t, y in zip(export_top1, targets))
    assert report["scorer"] == "llama.cpp"

    # Without llama.cpp macft reads the file back itself: the same model, so nearly the same numbers.
    own = measure_fidelity(out, loaded.model, examples, quant="q4_k_m", scorer="macft")
    assert own.float_loss == pytest.approx(report["float_loss"], rel=1e-5)
    assert own.export_loss == pytest.approx(report["export_loss"], rel=0.02)
    assert own.agreement >= report["agreement"] - 0.1


def test_the_run_keeps_its_imatrix_until_the_adapter_changes(run, exported):
    loaded, _, _ = load_fused(run, dequantize=True)
    kept, computed = run_imatrix(run, loaded)
    assert not computed and kept.tokens > 0  # the export stored it
    make_run(Path(json.loads((run / "adapter_config.json").read_text())["base_model"]["source"]), run, seed=7)
    loaded, _, _ = load_fused(run, dequantize=True)
    fresh, computed = run_imatrix(run, loaded)
    assert computed and fresh.adapter_sha256 != kept.adapter_sha256  # a retrained adapter makes it stale


def test_fidelity_warning_names_the_better_option():
    good = Fidelity("llama.cpp", 16, 400, 0.010, 0.018, 0.995, 16, 16)
    assert fidelity_warning(good, "q4_k_m") is None
    low = Fidelity("llama.cpp", 16, 400, 0.010, 0.015, 0.97, 16, 12)
    assert "--quant q6_k" in fidelity_warning(low, "q4_k_m") and "--adapter-only" in fidelity_warning(low, "q4_k_m")
    lossy = Fidelity("llama.cpp", 16, 400, 0.010, 0.040, 0.995, 16, 15)
    text = fidelity_warning(lossy, "q8_0")
    assert "--quant" not in text and "--adapter-only" in text


def test_guidance_is_a_default_only_where_it_pays(run, exported, tmp_path):
    """Measured: Q6_K and Q8_0 gain nothing visible from the guided plan, so they export plain unless
    --guided asks; Q4_K_M (the ``exported`` fixture, no flag) is guided by default."""
    assert exported[1]["gguf"]["guided"] is not None
    payloads = {}
    for flags in ((), ("--guided",), ("--plain",)):
        out = tmp_path / (flags[0].strip("-") if flags else "default") / "q8.gguf"  # one name: general.name is the stem
        out.parent.mkdir()
        args = ["export", "gguf", "--adapter", str(run), "--quant", "q8_0", "--out", str(out), "--fidelity", "0", "--json", *flags]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        payloads[flags] = (json.loads(result.stdout)["gguf"], out.read_bytes())
    assert payloads[()][0]["guided"] is None and payloads[()][1] == payloads[("--plain",)][1]
    assert payloads[("--guided",)][0]["guided"]["importance_weighted"] == 15
    assert payloads[("--guided",)][1] != payloads[()][1]  # importance-weighted rounding changed some blocks
