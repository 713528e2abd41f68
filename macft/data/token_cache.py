"""Tokenized data files, kept so that a rerun on the same data needs no tokenizer before training.

Loading a 262k-word tokenizer is a large part of a small model's start-up, and tokenizing is the
only thing a run needs it for before its first step. ``cached_examples`` keeps each data file's
encoded examples (at full length: truncation and hold-out run every time, they are cheap) in
``<macft home>/tokenized/``, named by a sha256 of everything the tokens depend on:

- the file's contents and name (each example's ``source`` is "name:line"),
- the tokenizer (``LazyTokenizer.key``: its files, EOS ids, library versions, GGUF-import reading),
- the encoding options (data.use_chat_template, data.mask_prompt),
- the source of macft's code that reads records and turns them into tokens, and jinja2's version
  (chat templates render with it).

Any change gives a new name, so an entry is never stale; entries are written atomically, and one
that cannot be read is encoded again. An entry is a plain ``.npz`` of token ids, masks, lengths and
a JSON list of sources and formats, read without pickle: a file planted in the folder cannot run
code, only be encoded again. The folder keeps the most recently used entries within ``CACHE_BYTES``;
older ones are deleted when a new one is written.

    examples = cached_examples(path, lazy_tokenizer.key, {"mask_prompt": True}, encode)
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import numpy as np

from macft.data.templates import Example
from macft.errors import DiskFullError
from macft.paths import cache_dir, mark_used, prune_cache, read_arrays, write_arrays

PACKAGE = Path(__file__).resolve().parent.parent
CACHE_BYTES = 1 << 30  # 1 GiB of tokenized files (a 1,000-example file takes about 0.5 MB)
# macft's code between a data file and its tokens (besides the tokenizer, which its key covers).
ENCODING_CODE = ("data/formats.py", "data/templates.py", "models/chat_template.py", "models/tokenizer_cache.py",
                 "models/gguf_import/tokenizer.py", "data/token_cache.py")


def code_digest() -> str:
    digest = hashlib.sha256()
    for name in ENCODING_CODE:
        digest.update(f"{name}\0".encode())
        digest.update((PACKAGE / name).read_bytes())
    try:
        digest.update(f"jinja2 {version('jinja2')}".encode())
    except PackageNotFoundError:
        digest.update(b"jinja2 ?")
    return digest.hexdigest()


def entry_key(path: Path, tokenizer_key: str, options: dict) -> str:
    """sha256 over the file's name and contents, the tokenizer's key, the options and the encoding code."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"name": path.name, "tokenizer": tokenizer_key, "options": options, "code": code_digest()}, sort_keys=True).encode())
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_examples(path: Path, tokenizer_key: str, options: dict, encode: Callable[[Path], list[Example]]) -> list[Example]:
    """``encode(path)``'s examples, read from the cache when it holds this file encoded by this
    tokenizer with these ``options`` (JSON-able: whatever else changes the tokens), else encoded and stored."""
    path = Path(path)
    key = entry_key(path, tokenizer_key, options)
    entry = cache_dir("tokenized") / f"{key}.npz"
    try:
        examples = stored_examples(read_arrays(entry))
        mark_used(entry)
        return examples
    except FileNotFoundError:
        pass
    except Exception:  # noqa: BLE001  (a damaged or foreign entry of our own cache is encoded again below)
        entry.unlink(missing_ok=True)
    examples = encode(path)
    # Stored only if the file did not change while it was being read, so the name matches the tokens.
    if entry_key(path, tokenizer_key, options) == key:
        try:
            write_arrays(entry, example_arrays(examples))
            prune_cache(entry.parent, CACHE_BYTES, keep=entry)
        except (OSError, DiskFullError):
            pass  # a full or read-only cache: the next run tokenizes again
    return examples


def example_arrays(examples: list[Example]) -> dict[str, np.ndarray]:
    """Examples as flat arrays: every example's tokens and mask one after the other, their lengths,
    and their sources and formats as JSON text."""
    labels = json.dumps({"sources": [e.source for e in examples], "formats": [e.format for e in examples]})
    return {
        "tokens": np.array([t for e in examples for t in e.tokens], np.int32),
        "mask": np.array([m for e in examples for m in e.mask], np.bool_),
        "lengths": np.array([len(e.tokens) for e in examples], np.int64),
        "labels": np.frombuffer(labels.encode(), np.uint8),
    }


def stored_examples(arrays: dict[str, np.ndarray]) -> list[Example]:
    """``example_arrays`` read back; ``ValueError`` for arrays that do not fit together."""
    tokens, mask, lengths = arrays["tokens"], arrays["mask"], arrays["lengths"]
    labels = json.loads(arrays["labels"].tobytes())
    sources, formats = labels["sources"], labels["formats"]
    if not (tokens.dtype == np.int32 and mask.dtype == np.bool_ and lengths.dtype == np.int64):
        raise ValueError("unexpected array types")
    if len(tokens) != len(mask) or int(lengths.sum()) != len(tokens) or not len(lengths) == len(sources) == len(formats) or (lengths < 0).any():
        raise ValueError("arrays of different lengths")
    token_list, mask_list, ends = tokens.tolist(), mask.tolist(), np.cumsum(lengths).tolist()
    starts = [0, *ends[:-1]]
    return [
        Example(token_list[a:b], mask_list[a:b], str(source), str(fmt))
        for a, b, source, fmt in zip(starts, ends, sources, formats)
    ]
