"""The ``tokenizer.*`` keys of a GGUF file: vocabulary, merges or scores, special ids, chat template.

Three sources, in order of fidelity:

* a GGUF file the model came from (``copy_from_gguf``): its keys are copied as they are, so an
  imported model exports with exactly the tokenizer llama.cpp already knew;
* a SentencePiece ``tokenizer.model`` (Llama 2, Gemma, Phi-3): ``tokenizer.ggml.model = llama``
  with pieces, scores and types;
* a byte-level BPE ``tokenizer.json`` (Llama 3, Qwen, the tiny test models):
  ``tokenizer.ggml.model = gpt2`` with tokens, merges and the pre-tokenizer name.

    add_tokenizer(writer, model_dir, vocab_size=config["vocab_size"], family="qwen3")

The pre-tokenizer name (``tokenizer.ggml.pre``) picks the split regex llama.cpp applies. Like
llama.cpp's converter, macft recognises a tokenizer by hashing the ids it gives for llama.cpp's
probe text. A tokenizer that is not in the table but is plain byte-level BPE with the GPT-2 split
(as the tiny test tokenizers are) gets ``gpt-2``, whose regex is the same; anything else is refused
rather than guessed, because a wrong name only shows up later as quietly different tokens.
"""

from __future__ import annotations

import json
import logging
from hashlib import sha256
from pathlib import Path

import gguf
from gguf import GGUFValueType

from macft.errors import MacftError
from macft.families import family_named

# llama.cpp's tokenizer probe text (convert_hf_to_gguf.py, get_vocab_base_pre): the table below holds
# sha256(str(ids)) for tokenizers whose pre-tokenizer llama.cpp implements.
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 "
    "\U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

KNOWN_PRE = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 - 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
}

# The split regexes (and whether whole pre-tokens found in the vocabulary skip the merges) of those
# pre-tokenizers, for tokenizers retrained on another corpus: their ids, hence their hash, change;
# the split llama.cpp must apply does not.
_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
_TAIL = "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
KNOWN_SPLITS = {
    (_CONTRACTIONS + "\\p{N}{1,3}" + _TAIL, True): "llama-bpe",
    (_CONTRACTIONS + "\\p{N}" + _TAIL, False): "qwen2",
    # Qwen3.5: combining marks stay with their letters
    ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+", False): "qwen35",
}


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, *, vocab_size: int, family: str) -> str:
    """Write the tokenizer keys for the HF tokenizer files in ``model_dir``; returns the GGUF model kind."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.model").is_file():
        _add_sentencepiece(writer, model_dir, vocab_size, family)
        return "llama"
    tokenizer_json = model_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise MacftError(f"{model_dir} has neither tokenizer.json nor tokenizer.model; GGUF export needs the tokenizer.")
    spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    if _is_byte_level(spec):
        _add_byte_level_bpe(writer, model_dir, spec, vocab_size)
        return "gpt2"
    try:
        vocab = gguf.LlamaHfVocab(model_dir)
    except (FileNotFoundError, TypeError):
        raise MacftError(f"The tokenizer in {model_dir} is neither byte-level BPE nor SentencePiece; GGUF export cannot describe it.") from None
    _write_sentencepiece(writer, [(t, s, int(k)) for t, s, k in vocab.all_tokens()], model_dir, vocab_size, family)
    return "llama"


def copy_from_gguf(writer: gguf.GGUFWriter, source: Path) -> None:
    """Copy every ``tokenizer.*`` key of ``source`` with the value type llama.cpp expects."""
    from macft.models.gguf_import.reader import read_gguf

    for key, value in read_gguf(source).metadata.items():
        if not key.startswith("tokenizer."):
            continue
        if key.endswith("_token_id"):
            writer.add_uint32(key, int(value))
        elif key == "tokenizer.ggml.scores":
            writer.add_token_scores([float(v) for v in value])
        elif key == "tokenizer.ggml.token_type":
            writer.add_token_types([int(v) for v in value])
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, GGUFValueType.get_type(value))


def pre_tokenizer_name(tokenizer, spec: dict) -> str:
    """llama.cpp's name for this byte-level BPE tokenizer's pre-tokenizer."""
    ids = tokenizer.encode(PROBE_TEXT, add_special_tokens=True).ids
    digest = sha256(str(ids).encode()).hexdigest()
    if digest in KNOWN_PRE:
        return KNOWN_PRE[digest]
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # the plain GPT-2 split: llama.cpp's "gpt-2" applies the same regex
    splits = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
    ignore_merges = bool(spec.get("model", {}).get("ignore_merges", False))
    if len(splits) == 1 and (splits[0], ignore_merges) in KNOWN_SPLITS:
        return KNOWN_SPLITS[(splits[0], ignore_merges)]  # a retrained vocabulary with a known model's split
    raise MacftError(
        f"llama.cpp does not know this tokenizer's pre-tokenizer (probe hash {digest[:12]}…); "
        "convert it with llama.cpp's convert_hf_to_gguf.py, which can be taught new tokenizers."
    )


def _is_byte_level(spec: dict) -> bool:
    def mentions_byte_level(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(mentions_byte_level(v) for v in node.values())
        if isinstance(node, list):
            return any(mentions_byte_level(v) for v in node)
        return False

    return spec.get("model", {}).get("type") == "BPE" and mentions_byte_level(spec.get("pre_tokenizer"))


def _add_byte_level_bpe(writer: gguf.GGUFWriter, model_dir: Path, spec: dict, vocab_size: int) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    by_id = {i: token for token, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    if by_id and max(by_id) >= vocab_size:
        raise MacftError(f"The tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings.")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    _add_special(writer, model_dir, vocab_size, merges=True, family=None)


def _add_sentencepiece(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, family: str) -> None:
    vocab = gguf.SentencePieceVocab(model_dir)
    entries = [(t, s, int(k)) for t, s, k in vocab.all_tokens()]
    for token_id, (content, special) in _added_tokens(model_dir).items():
        # Turn markers such as <start_of_turn> must be whole tokens to llama.cpp, not spelled out.
        if token_id < len(entries):
            kind = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
            entries[token_id] = (content.encode("utf-8"), -1000.0, int(kind))
    _write_sentencepiece(writer, entries, model_dir, vocab_size, family)


def _write_sentencepiece(writer: gguf.GGUFWriter, entries: list, model_dir: Path, vocab_size: int, family: str) -> None:
    """The keys of a SentencePiece (``llama``) vocabulary from (token, score, type) entries."""
    tokens, scores, types = _pad(entries, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    _add_special(writer, model_dir, vocab_size, merges=False, family=family)


def _added_tokens(model_dir: Path) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) for the tokens HF added on top of the SentencePiece model."""
    added: dict[int, tuple[str, bool]] = {}
    for name, key in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        try:
            found = json.loads((model_dir / name).read_text(encoding="utf-8")).get(key) or {}
        except (OSError, ValueError):
            continue
        items = found.items() if isinstance(found, dict) else ((t.get("id"), t) for t in found)
        for token_id, token in items:
            added[int(token_id)] = (token["content"], bool(token.get("special")))
    return added


def _pad(entries: list[tuple[bytes, float, int]], vocab_size: int):
    if len(entries) > vocab_size:
        raise MacftError(f"The tokenizer has {len(entries)} tokens but the model only {vocab_size} embeddings.")
    entries = entries + [(f"[PAD{i}]".encode(), -1000.0, int(gguf.TokenType.UNUSED)) for i in range(len(entries), vocab_size)]
    return [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries]


def _add_special(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, *, merges: bool, family: str | None) -> None:
    """Special ids, add_bos/add_eos (tokenizer_config or the post-processor) and the chat template."""
    vocab_log = logging.getLogger("gguf.vocab")
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)  # its guesses about unusual post-processors are not the user's problem
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=merges, n_vocab=vocab_size)
    finally:
        vocab_log.setLevel(level)
    if merges and not special.merges:
        raise MacftError(f"The BPE tokenizer in {model_dir} has no merges; llama.cpp cannot load it without them.")
    special.add_to_gguf(writer, quiet=True)
    if family is not None and (space_prefix := family_named(family).add_space_prefix) is not None:
        writer.add_add_space_prefix(space_prefix)
