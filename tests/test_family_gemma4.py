"""Gemma 4 text through its family record, against llama.cpp and mlx-lm, on a four-layer model with
what the shared two-layer tiny model lacks: k/v-sharing layers with double-wide MLPs, next to
per-layer inputs, sliding and global layers of different head sizes and proportional RoPE.

The shared import, export, recompute and record tests run the two-layer ``gemma4`` tiny model too.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from test_export_gguf import PROMPT, SAMPLE, export, gguf_logits, llama, llama_cpp
from test_families import QUANTIZED, check_quantized_export, cli_lora_run
from test_fuse import ALL_LINEAR, make_run
from test_gguf_import import SAMPLE_TEXTS, VARIED_TEXTS, write_gguf
from test_peft_methods import corpus_examples

from macft.config import MethodConfig, TrainConfig
from macft.errors import MacftError
from macft.export.pipeline import export_gguf
from macft.models.shape import read_model_shape
from macft.methods import apply_method
from macft.models.gguf_import import import_gguf_report
from macft.models.load import load_model
from macft.models.random_init import build_random_model
from macft.train.loop import evaluate, train
from macft.objectives.sft import SupervisedLoss

SHAPE_KEYS = ("head_dim", "global_head_dim", "layer_types", "num_kv_shared_layers", "use_double_wide_mlp",
              "hidden_size_per_layer_input", "intermediate_size", "sliding_window", "final_logit_softcapping", "rope_parameters")  # fmt: skip


@pytest.fixture(scope="module")
def wide_gemma4(tmp_path_factory) -> tuple[Path, Path]:
    """Four layers (the last two share the first two's k/v), 256-wide rows for real K-quant blocks, and its F16 export."""
    root = tmp_path_factory.mktemp("gemma4")
    model_dir = build_random_model("gemma4", root / "model", hidden=256, layers=4)
    return model_dir, export(model_dir, root / "f16.gguf", "f16")


def mlx_logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array(ids)[None])[0].astype(mx.float32))


def greedy(model_path: Path, mlx_model, ids: list[int], steps: int = 4) -> tuple[list[int], list[int]]:
    reference, tokens_gguf, tokens_mlx = llama(model_path), list(ids), list(ids)
    for _ in range(steps):
        reference.reset()
        reference.eval(tokens_gguf)
        tokens_gguf.append(int(np.argmax(reference.scores[len(tokens_gguf) - 1])))
        tokens_mlx.append(int(np.argmax(mlx_logits(mlx_model, tokens_mlx)[-1])))
    return tokens_gguf, tokens_mlx


def test_f16_export_runs_in_llama_cpp_as_in_mlx(wide_gemma4):
    model_dir, f16 = wide_gemma4
    loaded = load_model(str(model_dir))
    assert loaded.config["num_kv_shared_layers"] == 2 and "k_proj" not in loaded.model.layers[3].self_attn
    fields = gguf.GGUFReader(str(f16)).fields
    assert list(fields["gemma4.feed_forward_length"].contents()) == [512, 512, 1024, 1024]  # double-wide shared layers
    assert list(fields["gemma4.attention.sliding_window_pattern"].contents()) == [True, False, True, False]
    ids = loaded.tokenizer.encode(PROMPT)
    reference = mlx_logits(loaded.model, ids)
    ours = gguf_logits(f16, ids)
    assert np.abs(ours - reference).max() < 0.01 * np.abs(reference).max() + 0.01  # fp16 weights
    tokens_gguf, tokens_mlx = greedy(f16, loaded.model, ids)
    assert tokens_gguf == tokens_mlx
    for shape in (read_model_shape(str(model_dir)), read_model_shape(str(f16))):  # the memory planner
        assert (shape.intermediate, shape.layers, shape.vocab) == (1024, 4, loaded.config["vocab_size"])


def test_import_agrees_with_llama_cpp_on_the_same_file(wide_gemma4, tmp_path):
    """An F32 GGUF from the tests' own gguf-py writer: macft's import gives the same token ids,
    logits and greedy tokens as llama.cpp reading that file."""
    model_dir, _ = wide_gemma4
    path = write_gguf(model_dir, tmp_path / "f32.gguf")
    loaded = load_model(str(path))
    reference = llama_cpp.Llama(str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False, type_k=0, type_v=0)
    for text in SAMPLE_TEXTS + VARIED_TEXTS + [SAMPLE]:
        assert loaded.tokenizer.encode(text) == reference.tokenize(text.encode(), add_bos=True, special=True), text
    ids = loaded.tokenizer.encode(SAMPLE)  # longer than the sliding window
    reference.eval(ids)
    expected = np.array(reference.scores[: len(ids)])
    # attention without query scaling sharpens float32 rounding differences: a tolerance per logit scale
    ours = mlx_logits(loaded.model, ids)
    assert np.abs(ours - expected).max() < 2e-3 * np.abs(expected).max()
    assert (ours.argmax(-1) == expected.argmax(-1)).all()  # the same greedy next token at every position


def test_export_then_import_keeps_config_and_quantized_weights(wide_gemma4, tmp_path):
    model_dir, _ = wide_gemma4
    q8 = export(model_dir, tmp_path / "q8.gguf", "q8_0")
    report = import_gguf_report(q8)
    assert report.summary["exact"]["Q8_0"] >= 20 and set(report.summary["float"]) == {"F32", "F16"}  # F16: per_layer_model_proj
    imported = json.loads((report.path / "config.json").read_text())
    source = json.loads((model_dir / "config.json").read_text())
    assert {k: imported[k] for k in SHAPE_KEYS} == {k: source[k] for k in SHAPE_KEYS}
    # the quantized layers compute what the file's dequantized weights compute
    quantized, dequantized = load_model(str(q8)), load_model(str(q8), dequantize=True)
    ids = quantized.tokenizer.encode(PROMPT)
    np.testing.assert_allclose(mlx_logits(quantized.model, ids), mlx_logits(dequantized.model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant", QUANTIZED)
def test_quantized_export_matches_llama_quantize(wide_gemma4, tmp_path, quant):
    model_dir, f16 = wide_gemma4
    mine = check_quantized_export(model_dir, f16, tmp_path, quant)
    assert "per_layer_token_embd.weight" in mine and "blk.3.attn_k.weight" not in mine


def test_bf16_export_matches_mlx(wide_gemma4, tmp_path):
    model_dir, _ = wide_gemma4
    loaded = load_model(str(model_dir))
    ids = loaded.tokenizer.encode(PROMPT)
    reference = mlx_logits(loaded.model, ids)
    ours = gguf_logits(export(model_dir, tmp_path / "bf16.gguf", "bf16"), ids)
    assert np.abs(ours - reference).max() < 0.02 * np.abs(reference).max()
    assert (ours.argmax(-1) == reference.argmax(-1)).all()


def test_lora_adapter_gguf_on_base_equals_fused_gguf(wide_gemma4, tmp_path):
    """llama.cpp applies LoRA to every projection Gemma 4 has, the k/v-sharing layers' q/o included."""
    model_dir, f16 = wide_gemma4
    make_run(model_dir, tmp_path / "run")
    fused = export_gguf(adapter=str(tmp_path / "run"), quant="f16", out=tmp_path / "fused.gguf", name="tiny")
    adapter = export_gguf(adapter=str(tmp_path / "run"), adapter_only=True, out=tmp_path / "lora.gguf")
    assert adapter.gguf["pairs"] == 2 * 7 + 2 * 5  # the sharing layers have no k_proj / v_proj
    ids = load_model(str(model_dir)).tokenizer.encode(PROMPT)
    with_adapter = gguf_logits(f16, ids, lora_path=str(tmp_path / "lora.gguf"))
    merged = gguf_logits(Path(fused.gguf["path"]), ids)
    # attention without query scaling amplifies the fp16 rounding of the merged weights (0.09 measured)
    assert np.abs(with_adapter - merged).max() < 0.02 * np.abs(merged).max()
    assert np.abs(gguf_logits(f16, ids) - merged).max() > 1.0  # the adapter does change the model


@pytest.mark.parametrize("quantize_bits", [None, 4], ids=["lora", "qlora"])
def test_lora_and_qlora_training_lower_the_loss(tiny_models, quantize_bits):
    loaded = load_model(str(tiny_models["gemma4"]), quantize_bits=quantize_bits)
    model = apply_method(loaded.model, MethodConfig(name="lora", rank=4, target_modules=ALL_LINEAR))
    examples = corpus_examples(loaded.tokenizer)
    loss_fn = SupervisedLoss(64)

    def every():
        from macft.data import iterate_batches

        return iterate_batches(examples, 4, 64, seed=0)

    def batches(epoch: int, start: int):
        from macft.data import iterate_batches

        return iterate_batches(examples, 4, 64, seed=0, epoch=epoch, start=start, loop=True)

    initial = evaluate(model, every(), loss_fn)
    config = TrainConfig(iters=8, batch_size=4, learning_rate=1e-2, lr_schedule="constant", eval_every=0, save_every=0)
    result = train(model, optim.Adam(learning_rate=config.learning_rate), batches, None, loss_fn, config)
    assert result.stop_reason == "finished" and result.compiled, result.compile_note
    assert evaluate(model, every(), loss_fn) < initial - 0.05


def test_qlora_run_from_the_command_line(tiny_models, tmp_path):
    run = cli_lora_run(tiny_models["gemma4"], tmp_path, "qlora")
    saved = mx.load(str(run / "adapters.safetensors"))
    assert mx.abs(saved["model.layers.1.self_attn.q_proj.lora_b"]).max().item() > 0  # B starts at zero: it learned


def test_methods_that_wrap_the_blocks_are_refused(tiny_models):
    loaded = load_model(str(tiny_models["gemma4"]))
    for name in ("prompt", "ptuning", "prefix", "adapter"):
        with pytest.raises(MacftError, match=f"'{name}' method cannot train a gemma4 model"):
            apply_method(loaded.model, MethodConfig(name=name), loaded.tokenizer)
