"""Qwen3.5 (Gated DeltaNet + gated full attention) through its family record, against llama.cpp.

The shared import, export, recompute and record tests run over this family as over every other;
these check what only Qwen3.5 brings: LoRA on the linear-attention blocks (training, QLoRA, the
adapter GGUF whose out_proj columns move), every quantized export against llama-quantize, and its
pre-tokenizer.
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlx.utils import tree_flatten
from test_export_gguf import assert_adapter_equals_fused, bf16_and_mlx_logits, export, gguf_logits, llama_cpp, wide_model
from test_families import QUANTIZED, check_quantized_export, cli_lora_run
from test_fuse import ALL_LINEAR, make_run

from macft.config import MethodConfig
from macft.data import packing_cache
from macft.errors import MacftError
from macft.export.fidelity import gguf_weights
from macft.export.pipeline import export_gguf
from macft.export.quant_plan import SCHEMES
from macft.methods import apply_method
from macft.models.load import load_model
from macft.models.head import describe_loss

PROMPT = "Q: What is the capital of France? A:"
F32_TENSORS = (".ssm_conv1d.weight", ".ssm_a", ".ssm_dt.bias", ".ssm_norm.weight")  # kept F32 by convert_hf_to_gguf and llama-quantize


def test_lora_targets_reach_the_linear_attention_blocks(tiny_models):
    loaded = load_model(str(tiny_models["qwen3_5"]))
    model = apply_method(loaded.model, MethodConfig(name="lora", rank=4))  # the default q/k/v/o targets
    adapted = {name.rsplit(".", 1)[0] for name, _ in tree_flatten(model.trainable_parameters())}
    prefix = "language_model.model.layers"
    assert adapted == {
        *(f"{prefix}.0.linear_attn.{leaf}" for leaf in ("in_proj_qkv", "in_proj_z", "out_proj")),
        *(f"{prefix}.1.self_attn.{leaf}" for leaf in ("q_proj", "k_proj", "v_proj", "o_proj")),
    }


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_training_lowers_the_loss(tiny_models, tmp_path, method):
    options = ("--set", "train.learning_rate=0.01", "--set", "train.report_every=1")
    run = cli_lora_run(tiny_models["qwen3_5"], tmp_path, method, *options, iters=8)
    losses = [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train_loss" in r]
    assert len(losses) == 8 and np.mean(losses[-3:]) < 0.8 * losses[0], losses
    saved = mx.load(str(run / "adapters.safetensors"))
    for leaf in ("in_proj_qkv", "in_proj_z", "out_proj"):  # B starts at zero: these received gradients
        assert mx.abs(saved[f"language_model.model.layers.0.linear_attn.{leaf}.lora_b"]).max().item() > 0, leaf


def test_adapter_gguf_on_base_equals_fused_gguf(tiny_models, tmp_path):
    """llama.cpp applies LoRA to every qwen35 projection (build_lora_mm): the adapter file on the base
    GGUF must give the fused model's logits, value heads reordered in in_proj rows and out_proj columns."""
    model_dir = tiny_models["qwen3_5"]
    make_run(model_dir, tmp_path / "run", targets=(*ALL_LINEAR, "in_proj_a", "in_proj_b"))
    base = export_gguf(model=str(model_dir), quant="f16", out=tmp_path / "base.gguf", name="tiny")
    fused = export_gguf(adapter=str(tmp_path / "run"), quant="f16", out=tmp_path / "fused.gguf", name="tiny")
    adapter = export_gguf(adapter=str(tmp_path / "run"), adapter_only=True, out=tmp_path / "lora.gguf")
    assert adapter.gguf["pairs"] == 8 + 7  # linear block: qkv, z, a, b, out + MLP; full block: q, k, v, o + MLP
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "lora.gguf")).tensors}
    assert {"blk.0.attn_qkv.weight.lora_a", "blk.0.ssm_out.weight.lora_b", "blk.0.ssm_alpha.weight.lora_b"} <= names
    ids = load_model(str(model_dir)).tokenizer.encode(PROMPT)
    assert_adapter_equals_fused(Path(base.gguf["path"]), Path(fused.gguf["path"]), tmp_path / "lora.gguf", ids)


@pytest.fixture(scope="module")
def wide_qwen35(tmp_path_factory) -> tuple[Path, Path]:
    """A Qwen3.5 with 256-wide rows (real K-quant blocks) and its F16 GGUF."""
    return wide_model("qwen3_5", tmp_path_factory.mktemp("wide-qwen35"))


@pytest.mark.parametrize("quant", QUANTIZED)
def test_quantized_export_matches_llama_quantize(wide_qwen35, tmp_path, quant):
    """Every quantized export: the type llama-quantize gives each tensor (the recurrent block's conv
    kernel, A, dt bias and gated norm stay F32), no more error per tensor, and llama.cpp runs it."""
    model_dir, f16 = wide_qwen35
    mine = check_quantized_export(model_dir, f16, tmp_path, quant)
    ours = tmp_path / "ours.gguf"
    assert all(mine[n].tensor_type == Q.F32 for n in mine if n.endswith(F32_TENSORS))
    assert mine["blk.0.attn_gate.weight"].tensor_type == SCHEMES[quant].base
    # llama.cpp runs the function the file holds: mlx-lm with the file's dequantized weights (llama.cpp
    # also rounds activations to 8 bits for quantized matmuls; a misplaced head would be off by ~3)
    loaded = load_model(str(model_dir))
    ids = loaded.tokenizer.encode(PROMPT)
    loaded.model.load_weights(list(gguf_weights(ours).items()), strict=False)
    reference_logits = np.array(loaded.model(mx.array(ids)[None])[0])
    assert np.abs(gguf_logits(ours, ids) - reference_logits).max() < 0.1 * np.abs(reference_logits).max()


def test_bf16_export_matches_mlx(wide_qwen35, tmp_path):
    ours, reference = bf16_and_mlx_logits(wide_qwen35[0], tmp_path / "bf16.gguf")
    assert np.abs(ours - reference).max() < 0.03 * np.abs(reference).max()  # llama.cpp rounds activations to bf16 too
    assert (ours.argmax(-1) == reference.argmax(-1)).all()


QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
VARIED = [
    "The quick brown fox, naïve café 東京 😀!\n\tSELECT name FROM users WHERE age > 30;  double  spaces",
    "Tiếng Việt có dấu: Nguyễn Trãi, người Việt",
    "Numbers 0 12 345 6789 3.14159 2025-11-23 and 1234567",
    "combining marks: q\u0301 x\u0303 z\u0308\u0301 क्षि  ﷺ  👩‍👩‍👧 🇫🇷",  # no precomposed forms: NFC keeps them
    "   leading spaces,\ttabs\tand\n\nnewlines   then trailing  I'LL see, we'Ve",
]


def test_qwen35_tokenizer_exports_with_its_pre_tokenizer(tiny_models, tmp_path):
    """A vocabulary with Qwen3.5's split (letters keep their combining marks, one digit per token) is
    exported as llama.cpp's ``qwen35``; llama.cpp then gives the ids macft trains with."""
    model_dir = Path(shutil.copytree(tiny_models["qwen3_5"], tmp_path / "model"))
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN35_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ],
    }
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    out = export(model_dir, tmp_path / "vocab.gguf", "f16")
    assert gguf.GGUFReader(str(out)).fields["tokenizer.ggml.pre"].contents() == "qwen35"
    tokenizer = load_model(str(model_dir)).tokenizer
    vocab = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in VARIED:
        # Qwen's tokenizer NFC-normalizes and llama.cpp does not, so the texts are already NFC
        assert unicodedata.normalize("NFC", text) == text
        assert vocab.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text


@pytest.mark.parametrize("method", ["prompt", "prefix", "adapter"])
def test_methods_needing_attention_in_every_block_are_refused(tiny_models, method):
    loaded = load_model(str(tiny_models["qwen3_5"]))
    with pytest.raises(MacftError, match="cannot train a qwen3_5 model: it hooks into every block's attention"):
        apply_method(loaded.model, MethodConfig(name=method))


def test_packing_is_refused(tiny_models):
    """The recurrent state would carry one packed example into the next."""
    loaded = load_model(str(tiny_models["qwen3_5"]))
    with pytest.raises(MacftError, match="data.packing: false"):
        packing_cache(loaded.model, mx.array([[1, 1, 2, 2]]))


def test_hf_layout_with_nested_text_config_exports_the_same(tiny_models, tmp_path):
    """Qwen3.5 checkpoints nest the decoder's keys under text_config (Qwen3_5ForConditionalGeneration)."""
    model_dir = Path(shutil.copytree(tiny_models["qwen3_5"], tmp_path / "model"))
    flat = json.loads((model_dir / "config.json").read_text())
    nested = {"model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"], "text_config": flat}
    (model_dir / "config.json").write_text(json.dumps(nested))
    files = [export(d, tmp_path / f"{i}.gguf", "f16") for i, d in enumerate((tiny_models["qwen3_5"], model_dir))]
    readers = [gguf.GGUFReader(str(f)) for f in files]
    assert [(t.name, t.data.tobytes()) for t in readers[0].tensors] == [(t.name, t.data.tobytes()) for t in readers[1].tensors]
    keys = [{k: f.contents() for k, f in r.fields.items() if k.startswith("qwen35.")} for r in readers]
    assert keys[0] == keys[1] and keys[0]["qwen35.ssm.time_step_rank"] == 4


def test_a_log_stays_float32_under_a_half_compute_dtype(tiny_models):
    """mlx-lm's cast_predicate keeps A_log in float32 (exp of a bf16 log would move every decay rate)."""
    from macft.models.load import cast_floats

    model = load_model(str(tiny_models["qwen3_5"])).model
    cast_floats(model, mx.bfloat16)
    dtypes = {name: value.dtype for name, value in tree_flatten(model.parameters())}
    assert dtypes["language_model.model.layers.0.linear_attn.A_log"] == mx.float32
    assert dtypes["language_model.model.layers.0.linear_attn.in_proj_qkv.weight"] == mx.bfloat16


def test_loss_is_chunked_through_the_wrapped_text_model(tiny_models):
    """mlx-lm nests the decoder under language_model; the loss still finds its body and tied head."""
    model = load_model(str(tiny_models["qwen3_5"])).model
    assert describe_loss(model, 64).startswith("chunked loss")  # not "loss over the full logits"
