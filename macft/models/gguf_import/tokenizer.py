"""Rebuild a Hugging Face fast tokenizer from a GGUF file's ``tokenizer.ggml.*`` metadata.

transformers already knows how llama.cpp's vocabularies map onto its tokenizers (SentencePiece
``llama``, with Gemma's and Phi-3's quirks; byte-level BPE ``gpt2`` with the pre-tokenizer named by
``tokenizer.ggml.pre``; Gemma 4's ``gemma4``, a BPE on raw UTF-8 with "▁" for spaces and byte
fallback); we hand it the metadata read by our own reader (its GGUF reader needs torch), then write
``tokenizer.json`` and ``tokenizer_config.json`` with the special tokens, ``add_bos_token``/
``add_eos_token`` (as llama.cpp reads them: Gemma 4 files say to add BOS) and the chat template, so
``mlx_lm`` loads them. ``tests/test_gguf_import.py`` checks every kind against llama.cpp's own test
vectors.

    save_tokenizer(gguf, model_dir)
"""

from __future__ import annotations

import json
from pathlib import Path

from macft.errors import MacftError
from macft.models.gguf_import.reader import GGUFFile

# tokenizer.ggml.<key> -> the name transformers' GGUF converter reads
_CONVERTER_KEYS = {
    "model": "tokenizer_type",
    "pre": "pre_tokenizer_type",
    "tokens": "tokens",
    "scores": "scores",
    "token_type": "token_type",
    "merges": "merges",
    "precompiled_charsmap": "precompiled_charsmap",
}
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
# Pre-tokenizers for which llama.cpp takes a word found whole in the vocabulary as one token before
# applying merges (Llama 3's tokenizer.json says "ignore_merges": true); transformers' GGUF builder
# leaves that out, so words the merges would split otherwise (a Vietnamese "Việt") came out differently.
WHOLE_WORD_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"})
# end-of-turn tokens llama.cpp also stops on; a chat model that ends turns with one must stop there
END_OF_TURN_TEXTS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<|eom_id|>",
                     "<turn|>", "<|tool_response>")  # the last two: Gemma 4's end of turn, and its call for a tool's answer


def save_tokenizer(gguf: GGUFFile, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    meta = gguf.metadata
    if "tokenizer.ggml.tokens" not in meta:
        raise MacftError(f"{gguf.path} carries no vocabulary (tokenizer.ggml.tokens); it cannot be used as a model.")
    tokenizer_dict = {name: meta[f"tokenizer.ggml.{key}"] for key, name in _CONVERTER_KEYS.items() if f"tokenizer.ggml.{key}" in meta}
    kind = tokenizer_dict.get("tokenizer_type")
    if kind not in ("llama", "gpt2", "gemma4"):
        raise MacftError(
            f"{gguf.path}: tokenizer type '{kind}' is not supported; GGUF import reads 'llama' (SentencePiece), 'gpt2' (BPE) and 'gemma4'."
        )
    try:
        backend, _ = convert_gguf_tokenizer(gguf.architecture, tokenizer_dict)
    except Exception as exc:  # the tokenizers library raises a bare Exception for a damaged vocabulary
        raise MacftError(f"Could not rebuild the tokenizer of {gguf.path.name}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None

    if kind == "llama":
        match_space_prefix(backend, bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
    elif tokenizer_dict.get("pre_tokenizer_type") in WHOLE_WORD_PRE:
        backend.model.ignore_merges = True

    tokens = meta["tokenizer.ggml.tokens"]
    specials = {
        name: tokens[int(meta[f"tokenizer.ggml.{key}"])]
        for name, key in _SPECIAL_IDS.items()
        if f"tokenizer.ggml.{key}" in meta and 0 <= int(meta[f"tokenizer.ggml.{key}"]) < len(tokens)
    }
    # llama.cpp adds BOS to SentencePiece vocabularies that do not say otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, add_bos_token=add_bos, add_eos_token=add_eos, **specials)
    if template := meta.get("tokenizer.chat_template"):
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(out_dir))

    # A class name older transformers releases know too, and the BOS/EOS policy spelled out.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos, add_eos_token=add_eos)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def read_bytes_as_given(tokenizer) -> None:
    """Drop the NFC normalizer transformers' own Qwen2 tokenizer class brings (it replaces ours for
    that model type when the directory is loaded): llama.cpp reads the bytes as given, so a
    decomposed "e" + U+0301, common in Vietnamese text, must not become one "é" in an imported model."""
    backend = getattr(getattr(tokenizer, "_tokenizer", tokenizer), "backend_tokenizer", None)
    if backend is not None and type(backend.normalizer).__name__ == "NFC":
        backend.normalizer = None


def match_space_prefix(backend, add_space_prefix: bool) -> None:
    """Give a SentencePiece tokenizer llama.cpp's leading "▁": in front of every stretch of text
    that starts the input or follows a special token, even one that starts with a space, and
    nowhere when the file says ``add_space_prefix = false``.

    transformers' ``Metaspace`` pre-tokenizer adds it only at the very start and skips text that
    already starts with a space; a normalizer runs on each stretch between special tokens, so it
    does what llama.cpp does (transformers' Phi-3 builder uses the same construction)."""
    from tokenizers import normalizers

    if type(backend.pre_tokenizer).__name__ != "Metaspace":
        return  # Gemma and Phi-3 builders already spell spaces out in a normalizer
    steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    backend.pre_tokenizer = None
    if not add_space_prefix and hasattr(backend.decoder, "prepend_scheme"):
        backend.decoder.prepend_scheme = "never"


def stop_token_ids(gguf: GGUFFile) -> list[int]:
    """EOS, EOT/EOM and the end-of-turn tokens present in the vocabulary, as generation stops."""
    meta = gguf.metadata
    ids = [int(meta[f"tokenizer.ggml.{key}"]) for key in ("eos_token_id", "eot_token_id", "eom_token_id") if f"tokenizer.ggml.{key}" in meta]
    tokens = meta.get("tokenizer.ggml.tokens", [])
    wanted = set(END_OF_TURN_TEXTS)
    ids += [i for i, token in enumerate(tokens) if token in wanted]
    return sorted(set(ids))
