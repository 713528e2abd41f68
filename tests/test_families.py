"""The family records: each one complete and self-consistent, and the families added through them
(Qwen3-MoE with LoRA on its experts) trained, fused and exported against llama.cpp.

Import, export, recompute and memory tests elsewhere run over every record in ``macft.families``;
these check what only the record itself or a new family's own features can show.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.utils import _get_classes
from gguf import quants as gguf_quants
from test_export_gguf import bf16_and_mlx_logits, export, gguf_logits, llama_cpp, wide_model
from test_fuse import make_run, mlx_logits

from macft.cli import cli
from macft.export.fuse import fuse_adapter
from macft.export.pipeline import export_gguf
from macft.export.quant_plan import SCHEMES
from macft.families import FAMILIES, family_named, for_gguf_arch, for_model_type
from macft.models.load import load_model
from macft.models.random_init import family_config

EXPERTS = ("gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("name", FAMILIES)
def test_record_names_what_mlx_lm_and_llama_cpp_know(name):
    family = family_named(name)
    config = family_config(name, 128)
    model_class, args_class = _get_classes(config)  # mlx-lm builds the tiny configuration
    assert config["model_type"] in family.model_types and for_model_type(config["model_type"]) is family
    assert family.gguf_arch in gguf.MODEL_ARCH_NAMES.values() and for_gguf_arch(family.gguf_arch) is family
    classes = {f"{type(m).__module__.rsplit('.', 1)[-1]}.{type(m).__name__}" for _, m in model_class(args_class.from_dict(config)).named_modules()}
    assert set(family.gated_mlps) <= classes | {f"{config['model_type']}.MLP"}
    assert family.chat_format is None or family.chat_format.stops


@pytest.mark.parametrize("name", FAMILIES)
def test_import_transforms_invert_export_transforms(name):
    family = family_named(name)
    config = family_config(name, 128)
    rng = np.random.default_rng(0)
    for hf in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.bias", "model.norm.weight"):
        rows = rng.standard_normal((64 if "q_proj" in hf else 32, 8)).astype(np.float32)
        exported = family.export_float(hf, family.export_rows(hf, rows, config))
        assert (exported != rows).any() == (family.permute_qk and "_proj" in hf or bool(family.norm_offset) and "norm" in hf)
        np.testing.assert_allclose(family.import_float(hf, family.import_rows(hf, exported, config)), rows, atol=1e-6)


def test_qwen3_moe_lora_on_experts_fuses_and_runs_as_a_llama_cpp_adapter(tiny_models, tmp_path):
    import mlx_lm

    model_dir = tiny_models["qwen3_moe"]
    reference, _ = make_run(model_dir, tmp_path / "run")
    saved = mx.load(str(tmp_path / "run" / "adapters.safetensors"))
    assert saved["model.layers.0.mlp.switch_mlp.up_proj.lora_a"].shape == (4, 64, 4)  # one pair per expert
    result = fuse_adapter(tmp_path / "run", tmp_path / "fused")
    assert result.fused_layers == 14
    model, tokenizer = mlx_lm.load(str(tmp_path / "fused"))
    np.testing.assert_allclose(mlx_logits(model, tokenizer), reference, atol=5e-5, rtol=0)

    base = export_gguf(model=str(model_dir), quant="f16", out=tmp_path / "base.gguf", name="tiny")
    fused = export_gguf(adapter=str(tmp_path / "run"), quant="f16", out=tmp_path / "fused.gguf", name="tiny")
    adapter = export_gguf(adapter=str(tmp_path / "run"), adapter_only=True, out=tmp_path / "lora.gguf")
    assert adapter.gguf["pairs"] == 14
    names = {t.name: t.shape.tolist() for t in gguf.GGUFReader(str(tmp_path / "lora.gguf")).tensors}
    assert names["blk.0.ffn_up_exps.weight.lora_a"] == [64, 4, 4]  # ggml order: in, rank, experts
    ids = tokenizer.encode("Q: What is the capital of France? A:")
    with_adapter = gguf_logits(Path(base.gguf["path"]), ids, lora_path=str(tmp_path / "lora.gguf"))
    merged = gguf_logits(Path(fused.gguf["path"]), ids)
    assert np.abs(with_adapter - merged).max() < 0.01 * np.abs(merged).max() + 0.01
    assert np.abs(gguf_logits(Path(base.gguf["path"]), ids) - merged).max() > 0.3


def test_qwen3_moe_qlora_fuses_over_quantized_experts(tiny_models, tmp_path):
    import mlx_lm

    reference, _ = make_run(tiny_models["qwen3_moe"], tmp_path / "run", quantize_bits=4)
    fuse_adapter(tmp_path / "run", tmp_path / "fused")
    model, tokenizer = mlx_lm.load(str(tmp_path / "fused"))
    np.testing.assert_allclose(mlx_logits(model, tokenizer), reference, atol=5e-5, rtol=0)
    assert type(model.layers[0].mlp.gate).__name__ == "QuantizedLinear"  # the router was not adapted: kept exactly


def cli_lora_run(model_dir: Path, tmp_path: Path, method: str, *options: str, iters: int = 3) -> Path:
    """An ``iters``-step `macft lora` run on a small counting task; returns its run directory."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": f"Q: {i} plus one?", "completion": f" {i + 1}"} for i in range(12)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(
        cli,
        ["lora", "--model", str(model_dir), "--data", str(data), "--method", method, "--iters", str(iters), "--batch-size", "4",
         "--rank", "4", "--out-dir", str(tmp_path / "runs"), "--name", "run", "--json", "--set", "demo.count=0", *options],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())["steps"] == iters
    return tmp_path / "runs" / "run"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_qwen3_moe_trains_its_experts(tiny_models, tmp_path, method):
    targets = "method.target_modules=[q_proj,v_proj,gate_proj,up_proj,down_proj]"
    run = cli_lora_run(tiny_models["qwen3_moe"], tmp_path, method, "--set", targets)
    saved = mx.load(str(run / "adapters.safetensors"))
    # B starts at zero: a non-zero B on every expert stack means the experts received gradients
    for part in EXPERTS:
        assert mx.abs(saved[f"model.layers.1.mlp.switch_mlp.{part}.lora_b"]).max().item() > 0, part


@pytest.fixture(scope="module")
def wide_moe(tmp_path_factory) -> tuple[Path, Path]:
    """A Qwen3-MoE with 256-wide rows (real K-quant blocks for attention and experts) and its F16 GGUF."""
    return wide_model("qwen3_moe", tmp_path_factory.mktemp("wide-moe"))


QUANTIZED = [q for q in SCHEMES if q not in ("f16", "bf16")]


@pytest.mark.parametrize("quant", QUANTIZED)
def test_qwen3_moe_quantized_export_matches_llama_quantize(wide_moe, tmp_path, quant):
    """Every quantized export (3-D expert stacks and the router included) against llama-quantize."""
    model_dir, f16 = wide_moe
    mine = check_quantized_export(model_dir, f16, tmp_path, quant)
    assert mine["blk.0.ffn_up_exps.weight"].tensor_type == SCHEMES[quant].base


def check_quantized_export(model_dir: Path, f16: Path, tmp_path: Path, quant: str) -> dict:
    """A quantized export gives each tensor the type llama-quantize gives it from the F16 export,
    with no more error per tensor than llama-quantize's own, and llama.cpp runs it; returns its tensors."""
    import ctypes

    ours = export(model_dir, tmp_path / "ours.gguf", quant)
    theirs = tmp_path / "theirs.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(SCHEMES[quant].file_type), 1
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    original, mine, reference = ({t.name: t for t in gguf.GGUFReader(str(p)).tensors} for p in (f16, ours, theirs))
    assert set(mine) == set(reference)
    for name, ref in reference.items():
        assert mine[name].tensor_type == ref.tensor_type, name
        if ref.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            continue
        target = np.asarray(original[name].data, dtype=np.float32)
        err_mine = np.sqrt(np.mean((gguf_quants.dequantize(mine[name].data, ref.tensor_type).reshape(target.shape) - target) ** 2))
        err_ref = np.sqrt(np.mean((gguf_quants.dequantize(ref.data, ref.tensor_type).reshape(target.shape) - target) ** 2))
        assert err_mine <= 1.02 * err_ref + 1e-7, (name, err_mine, err_ref)
    ids = load_model(str(model_dir)).tokenizer.encode("Q: What is the capital of France? A:")
    assert np.isfinite(gguf_logits(ours, ids)).all()  # llama.cpp loads and runs it
    return mine


def test_qwen3_moe_bf16_export_matches_mlx(wide_moe, tmp_path):
    ours, reference = bf16_and_mlx_logits(wide_moe[0], tmp_path / "bf16.gguf")
    assert np.abs(ours - reference).max() < 0.02 * np.abs(reference).max()
    assert (ours.argmax(-1) == reference.argmax(-1)).all()


def test_memory_planner_counts_qwen3_moe_experts(tiny_models, tmp_path):
    """The planner's parameter counts for a mixture-of-experts model, from config.json and from GGUF
    metadata, against the real model (and LoRA on every expert against apply_method's)."""
    from mlx.utils import tree_flatten

    from macft.config import MethodConfig
    from macft.memory import Plan, trainable_params
    from macft.models.shape import read_model_shape
    from macft.methods import apply_method

    model_dir = tiny_models["qwen3_moe"]
    loaded = load_model(str(model_dir))
    actual = sum(v.size for _, v in tree_flatten(loaded.model.parameters()))
    gguf_file = export_gguf(model=str(model_dir), quant="f16", out=tmp_path / "moe.gguf", name="tiny").gguf["path"]
    for shape in (read_model_shape(str(model_dir)), read_model_shape(gguf_file)):
        assert (shape.experts, shape.experts_per_token, shape.intermediate) == (4, 2, 64)
        assert shape.params == actual
    targets = ("q_proj", "v_proj", *EXPERTS)
    model = apply_method(loaded.model, MethodConfig(name="lora", rank=4, target_modules=targets))
    adapted = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    assert trainable_params(read_model_shape(str(model_dir)), Plan(method="lora", settings=MethodConfig(rank=4, target_modules=targets))) == adapted
