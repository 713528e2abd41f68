"""GGUF import: exact quantized weights, every family's names and config, the tokenizer, bad files,
the cache, the command, and agreement with llama.cpp.

Tiny GGUF files are written here with gguf-py straight from the tiny random models (HF names →
gguf-py's own name map, Gemma norms + 1, llama q/k rows permuted as llama.cpp's converter does),
so the importer is checked against an independent writer, gguf-py's dequantization and llama.cpp.
"""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q

from macft.errors import MacftError
from macft.families import FAMILIES
from macft.families.llama import llama3_rope_scaling
from macft.models.gguf_import import import_gguf, import_gguf_report
from macft.models.gguf_import.affine import pack, quantize_exact
from macft.models.gguf_import.reader import read_gguf
from macft.models.load import load_model
from macft.paths import RECIPES_DIR

try:
    import llama_cpp
except ImportError:  # llama-cpp-python is optional; the tests that need it say so
    llama_cpp = None

needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

SAMPLE_TEXTS = [
    "Hello world! The quick brown fox.",
    "  leading spaces,\ttabs\tand\n\nnewlines   then trailing  ",
    "Ünïcödé café naïve 東京 😀 emoji",
    "Numbers 0 12 345 6789 3.14159 2025-11-23",
    "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4<eos>",
    "SELECT name FROM users WHERE age >= 30;",
]
SIMPLE_QUANTS = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
EXACT_BITS = {Q.Q8_0: 8, Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q4_K: 4, Q.Q5_K: 5}  # the types MLX holds exactly


# ---------------------------------------------------------------------------- a GGUF writer for tests


def write_gguf(model_dir: Path, out: Path, quant=lambda name, shape: Q.F32, arch: str | None = None, vocab: dict | None = None) -> Path:
    """Write a tiny HF/MLX model directory as GGUF; ``quant(gguf_name, shape)`` picks each 2-D tensor's
    type; ``vocab`` replaces the model's own byte-level BPE vocabulary (see ``bpe_vocab``)."""
    config = json.loads((model_dir / "config.json").read_text())
    family = {"gemma3_text": "gemma3", "qwen3_moe": "qwen3moe", "gemma4_text": "gemma4", "qwen3_5": "qwen35"}.get(config["model_type"], config["model_type"])
    arch = arch or family
    weights = {k.removeprefix("language_model."): np.array(v.astype(mx.float32)) for k, v in mx.load(str(model_dir / "model.safetensors")).items()}
    layers = config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim", config["hidden_size"] // heads)
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == family), layers)

    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    widths = config["intermediate_size"]
    if family == "gemma4":  # double-wide MLPs in the k/v-sharing layers
        widths = [widths * (2 if i >= layers - config["num_kv_shared_layers"] else 1) for i in range(layers)]
    writer.add_feed_forward_length(widths)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope_dims, rope_theta = head_dim, config["rope_theta"]
    if family == "gemma4":  # the global layers' head size and RoPE base; the sliding layers' below
        rope_dims, rope_theta = config["global_head_dim"], config["rope_parameters"]["full_attention"]["rope_theta"]
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(int(rope_dims * (config["rope_parameters"]["partial_rotary_factor"] if family == "qwen35" else 1)))
    if family in ("gemma3", "qwen3", "qwen3moe", "gemma4", "qwen35"):
        writer.add_key_length(rope_dims)
        writer.add_value_length(rope_dims)
    if "num_experts" in config:
        writer.add_expert_count(config["num_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if family == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
        writer.add_sliding_window_pattern([(i + 1) % config["sliding_window_pattern"] != 0 for i in range(layers)])
        writer.add_rope_freq_base_swa(config["rope_local_base_freq"])
    if family == "gemma4":
        writer.add_key_length_swa(head_dim)
        writer.add_value_length_swa(head_dim)
        writer.add_rope_dimension_count_swa(head_dim)
        writer.add_rope_freq_base_swa(config["rope_parameters"]["sliding_attention"]["rope_theta"])
        writer.add_sliding_window(config["sliding_window"])
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in config["layer_types"]])
        writer.add_shared_kv_layers(config["num_kv_shared_layers"])
        writer.add_embedding_length_per_layer_input(config["hidden_size_per_layer_input"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        # proportional RoPE: the first pairs rotate, the rest are held still by a huge divisor
        rotated = int(rope_dims * config["rope_parameters"]["full_attention"]["partial_rotary_factor"]) // 2
        writer.add_tensor("rope_freqs.weight", np.array([1.0] * rotated + [1e30] * (rope_dims // 2 - rotated), dtype=np.float32))
    if family == "qwen35":
        add_qwen35_hparams(writer, config)

    vocab = vocab or bpe_vocab(model_dir, family)
    writer.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    if "add_space_prefix" in vocab:
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    writer.add_bos_token_id(vocab["ids"]["bos"])
    writer.add_eos_token_id(vocab["ids"]["eos"])
    writer.add_pad_token_id(vocab["ids"]["pad"])
    writer.add_unk_token_id(vocab["ids"]["unk"])
    writer.add_add_bos_token(True)
    if "template" in vocab:
        writer.add_chat_template(vocab["template"])

    n_tokens = len(vocab["tokens"])
    for name, value in weights.items():
        if family == "qwen35":
            name, value = qwen35_tensor(name, value, config)
        if name in ("model.embed_tokens.weight", "lm_head.weight") and value.shape[0] != n_tokens:
            value = np.resize(value, (n_tokens, value.shape[1]))  # another vocabulary: reuse random rows
        # gguf-py knows HF's stacked expert names ("mlp.experts.up_proj"), not mlx-lm's "switch_mlp"
        hf_name = name.replace(".switch_mlp.", ".experts.") + (".weight" if name.endswith("layer_scalar") else "")
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert target is not None, name
        if family == "gemma3" and "norm" in name:
            value = value + 1.0
        if family == "llama" and (".q_proj." in name or ".k_proj." in name):
            n = heads if ".q_proj." in name else kv_heads
            value = value.reshape(n, 2, value.shape[0] // n // 2, *value.shape[1:]).swapaxes(1, 2).reshape(value.shape)
        qtype = quant(target, value.shape) if value.ndim >= 2 and ".ssm_conv1d." not in target else Q.F32
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(target, np.ascontiguousarray(value, dtype=np.float32 if qtype == Q.F32 else np.float16))
        else:
            writer.add_tensor(target, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def add_qwen35_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    """The keys convert_hf_to_gguf.py writes for Qwen3.5's linear-attention blocks and partial M-RoPE."""
    writer.add_full_attention_interval(config["full_attention_interval"])
    writer.add_rope_dimension_sections(config["rope_parameters"]["mrope_section"] + [0])
    writer.add_ssm_conv_kernel(config["linear_conv_kernel_dim"])
    writer.add_ssm_state_size(config["linear_key_head_dim"])
    writer.add_ssm_group_count(config["linear_num_key_heads"])
    writer.add_ssm_time_step_rank(config["linear_num_value_heads"])
    writer.add_ssm_inner_size(config["linear_value_head_dim"] * config["linear_num_value_heads"])


def qwen35_tensor(name: str, value: np.ndarray, config: dict) -> tuple[str, np.ndarray]:
    """One Qwen3.5 tensor as convert_hf_to_gguf.py writes it: A = -exp(A_log), dt_bias as ssm_dt.bias,
    the conv kernel 2-D, and value heads reordered from grouped by key head to tiled over key heads."""
    n_k, n_v, dim = config["linear_num_key_heads"], config["linear_num_value_heads"], config["linear_value_head_dim"]
    heads = [k * (n_v // n_k) + j for j in range(n_v // n_k) for k in range(n_k)]  # tiled slot -> grouped head
    value_rows = lambda size: np.concatenate([np.arange(h * size, (h + 1) * size) for h in heads])  # noqa: E731
    qk = 2 * n_k * config["linear_key_head_dim"]
    if name.endswith(".A_log"):
        value = -np.exp(value)
    if name.endswith(".dt_bias"):
        name = name.replace(".dt_bias", ".dt_proj.bias")
    if ".conv1d." in name:
        value = value[..., 0]
    if ".in_proj_qkv." in name or ".conv1d." in name:
        value = np.concatenate([value[:qk], value[qk:][value_rows(dim)]])
    elif ".in_proj_z." in name:
        value = value[value_rows(dim)]
    elif any(part in name for part in (".in_proj_a.", ".in_proj_b.", ".A_log", ".dt_proj.")):
        value = value[value_rows(1)]
    elif ".linear_attn.out_proj." in name:
        value = value[:, value_rows(dim)]
    return name, value


def bpe_vocab(model_dir: Path, family: str) -> dict:
    """The tiny model's byte-level BPE tokenizer as GGUF tokenizer fields."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(ids.items(), key=lambda kv: kv[1])]
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    merges = json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
    template_file = model_dir / "chat_template.jinja"  # transformers 5 keeps the template beside the config
    template = template_file.read_text() if template_file.exists() else json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    return {
        "model": "gpt2",
        # transformers loads a qwen2 (qwen3_5) model directory with Qwen2's (Qwen3.5's) own pre-tokenizer, whatever tokenizer.json says
        "pre": {"qwen2": "qwen2", "qwen35": "qwen35"}.get(family, "gpt-2"),
        "tokens": tokens,
        "types": [3 if t in special else 1 for t in tokens],
        "merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
        "ids": {"bos": ids["<bos>"], "eos": ids["<eos>"], "pad": ids["<pad>"], "unk": ids["<unk>"]},
        "template": template,
    }


def spm_vocab(add_space_prefix: bool) -> dict:
    """A SentencePiece BPE vocabulary (byte fallback, user-defined tokens) trained on the tiny corpus."""
    import io

    import sentencepiece as spm

    from macft.models.random_init import CORPUS

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4), model_writer=proto, vocab_size=420, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=add_space_prefix, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        user_defined_symbols=["<|user|>", "<|end|>", "<|assistant|>"], minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    kinds = [(sp.is_unknown, 2), (sp.is_control, 3), (sp.is_byte, 6), (sp.is_unused, 5)]
    user_defined = {"<|user|>", "<|end|>", "<|assistant|>"}
    types = []
    for i in range(sp.get_piece_size()):
        kind = next((code for test, code in kinds if test(i)), 4 if sp.id_to_piece(i) in user_defined else 1)
        types.append(kind)
    return {
        "model": "llama",
        "tokens": [sp.id_to_piece(i) for i in range(sp.get_piece_size())],
        "scores": [sp.get_score(i) for i in range(sp.get_piece_size())],
        "types": types,
        "add_space_prefix": add_space_prefix,
        "ids": {"bos": 2, "eos": 1, "pad": 0, "unk": 3},
    }


def mixed_quants(name: str, shape) -> Q:
    """A different exact type per tensor, so one file mixes bit widths like real K-quant mixes do."""
    if name == "token_embd.weight":
        return Q.Q8_0
    return SIMPLE_QUANTS[sum(map(ord, name)) % len(SIMPLE_QUANTS)]


def logits_of(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


# ---------------------------------------------------------------------------- quantized formats


def test_pack_is_mlx_layout():
    rng = np.random.default_rng(0)
    for bits in (4, 5, 8):
        q = rng.integers(0, 2**bits, size=(3, 64)).astype(np.uint8)
        ones, zeros = mx.ones((3, 2)), mx.zeros((3, 2))
        out = mx.dequantize(mx.array(pack(q, bits)), ones, zeros, group_size=32, bits=bits)
        np.testing.assert_array_equal(np.array(out), q.astype(np.float32))


@pytest.mark.parametrize("qtype", SIMPLE_QUANTS, ids=lambda q: q.name)
def test_simple_quants_dequantize_exactly(qtype):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((16, 256)) * rng.uniform(0.01, 3, size=(16, 1))).astype(np.float32)
    w[0] = 0.0  # an all-zero block has scale 0
    w[1, :32] = 1e-3 * rng.standard_normal(32)
    raw = gguf.quants.quantize(w, qtype)
    expected = gguf.quants.dequantize(raw, qtype)
    packed = quantize_exact(raw, qtype)
    assert packed.bits == EXACT_BITS[qtype] and packed.scales.dtype == np.float32
    got = np.array(mx.dequantize(mx.array(packed.weight), mx.array(packed.scales), mx.array(packed.biases), group_size=32, bits=packed.bits))
    # equal as numbers (gguf-py's d·(q − 16) can be −0.0 where MLX's d·q − 16·d gives +0.0)
    np.testing.assert_array_equal(got, expected)


def random_k_blocks(qtype: Q, n_blocks: int, rng) -> np.ndarray:
    """Valid K-quant blocks: finite f16 super-scales, any bits elsewhere."""
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    supers = (rng.standard_normal((n_blocks, 2)) * 0.01).astype(np.float16)
    blocks[:, :4] = supers.view(np.uint8)
    return blocks


@pytest.mark.parametrize("qtype", (Q.Q4_K, Q.Q5_K), ids=lambda q: q.name)
def test_k_quants_dequantize_exactly(qtype):
    rng = np.random.default_rng(2)
    rows = random_k_blocks(qtype, 8 * 3, rng).reshape(8, -1)  # 8 rows of 768 weights
    expected = gguf.quants.dequantize(rows, qtype)
    packed = quantize_exact(rows, qtype)
    got = np.array(mx.dequantize(mx.array(packed.weight), mx.array(packed.scales), mx.array(packed.biases), group_size=32, bits=packed.bits))
    assert got.shape == expected.shape == (8, 768)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_float32_scales_run_in_quantized_matmul():
    rng = np.random.default_rng(3)
    raw = random_k_blocks(Q.Q4_K, 4, rng).reshape(4, -1)
    packed = quantize_exact(raw, Q.Q4_K)
    x = mx.array(rng.standard_normal((2, 256)).astype(np.float32))
    out = mx.quantized_matmul(x, mx.array(packed.weight), mx.array(packed.scales), mx.array(packed.biases), transpose=True, group_size=32, bits=4)
    reference = np.array(x) @ gguf.quants.dequantize(raw, Q.Q4_K).T
    np.testing.assert_allclose(np.array(out), reference, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- families


@pytest.fixture(scope="module")
def gguf_files(tiny_models, tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("gguf")
    return {
        family: {
            "f32": write_gguf(model_dir, root / f"{family}-f32.gguf"),
            "mixed": write_gguf(model_dir, root / f"{family}-mixed.gguf", quant=mixed_quants),
        }
        for family, model_dir in tiny_models.items()
    }


def test_float_import_reproduces_the_source_model(family_model_dir, gguf_files):
    from mlx_lm import load

    family = family_model_dir.name
    source_model, source_tok = load(str(family_model_dir))
    model, tokenizer = load(str(import_gguf(gguf_files[family]["f32"])))
    for text in SAMPLE_TEXTS:
        assert tokenizer.encode(text) == source_tok.encode(text), text
    ids = source_tok.encode(SAMPLE_TEXTS[0] + SAMPLE_TEXTS[3])
    np.testing.assert_allclose(logits_of(model, ids), logits_of(source_model, ids), rtol=1e-5, atol=1e-5)
    assert tokenizer.chat_template == source_tok.chat_template


def test_quantized_import_is_exact(family_model_dir, gguf_files):
    from mlx.utils import tree_flatten
    from mlx_lm import load

    family = family_model_dir.name
    path = gguf_files[family]["mixed"]
    report = import_gguf_report(path)
    model, tokenizer = load(str(report.path))
    config = json.loads((report.path / "config.json").read_text())
    gguf_file = read_gguf(path)
    # every quantized layer holds exactly gguf-py's dequantization of the file's tensor
    params = dict(tree_flatten(model.parameters()))
    n_checked, n_float = 0, 0
    for name, info in gguf_file.tensors.items():
        if info.qtype == Q.F32:
            continue
        module = _hf_module(family, name, params)
        expected = gguf.quants.dequantize(gguf_file.rows(name), info.qtype)
        if not FAMILIES[family].keeps_blocks(f"{module}.weight", config):  # its columns move: float, same values
            got = np.array(params[f"{module}.weight"])
            assert config["quantization"][module] is False
            np.testing.assert_array_equal(qwen35_tensor(f"{module}.weight", got, config)[1], expected)
            n_float += 1
            continue
        assert config["quantization"][module]["bits"] == EXACT_BITS[info.qtype]
        got = np.array(mx.dequantize(params[f"{module}.weight"], params[f"{module}.scales"], params[f"{module}.biases"], group_size=32, bits=EXACT_BITS[info.qtype]))
        expected = expected.reshape(got.shape)  # 3-D: experts
        if family == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            n = config["num_attention_heads"] if "attn_q" in name else config["num_key_value_heads"]
            got = got.reshape(n, 2, got.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(got.shape)
        if family == "qwen3_5":
            got = qwen35_tensor(f"{module}.weight", got, config)[1]
        np.testing.assert_array_equal(got, expected)
        n_checked += 1
    assert n_checked == sum(report.summary["exact"].values()) > 0
    assert n_float == sum(report.summary["float"].values()) - report.summary["float"].get("F32", 0)
    # the all-float import of the same file computes the same function
    float_model, _ = load(str(import_gguf(path, dequantize=True)))
    ids = tokenizer.encode(SAMPLE_TEXTS[2])
    np.testing.assert_allclose(logits_of(model, ids), logits_of(float_model, ids), rtol=1e-4, atol=1e-4)


def test_half_precision_tensors_keep_their_values(tiny_models, tmp_path):
    from mlx.utils import tree_flatten
    from mlx_lm import load

    halves = lambda name, shape: Q.F16 if "attn" in name else Q.BF16  # noqa: E731
    path = write_gguf(tiny_models["qwen3"], tmp_path / "half.gguf", quant=halves)
    report = import_gguf_report(path)
    assert set(report.summary["float"]) == {"F32", "F16", "BF16"} and not report.summary["exact"]
    model, _ = load(str(report.path))
    params = dict(tree_flatten(model.parameters()))
    gguf_file = read_gguf(path)
    for name, info in gguf_file.tensors.items():
        module = _hf_module("qwen3", name, params)
        expected = gguf.quants.dequantize(gguf_file.rows(name), info.qtype).reshape(info.shape)
        got = params[f"{module}.weight" if name.endswith(".weight") else f"{module}.bias"]
        assert got.dtype == {Q.F32: mx.float32, Q.F16: mx.float16, Q.BF16: mx.bfloat16}[info.qtype]
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)), expected)


def _hf_module(family: str, gguf_name: str, params: dict) -> str:
    """The mlx-lm module path whose GGUF name (by gguf-py's own map) is ``gguf_name``."""
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == FAMILIES[family].gguf_arch)
    prefix = FAMILIES[family].weights_prefix  # mlx-lm's qwen3_5 nests the decoder under language_model.
    layers = 1 + max(int(k.removeprefix(prefix).split(".")[2]) for k in params if k.startswith(f"{prefix}model.layers."))
    names = gguf.get_tensor_name_map(arch, layers)
    modules = {k.rsplit(".", 1)[0] for k in params}
    stem = gguf_name.rsplit(".", 1)[0] + ".weight"
    hf = lambda m: m.removeprefix(prefix).replace(".switch_mlp.", ".experts.") + ".weight"  # noqa: E731
    return next(m for m in modules if names.get_name(hf(m), try_suffixes=(".weight",)) == stem)


@needs_llama_cpp
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "qwen3_moe", "qwen3_5"])
def test_tiny_models_agree_with_llama_cpp(family, gguf_files):
    path = gguf_files[family]["f32"]
    loaded = load_model(str(path))  # macft's loader: transformers alone would NFC-normalize qwen2 text
    model, tokenizer = loaded.model, loaded.tokenizer
    reference = llama_cpp.Llama(str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False, type_k=0, type_v=0)
    for text in SAMPLE_TEXTS + VARIED_TEXTS:
        assert tokenizer.encode(text) == reference.tokenize(text.encode(), add_bos=True, special=True), text
    ids = tokenizer.encode(SAMPLE_TEXTS[0])
    reference.eval(ids)
    np.testing.assert_allclose(logits_of(model, ids), np.array(reference.scores[: len(ids)]), atol=2e-3)


@needs_llama_cpp
@pytest.mark.parametrize("space_prefix", [True, False], ids=["space-prefix", "no-space-prefix"])
def test_sentencepiece_vocabulary_matches_llama_cpp(space_prefix, tiny_models, tmp_path):
    from mlx_lm.utils import load_tokenizer

    path = write_gguf(tiny_models["llama"], tmp_path / "spm.gguf", vocab=spm_vocab(space_prefix))
    tokenizer = load_tokenizer(import_gguf(path))
    reference = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    for text in SAMPLE_TEXTS + ["<|user|>\nHi<|end|>", "no\u00a0break 12345"]:
        assert tokenizer.encode(text) == reference.tokenize(text.encode(), add_bos=True, special=True), text


VARIED_TEXTS = [
    "Tiếng Việt có dấu: Nguyễn Trãi, người Việt",
    unicodedata.normalize("NFD", "Tiếng Việt có dấu: Nguyễn Trãi, người Việt"),  # combining marks
    "e\u0301 a\u0300b \u0301x 1\u0301 ",
    "हिन्दी भाषा, عربي, Ελληνικά, русский, 한국어",
    "x 12 345 6789 3.14159 1234567",
    "  runs   of\t\tspaces\n\n\n  and 😀🚀👩‍👩‍👧 emoji",
]


@needs_llama_cpp
def test_llama3_vocabulary_takes_whole_words_like_llama_cpp(tiny_models, tmp_path):
    """A Llama 3 (llama-bpe) vocabulary holds whole words its merges would not build, such as Vietnamese
    ones; llama.cpp takes those whole, and so must the tokenizer rebuilt on import."""
    from mlx_lm.utils import load_tokenizer

    byte_char = _byte_level_chars()
    vocab = bpe_vocab(tiny_models["llama"], "llama")
    words = [" Việt", " Nguyễn", "\u0323\u0302"]  # the last: the marks of a decomposed "ệ", one regex piece
    vocab["pre"] = "llama-bpe"
    vocab["tokens"] = vocab["tokens"] + ["".join(byte_char[b] for b in w.encode()) for w in words]
    vocab["types"] = vocab["types"] + [1] * len(words)
    path = write_gguf(tiny_models["llama"], tmp_path / "llama3.gguf", vocab=vocab)
    tokenizer = load_tokenizer(import_gguf(path))
    reference = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    whole = len(vocab["tokens"]) - len(words)
    assert reference.tokenize(" Việt".encode(), add_bos=False) == [whole]  # llama.cpp does take it whole
    for text in SAMPLE_TEXTS + VARIED_TEXTS:
        assert tokenizer.encode(text) == reference.tokenize(text.encode(), add_bos=True, special=True), text


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE spells every token with these)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


# ---------------------------------------------------------------------------- llama.cpp's test vocabularies

# llama-cpp-python's source distribution carries llama.cpp's models/ggml-vocab-*.gguf with the inputs
# (.inp) and the token ids llama.cpp's test-tokenizer-0 expects for them (.out).
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
VOCABULARIES = ("llama-spm", "llama-bpe", "qwen2", "qwen35", "phi-3", "gpt-2", "gemma-4")
VECTOR_SEPARATOR = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="session")
def llama_vocabularies(request, tmp_path_factory) -> Path:
    """The test vocabularies and their vectors, taken once from the sdist (``pip download``, the
    package index pip is configured with) into pytest's cache folder."""
    import subprocess
    import sys
    import tarfile
    import tempfile

    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("llama-cpp-vocabularies-0.3.36") if cache is not None else tmp_path_factory.mktemp("vocabularies")
    wanted = {f"ggml-vocab-{name}.gguf{suffix}" for name in VOCABULARIES for suffix in ("", ".inp", ".out")}
    if all((folder / name).is_file() for name in wanted):
        return folder
    with tempfile.TemporaryDirectory() as download:
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet", LLAMA_CPP_SDIST, "-d", download]
        if subprocess.run(command, capture_output=True, timeout=900).returncode != 0:
            pytest.skip(f"could not download {LLAMA_CPP_SDIST}'s source distribution for llama.cpp's test vocabularies")
        with tarfile.open(next(Path(download).glob("*.tar.gz"))) as sdist:
            for member in sdist:
                name = Path(member.name).name
                if name in wanted and member.name.endswith(f"vendor/llama.cpp/models/{name}"):
                    (folder / f".{name}.part").write_bytes(sdist.extractfile(member).read())
                    (folder / f".{name}.part").rename(folder / name)
    assert all((folder / name).is_file() for name in wanted), sorted(wanted - {p.name for p in folder.iterdir()})
    return folder


def vocabulary_vectors(folder: Path, name: str) -> list[tuple[str, list[int]]]:
    """(text, token ids) pairs, split as llama.cpp's test-tokenizer-0 splits them (bytes as written, no newline translation)."""
    raw = (folder / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    texts, at = [], 0
    while at < len(raw):  # a separator at the very end ends the list
        end = raw.find(VECTOR_SEPARATOR, at)
        texts.append(raw[at:] if end < 0 else raw[at:end])
        at = len(raw) if end < 0 else end + len(VECTOR_SEPARATOR)
    lines = (folder / f"ggml-vocab-{name}.gguf.out").read_text().split("\n")
    if lines and lines[-1] == "":  # getline() yields no line after a final newline
        lines.pop()
    assert len(texts) == len(lines) and texts, (name, len(texts), len(lines))
    return [(text, [int(t) for t in line.split()]) for text, line in zip(texts, lines)]


def imported_tokenizer(path: Path, out: Path):
    """The tokenizer a GGUF import builds and macft then loads (bytes read as given, as for every import)."""
    from macft.models.gguf_import.tokenizer import save_tokenizer
    from macft.models.tokenizer_cache import LazyTokenizer

    out.mkdir()
    save_tokenizer(read_gguf(path), out)
    return LazyTokenizer(out, as_given=True).get()


@pytest.mark.parametrize("name", [name for name in VOCABULARIES if name != "gemma-4"])  # gemma-4: through `macft import` below
def test_vocabularies_tokenize_as_llama_cpp_test_vectors_say(name, llama_vocabularies, tmp_path):
    tokenizer = imported_tokenizer(llama_vocabularies / f"ggml-vocab-{name}.gguf", tmp_path / "tokenizer")
    vectors = vocabulary_vectors(llama_vocabularies, name)
    wrong = [(text, expected, got) for text, expected in vectors if (got := tokenizer.encode(text, add_special_tokens=False)) != expected]
    assert not wrong, f"{len(wrong)} of {len(vectors)} differ, first: {wrong[0]}"


def gemma4_vocabulary(folder: Path) -> dict:
    """Gemma 4's tokenizer fields, as a real Gemma 4 GGUF carries them (``write_gguf``'s ``vocab``)."""
    meta = read_gguf(folder / "ggml-vocab-gemma-4.gguf").metadata
    field = {key: meta[f"tokenizer.ggml.{key}"] for key in ("model", "tokens", "merges", "scores")}
    ids = {short: meta[f"tokenizer.ggml.{key}_token_id"] for short, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}
    return {**field, "types": meta["tokenizer.ggml.token_type"], "ids": ids, "template": meta["tokenizer.chat_template"]}


def test_a_gemma4_gguf_imports_with_its_own_tokenizer(tiny_models, llama_vocabularies, tmp_path):
    """A Gemma 4 GGUF declares ``tokenizer.ggml.model = gemma4`` (262,144 tokens); `macft import` takes
    it, tokenizes as llama.cpp's vectors say, and stops generation at Gemma 4's end of turn."""
    from macft.cli import cli

    path = write_gguf(tiny_models["llama"], tmp_path / "gemma4-vocab.gguf", vocab=gemma4_vocabulary(llama_vocabularies),
                      quant=lambda name, shape: Q.Q8_0 if name == "token_embd.weight" else Q.F32)
    result = CliRunner().invoke(cli, ["import", str(path), "--out", str(tmp_path / "imported")])
    assert result.exit_code == 0, result.output
    loaded = load_model(str(tmp_path / "imported"))
    vectors = vocabulary_vectors(llama_vocabularies, "gemma-4")
    wrong = [(text, expected, got) for text, expected in vectors if (got := loaded.tokenizer.encode(text, add_special_tokens=False)) != expected]
    assert not wrong, f"{len(wrong)} of {len(vectors)} differ, first: {wrong[0]}"
    assert loaded.tokenizer.encode("Hi")[0] == 2  # BOS, as llama.cpp adds it for Gemma 4
    stops = json.loads((tmp_path / "imported" / "generation_config.json").read_text())["eos_token_id"]
    assert {1, 106} <= set(stops), stops  # <eos> and <turn|>


def test_llama3_rope_scaling_is_recovered():
    from mlx_lm.models.rope_utils import Llama3RoPE

    true = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    dims, base = 128, 500000.0
    rope = Llama3RoPE(dims, base=base, scaling_config=true)
    plain = base ** (np.arange(0, dims, 2) / dims)
    divisors = np.array(rope._freqs) / plain  # what llama.cpp's rope_freqs tensor holds
    recovered = llama3_rope_scaling(divisors.astype(np.float32), base, dims, "test")
    again = Llama3RoPE(dims, base=base, scaling_config=recovered)
    np.testing.assert_allclose(np.array(again._freqs), np.array(rope._freqs), rtol=1e-5)


# ---------------------------------------------------------------------------- files, cache, command


def test_bad_files_give_one_line_errors(tmp_path, gguf_files):
    good = gguf_files["llama"]["f32"].read_bytes()
    cases = {
        "random.gguf": np.random.default_rng(4).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "empty.gguf": b"",
        "text.gguf": b"this is a README, not a model\n" * 20,
        "truncated.gguf": good[: len(good) // 2],
        "header-only.gguf": good[:64],
        "bad-count.gguf": good[:8] + (2**60).to_bytes(8, "little") + good[16:],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MacftError) as info:
            import_gguf(tmp_path / name)
        message = str(info.value)
        assert "\n" not in message and name in message, message


def test_a_tensor_type_macft_cannot_read_is_one_line(tmp_path, gguf_files):
    """A type no ``macft.quants`` record declares (I32, which no weight uses) is named, not a traceback."""
    data = bytearray(gguf_files["llama"]["f32"].read_bytes())
    name = b"output_norm.weight"
    at = data.index(name) + len(name)  # then: dimension count (u32), dimensions (u64 each), type (u32)
    type_at = at + 4 + 8 * int.from_bytes(data[at : at + 4], "little")
    assert int.from_bytes(data[type_at : type_at + 4], "little") == Q.F32
    data[type_at : type_at + 4] = int(Q.I32).to_bytes(4, "little")  # as many bytes as F32
    path = tmp_path / "i32.gguf"
    path.write_bytes(data)
    with pytest.raises(MacftError, match="GGUF tensor type I32 is not supported") as info:
        import_gguf(path)
    assert "\n" not in str(info.value)


def test_unsupported_architecture_is_named(tmp_path, tiny_models):
    path = write_gguf(tiny_models["llama"], tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(MacftError, match="'falcon' is not supported.*gemma3, gemma4, llama, phi3, qwen2, qwen3"):
        import_gguf(path)


def test_reimport_is_cached_by_content(tmp_path, gguf_files, monkeypatch):
    monkeypatch.setenv("MACFT_HOME", str(tmp_path / "fresh-home"))
    path = gguf_files["qwen3"]["mixed"]
    first = import_gguf_report(path)
    again = import_gguf_report(path)
    assert not first.cached and again.cached and again.path == first.path
    assert first.path.name == first.sha256
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    assert import_gguf_report(copy).path == first.path  # same bytes, same import
    assert import_gguf(path, dequantize=True).name == f"{first.sha256}-dequantized"


def test_import_command_writes_a_loadable_directory(tmp_path, gguf_files):
    from mlx_lm import load

    from macft.cli import cli

    out = tmp_path / "imported"
    result = CliRunner().invoke(cli, ["import", str(gguf_files["gemma3"]["mixed"]), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["path"] == str(out) and report["summary"]["exact"]["Q8_0"] >= 1
    model, tokenizer = load(str(out))
    assert logits_of(model, tokenizer.encode("hello")).shape[-1] == model.args.vocab_size
    bad = CliRunner().invoke(cli, ["import", str(tmp_path / "missing.gguf")])
    assert bad.exit_code != 0 and "does not exist" in bad.output


def test_model_spec_accepts_a_gguf_path(gguf_files):
    from macft.models.load import load_model

    loaded = load_model(str(gguf_files["phi3"]["mixed"]))
    assert loaded.family == "phi3" and loaded.path.parent.name == "gguf"
    ids = loaded.tokenizer.encode(SAMPLE_TEXTS[0])
    assert np.isfinite(logits_of(loaded.model, ids)).all()


# ---------------------------------------------------------------------------- the embedded Gemma 3 270M


@needs_llama_cpp
@pytest.mark.slow
def test_embedded_gemma_agrees_with_llama_cpp(tmp_path):
    """Logits of the exact import against llama.cpp, on the Q4_K_M file and on an F32 copy of it.

    llama.cpp's CPU kernels quantize activations to 8 bits before each quantized dot product, so
    on the Q4_K_M file it differs from its own F32 run about as much as it differs from us; the
    F32 copy (dequantized by llama.cpp itself) isolates the import and must agree tightly. Our
    quantized layers are expanded with mx.dequantize (exact) because MLX's CPU quantized matmul
    is slow; the values are the imported ones, bit for bit."""
    from mlx_lm.generate import generate_step

    from macft.models.quantized import dequantize_model
    from macft.models.load import load_model
    from macft.models.spec import embedded_default_gguf

    source = embedded_default_gguf()
    loaded = load_model(str(source))
    model, tokenizer = loaded.model, loaded.tokenizer
    vocab = llama_cpp.Llama(str(source), vocab_only=True, verbose=False)
    samples = SAMPLE_TEXTS + ["<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n", "tab\tand   three spaces\u00a0nbsp"]
    for text in samples:
        assert tokenizer.encode(text) == vocab.tokenize(text.encode(), add_bos=True, special=True), text

    dequantize_model(model, mx.float32)
    records = (RECIPES_DIR / "data" / "quickstart" / "valid.jsonl").read_text().splitlines()
    text = "\n".join(json.loads(line)["prompt"] + json.loads(line)["completion"] for line in records)[:1500]
    ids = tokenizer.encode(text)[:300]
    ours = logits_of(model, ids)
    prompts = [tokenizer.encode(p) for p in ("The capital of France is", "def fibonacci(n):")]
    greedy = [[int(t) for t, _ in generate_step(mx.array(p), model, max_tokens=32, sampler=lambda x: mx.argmax(x, -1))] for p in prompts]

    f32 = tmp_path / "gemma-f32.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_ALL_F32, True, 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(f32).encode(), params) == 0
    for label, path in (("Q4_K_M", source), ("F32 copy", f32)):
        reference = llama_cpp.Llama(str(path), logits_all=True, n_ctx=512, n_threads=2, verbose=False, type_k=0, type_v=0)
        reference.eval(ids)
        theirs = np.array(reference.scores[: len(ids)])
        diff = np.abs(ours - theirs)
        top1 = (ours.argmax(-1) == theirs.argmax(-1)).mean()
        print(f"\nGemma 3 270M vs llama.cpp ({label}): max |Δlogit| {diff.max():.4f}, mean {diff.mean():.4f}, top-1 equal {top1:.1%} of {len(ids)}")
        if label == "Q4_K_M":
            assert diff.mean() < 0.5 and top1 >= 0.95
            continue
        assert diff.mean() < 0.05 and top1 >= 0.99
        # What is left is mlx-lm's gemma3 scaling embeddings by sqrt(d) rounded to bfloat16
        # (25.25 for 25.30); with llama.cpp's exact scale every position agrees.
        ratio = math.sqrt(model.args.hidden_size) / mx.array(math.sqrt(model.args.hidden_size), mx.bfloat16).item()
        embedding = model.model.embed_tokens
        embedding.weight = embedding.weight * ratio  # tied: the output projection grows by `ratio` too
        exact_scale = logits_of(model, ids) / ratio
        embedding.weight = embedding.weight / ratio
        diff = np.abs(exact_scale - theirs)
        print(f"  with an exact sqrt(d) embedding scale: max |Δlogit| {diff.max():.4f}, mean {diff.mean():.4f}")
        assert diff.mean() < 0.005 and (exact_scale.argmax(-1) == theirs.argmax(-1)).all()
        for prompt, continuation in zip(prompts, greedy):
            # llama.cpp's argmax after every prefix is our next token: its greedy decode is ours
            reference.reset()
            reference.eval(prompt + continuation)
            scores = np.array(reference.scores[: len(prompt) + len(continuation)])
            assert scores[len(prompt) - 1 : -1].argmax(-1).tolist() == continuation
        del reference
