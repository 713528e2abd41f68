"""Build small, randomly initialised models of every supported family, with a real tokenizer.

The tests and benchmarks need models without a network: ``build_random_model("llama", dir)``
writes an HF/MLX model directory (config.json, model.safetensors, tokenizer files with a chat
template) that ``mlx_lm.load`` opens like any downloaded model. The tokenizer is a byte-level BPE
trained here on a small English corpus, so its merges and ids are real, not invented. With
``hf_layout=True`` the weights are stored as transformers stores them, where mlx-lm's layout differs
(mlx-lm's ``sanitize`` turns them back on load), so transformers loads the same folder as the same model.

    python -c "from macft.models.random_init import build_random_model; build_random_model('qwen3', 'tiny-qwen3')"
"""

from __future__ import annotations

import json
from pathlib import Path

from macft.families import FAMILIES as FAMILY_RECORDS

FAMILIES = tuple(FAMILY_RECORDS)

CORPUS = """\
The quick brown fox jumps over the lazy dog. A model learns what its data teaches it.
Fine-tuning adapts a pretrained model to a task with a small set of examples.
SELECT name FROM users WHERE age > 30 ORDER BY name;
Q: What is the capital of France? A: Paris. Q: What is two plus two? A: 4.
user assistant system: Hello! How can I help you today? Thank you, goodbye.
Numbers 0 1 2 3 4 5 6 7 8 9 10 42 100 2025 and symbols = < > ( ) , ; ' " ? ! - _ / *
Ünïcödé wörds, café, naïve, 東京, 😀 emoji and tabs\tand  double  spaces.
"""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def family_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2) -> dict:
    """An HF-style config.json for a tiny model of ``family`` (its record adds what it needs)."""
    heads, kv_heads = 4, 2
    common = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    return FAMILY_RECORDS[family].tiny_config(common)


def build_tokenizer(out_dir: Path, vocab_size: int = 384) -> int:
    """Train a byte-level BPE tokenizer into ``out_dir``; return its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"],
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(out_dir))
    return tokenizer.get_vocab_size()


def build_random_model(
    family: str,
    out_dir: str | Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    dtype: str = "float32",
    hf_layout: bool = False,
) -> Path:
    """Write a randomly initialised ``family`` model with a trained tokenizer to ``out_dir``
    (``hf_layout``: in the layout transformers reads, see the module docstring)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(out)
    config = family_config(family, vocab_size, hidden=hidden, layers=layers)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4], "bos_token_id": 2}))

    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if "norm" in name or name.endswith("layer_scalar"):
            # Random norm weights exercise the norm conversions (Gemma's 1 + w) that ones would hide;
            # Gemma 4's per-layer output scale is drawn the same way (near 1, as trained models have it).
            value = 0.1 * mx.random.normal(value.shape) + (1.0 - FAMILY_RECORDS[family].norm_offset)
        else:
            value = 0.08 * mx.random.normal(value.shape)
        weights[name] = value.astype(getattr(mx, dtype))
    if hf_layout and family in HF_LAYOUTS:
        weights, config = HF_LAYOUTS[family](weights, config)
        (out / "config.json").write_text(json.dumps(config, indent=2))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt" if hf_layout else "mlx"})
    return out


def _experts_per_module(weights: dict, config: dict) -> tuple[dict, dict]:
    """Qwen3-MoE: mlx-lm stacks the experts (``switch_mlp.*``: experts × out × in); the checkpoints
    transformers reads keep one linear layer per expert (``experts.E.*``)."""
    out = {}
    for name, value in weights.items():
        stack, marker, rest = name.partition(".switch_mlp.")
        if marker:
            out.update({f"{stack}.experts.{e}.{rest}": value[e] for e in range(value.shape[0])})
        else:
            out[name] = value
    return out, config


def _qwen3_5_checkpoint(weights: dict, config: dict) -> tuple[dict, dict]:
    """Qwen3.5: transformers' names lack mlx-lm's ``language_model.`` prefix, its RMSNorm weights
    are w where mlx-lm holds 1 + w, its conv1d kernel is (channels, 1, width) where mlx-lm's is
    (channels, width, 1); the config nests the decoder's keys under ``text_config``."""
    norms = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight", ".q_norm.weight", ".k_norm.weight")
    out = {}
    for name, value in weights.items():
        if name.endswith(norms):
            value = value - 1.0
        elif name.endswith(".conv1d.weight"):
            value = value.moveaxis(2, 1)
        out[name.removeprefix("language_model.")] = value
    text = {k: v for k, v in config.items() if k != "architectures"} | {"model_type": "qwen3_5_text"}
    nested = {"model_type": "qwen3_5", "architectures": config["architectures"], "tie_word_embeddings": config["tie_word_embeddings"]}
    return out, {**nested, "text_config": text}


# families whose mlx-lm layout differs from the checkpoints transformers reads
HF_LAYOUTS = {"qwen3_moe": _experts_per_module, "qwen3_5": _qwen3_5_checkpoint}
