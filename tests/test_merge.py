"""`macft merge`: every method against an independent numpy reference of PEFT's add_weighted_adapter
semantics, the merged run used as --adapter by the other commands, and the one-line refusals."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_unflatten
from test_chat import PROMPT, make_run

from macft.adapters.files import load_adapter
from macft.adapters.merge import merge_adapters
from macft.cli import cli
from macft.config import MethodConfig
from macft.errors import MacftError
from macft.models.load import load_model
from macft.models.random_init import build_random_model

WEIGHTS = [0.7, 0.4]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Two LoRA runs on the tiny llama with different scales (alpha/rank), a third of another rank and
    targets, a DoRA run and a prompt-tuning run."""
    root = tmp_path_factory.mktemp("merge-runs")
    return {
        "a": make_run(root / "a", tiny_model_dir, 1, MethodConfig(name="lora", rank=4, alpha=8.0)),
        "b": make_run(root / "b", tiny_model_dir, 2, MethodConfig(name="lora", rank=4, alpha=32.0)),
        "c": make_run(root / "c", tiny_model_dir, 3, MethodConfig(name="lora", rank=2, alpha=4.0, target_modules=("v_proj", "down_proj"))),
        "dora": make_run(root / "dora", tiny_model_dir, 4, MethodConfig(name="dora", rank=4)),
        "prompt": make_run(root / "prompt", tiny_model_dir, 5, MethodConfig(name="prompt", num_virtual_tokens=4)),
    }


def pairs(run) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float, dict]:
    """(layer -> (A, B) in float32, scale, adapter config) read straight from a run's files."""
    config = json.loads((run / "adapter_config.json").read_text())
    arrays = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(run / "adapters.safetensors")).items()}
    layers = sorted({k.rsplit(".", 1)[0] for k in arrays})
    return {layer: (arrays[f"{layer}.lora_a"], arrays[f"{layer}.lora_b"]) for layer in layers}, config["alpha"] / config["rank"], config


# ---------------------------------------------------------------------------- the reference


def reference_ties(tensors: list[np.ndarray], coefficients: list[float], density: float, sign: str, random_masks=None) -> np.ndarray:
    """TIES written entry by entry: prune (by magnitude, or by the given DARE masks with rescaling),
    elect a sign per entry, average the coefficient-weighted values that agree with it."""
    pruned = []
    for i, tensor in enumerate(tensors):
        if random_masks is not None:
            pruned.append(np.where(random_masks[i], tensor / density, 0.0))
            continue
        keep = int(density * tensor.size)
        threshold = np.sort(np.abs(tensor).ravel())[::-1][keep - 1] if keep else np.inf
        pruned.append(np.where(np.abs(tensor) >= threshold, tensor, 0.0))
    flat = [p.ravel() for p in pruned]
    out = np.zeros(tensors[0].size)
    for j in range(out.size):
        values = [f[j] for f in flat]
        vote = sum(values) if sign == "total" else sum(np.sign(v) for v in values)
        elected = 1.0 if vote >= 0 else -1.0
        agreeing = [coefficients[i] * v for i, v in enumerate(values) if np.sign(v) == elected]
        out[j] = sum(agreeing) / max(len(agreeing), 1)
    return out.reshape(tensors[0].shape)


def reference(method: str, runs_: list, weights: list[float], density: float = 1.0, sign: str = "total", seed: int = 0):
    """layer -> (A, B) of the merged adapter, from PEFT's definitions (see macft.adapters.merge)."""
    sources = [pairs(r) for r in runs_]
    rng = np.random.default_rng(seed)
    merged = {}
    for layer in sorted(set().union(*(s[0] for s in sources))):
        present = [(s[0][layer], s[1], w) for s, w in zip(sources, weights) if layer in s[0]]
        if method == "cat":
            merged[layer] = (np.hstack([w * s * a for (a, _), s, w in present]), np.vstack([b for (_, b), _, _ in present]))
            continue
        c = [np.sqrt(w * s) for _, s, w in present]
        result = []
        for side in (0, 1):
            tensors = [p[0][side] for p in present]
            masks = [rng.random(t.shape) < density for t in tensors] if method in ("dare", "dare_ties") else None
            if method == "linear":
                result.append(sum(ci * t for ci, t in zip(c, tensors)))
            elif method == "dare":
                result.append(sum(ci * np.where(m, t / density, 0.0) for ci, t, m in zip(c, tensors, masks)))
            else:
                result.append(reference_ties(tensors, c, density, sign, masks))
        merged[layer] = tuple(result)
    return merged


@pytest.mark.parametrize(
    "method, options",
    [("linear", {}), ("cat", {}), ("ties", {"density": 0.4}), ("ties", {"density": 0.6, "sign": "frequency"}), ("dare", {"density": 0.5, "seed": 3}), ("dare_ties", {"density": 0.7, "seed": 5})],
)
def test_each_method_matches_the_numpy_reference(runs, tmp_path, method, options):
    out = tmp_path / "merged"
    result = merge_adapters([runs["a"], runs["b"]], out, weights=WEIGHTS, method=method, **options)
    merged, scale, config = pairs(out)
    expected = reference(method, [runs["a"], runs["b"]], WEIGHTS, **options)
    assert set(merged) == set(expected) and len(merged) == result.layers == 8
    for layer, (a, b) in expected.items():
        np.testing.assert_allclose(merged[layer][0], a, rtol=1e-5, atol=1e-6, err_msg=layer)
        np.testing.assert_allclose(merged[layer][1], b, rtol=1e-5, atol=1e-6, err_msg=layer)
    assert scale == 1.0 and config["rank"] == (8 if method == "cat" else 4) and config["method"] == "lora"
    assert config["merged_from"]["method"] == method and config["merged_from"]["weights"] == WEIGHTS


def test_dare_keeps_about_density_and_rescales(runs, tmp_path):
    """The random drop keeps about `density` of each source's entries and divides them by it."""
    merge_adapters([runs["a"], runs["b"]], tmp_path / "dare", weights=[1.0, 0.0], method="dare", density=0.3, seed=1)
    merged, _, _ = pairs(tmp_path / "dare")
    source, scale, _ = pairs(runs["a"])
    kept = []
    for layer, (a, _) in merged.items():
        original = np.sqrt(scale) * source[layer][0]
        nonzero = a != 0
        kept.append(nonzero.mean())
        np.testing.assert_allclose(a[nonzero], original[nonzero] / 0.3, rtol=1e-5)
    assert abs(np.mean(kept) - 0.3) < 0.03


def test_cat_adds_the_weighted_deltas_exactly(runs, tiny_model_dir, tmp_path):
    """The merged model's logits are the base's with W0 + Σ w_i·ΔW_i, adapters of other ranks and targets included."""
    weights = [0.7, -0.5]
    merge_adapters([runs["a"], runs["c"]], tmp_path / "cat", weights=weights, method="cat")
    tokens = mx.array(load_model(str(tiny_model_dir)).tokenizer.encode(PROMPT))[None]
    merged = load_adapter(load_model(str(tiny_model_dir)).model, tmp_path / "cat")[0]
    base = load_model(str(tiny_model_dir)).model
    params = dict(tree_flatten(base.parameters()))
    for run, w in zip((runs["a"], runs["c"]), weights):
        layers, scale, _ = pairs(run)
        for layer, (a, b) in layers.items():
            params[f"{layer}.weight"] = params[f"{layer}.weight"] + mx.array(w * scale * (a @ b).T)
    base.update(tree_unflatten(list(params.items())))
    np.testing.assert_allclose(np.array(merged(tokens)), np.array(base(tokens)), atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert config["rank"] == 6 and config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def test_merged_run_works_with_generate_eval_fuse_and_export(runs, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    runner = CliRunner()
    merged = runner.invoke(cli, ["merge", str(runs["a"]), str(runs["b"]), "--method", "ties", "--density", "0.5", "-w", "1,0.5", "--out", str(out), "--json"])
    assert merged.exit_code == 0, merged.output
    assert json.loads(merged.output)["rank"] == 4
    generated = runner.invoke(cli, ["generate", "--adapter", str(out), "-p", PROMPT, "-n", "8", "--json"])
    assert generated.exit_code == 0, generated.output
    base = runner.invoke(cli, ["generate", "-m", str(tiny_model_dir), "-p", PROMPT, "-n", "8", "--json"])
    assert json.loads(generated.output.splitlines()[-1])["completion"] != json.loads(base.output.splitlines()[-1])["completion"]
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"prompt": PROMPT, "completion": " jumps"}) + "\n")
    scored = runner.invoke(cli, ["eval", "--adapter", str(out), "--data", str(data), "--max-tokens", "4", "--json"])
    assert scored.exit_code == 0, scored.output
    fused = runner.invoke(cli, ["fuse", "--adapter", str(out), "--out", str(tmp_path / "fused")])
    assert fused.exit_code == 0, fused.output
    exported = runner.invoke(cli, ["export", "gguf", "--adapter", str(out), "--adapter-only", "--out", str(tmp_path / "a.gguf")])
    assert exported.exit_code == 0, exported.output
    again = runner.invoke(cli, ["merge", str(runs["a"]), str(runs["b"]), "--method", "cat", "--out", str(out)])
    assert again.exit_code == 0, again.output  # its own earlier output is replaced without --force


def test_refusals_are_one_line(runs, tmp_path):
    other_base = build_random_model("llama", tmp_path / "other-base", seed=9)
    foreign = make_run(tmp_path / "foreign", other_base, 6, MethodConfig(name="lora", rank=4))
    cases = [
        ([runs["a"], foreign], {}, "different weights"),
        ([runs["a"], runs["dora"]], {}, "DoRA adapter"),
        ([runs["a"], runs["prompt"]], {}, "'prompt' adapter"),
        ([runs["a"], runs["c"]], {"method": "linear"}, "use --method cat (rank 6)"),
        ([runs["a"], runs["b"]], {"weights": [1.0, -1.0]}, "weights must be 0 or more"),
        ([runs["a"], runs["b"]], {"weights": [1.0]}, "--weights has 1 values for 2 adapters"),
        ([runs["a"], runs["b"]], {"method": "ties"}, "needs --density"),
        ([runs["a"], runs["b"]], {"method": "dare", "density": 1.5}, "--density must be above 0"),
        ([runs["a"], runs["b"]], {"density": 0.5}, "--method linear keeps every value"),
        ([runs["a"], runs["b"]], {"method": "cat", "sign": "total"}, "elects no signs"),
        ([runs["a"]], {}, "at least two adapters"),
    ]
    for adapters, options, message in cases:
        with pytest.raises(MacftError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
            merge_adapters(adapters, tmp_path / "out", **options)
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["merge", str(runs["a"]), str(runs["b"]), "--out", str(tmp_path / "mine")])
    assert result.exit_code == 1 and "--force" in result.output and "Traceback" not in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    into_input = CliRunner().invoke(cli, ["merge", str(runs["a"]), str(runs["b"]), "--out", str(runs["a"])])
    assert into_input.exit_code == 1 and "input" in into_input.output
