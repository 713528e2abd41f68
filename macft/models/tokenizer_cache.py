"""A model's tokenizer, built by mlx-lm once per tokenizer and read back from macft's cache after.

mlx-lm's ``load_tokenizer`` parses a 262k-word ``tokenizer.json`` three times (its own decoder check,
transformers' added-token scan, the Rust tokenizer) and walks the vocabulary three more times; that
is most of a run's start-up on a small model. The finished ``TokenizerWrapper`` is stored in
``<macft home>/tokenizers/`` under a key made of the tokenizer files' contents, the EOS ids asked for,
and the versions of the libraries whose objects it holds; a changed file or upgraded library makes a
new key, and a cache that cannot be read is rebuilt. The folder keeps the most recently used
tokenizers within ``CACHE_BYTES``; older ones are deleted when a new one is written.

An entry is data, not code: a ``.npz`` (read without pickle) holding the Rust tokenizer's own JSON,
the detokenizer's byte table, and a JSON description of the Python objects around them
(``store_state``). Reading it back creates only objects of the classes mlx-lm and transformers build
tokenizers from, and sets their attributes; functions are named, and taken only from mlx-lm's tool
parsers and chat templates. A file planted in the folder can at worst be refused and rebuilt.

``LazyTokenizer`` defers even that: a training run whose tokenized data is cached
(``macft.data.token_cache``) needs no tokenizer before its first step, so it loads one only when
something asks for it; its ``key`` names what the tokenizer encodes to without loading it.

    tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
    lazy = LazyTokenizer(model_dir, config.get("eos_token_id")); lazy.key; lazy.get()
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from macft.errors import DiskFullError, MacftError
from macft.paths import cache_dir, mark_used, prune_cache, read_arrays, write_arrays

# Everything mlx-lm's load_tokenizer reads from a local model folder (tokenizer_config.json names the
# chat template; config.json is read for the model type's tokenizer defaults).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json", "config.json", "generation_config.json",
                   "vocab.json", "merges.txt")
LIBRARIES = ("macft", "mlx-lm", "transformers", "tokenizers")
CACHE_BYTES = 1 << 30  # 1 GiB of tokenizers (Gemma 3's 262k-word one takes about 18 MB)


def cache_key(model_dir: Path, eos_token_ids: Any) -> str:
    """sha256 over the tokenizer files' names and contents, the EOS ids and the library versions."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())
            digest.update(path.read_bytes())
    extra = sorted(str(p.relative_to(model_dir)) for p in model_dir.glob("*.jinja"))
    digest.update(json.dumps({"eos": eos_token_ids, "jinja": extra, "python": sys.version, "versions": library_versions()}).encode())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "?"
    return found


def load_tokenizer(model_dir: str | Path, eos_token_ids: Any = None, key: str | None = None):
    """mlx-lm's ``TokenizerWrapper`` for a local model folder, from the cache when it has this one
    (``key``: its ``cache_key``, when the caller already has it)."""
    model_dir = Path(model_dir)
    cached = cache_dir("tokenizers") / f"{key or cache_key(model_dir, eos_token_ids)}.npz"
    try:
        tokenizer = load_state(read_arrays(cached))
        mark_used(cached)
        return tokenizer
    except FileNotFoundError:
        pass
    except Exception:  # noqa: BLE001  (a damaged, stale or foreign entry of our own cache is rebuilt below)
        cached.unlink(missing_ok=True)
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    tokenizer = mlx_lm_load_tokenizer(model_dir, eos_token_ids=eos_token_ids)
    try:
        write_arrays(cached, store_state(tokenizer))
        prune_cache(cached.parent, CACHE_BYTES, keep=cached)
    except (OSError, DiskFullError, Unstorable):
        pass  # a tokenizer holding what the format cannot say, or a full or read-only cache, loads the slow way next time
    return tokenizer


# ---------------------------------------------------------------------------- the stored form

# The only classes a stored tokenizer may hold, besides the Rust tokenizer and its AddedToken: mlx-lm's
# wrapper and detokenizers, and tokenizer classes of transformers (or mlx-lm's own subclasses of them).
_MODULES = ("mlx_lm.tokenizer_utils", "transformers.")
# mlx-lm names these by model type: a tokenizer may hold their functions
_FUNCTION_MODULES = ("mlx_lm.tool_parsers.", "mlx_lm.chat_templates.")
_DEPTH = 64
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


class Unstorable(Exception):
    """The tokenizer holds something the stored form cannot say."""


def _allowed_class(cls: Any) -> bool:
    from mlx_lm.tokenizer_utils import StreamingDetokenizer, TokenizerWrapper
    from transformers import PreTrainedTokenizerBase
    from transformers.tokenization_utils_base import AddedToken

    module = getattr(cls, "__module__", "")
    return (
        isinstance(cls, type)
        and module.startswith(_MODULES)
        and (cls is TokenizerWrapper or cls is AddedToken or issubclass(cls, (StreamingDetokenizer, PreTrainedTokenizerBase)))
    )


def store_state(tokenizer: Any) -> dict:
    """``tokenizer`` as arrays for ``write_arrays``: "state" (JSON describing every object) and
    "blob<i>" / "lengths<i>" (the large parts: the Rust tokenizer's JSON, byte tables)."""
    import numpy as np
    import tokenizers

    blobs: dict[str, np.ndarray] = {}
    seen: dict[int, int] = {}  # id(object) -> its number, so shared objects stay shared

    def blob(data: bytes, lengths: list[int] | None = None) -> int:
        index = len(blobs) // 2
        blobs[f"blob{index}"] = np.frombuffer(data, np.uint8)
        blobs[f"lengths{index}"] = np.array(lengths or [], np.int64)
        return index

    def encode(value: Any, depth: int = 0) -> Any:
        if depth > _DEPTH:
            raise Unstorable("nested too deeply")
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, bytes):
            return {"bytes": blob(value)}
        if isinstance(value, (list, tuple, set, frozenset)):
            items = list(value)
            if items and isinstance(value, list) and all(isinstance(item, bytes) for item in items):
                return {"bytes_list": blob(b"".join(items), [len(item) for item in items])}
            kind = {list: "list", tuple: "tuple", set: "set", frozenset: "set"}.get(type(value))
            if kind is None:
                raise Unstorable(type(value).__name__)
            return {kind: [encode(item, depth + 1) for item in items]}
        if type(value) is dict:
            return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
        if isinstance(value, tokenizers.Tokenizer):
            return {"rust_tokenizer": blob(value.to_str().encode())}
        if isinstance(value, tokenizers.AddedToken):
            return {"added_token": value.__getstate__()}
        if inspect.isfunction(value) and value.__module__.startswith(_FUNCTION_MODULES):
            return {"function": f"{value.__module__}:{value.__qualname__}"}
        if _allowed_class(type(value)):
            if id(value) in seen:
                return {"ref": seen[id(value)]}
            seen[id(value)] = len(seen)
            cls = type(value)
            return {"object": [f"{cls.__module__}:{cls.__qualname__}", encode(vars(value), depth + 1)]}
        raise Unstorable(type(value).__name__)

    state = json.dumps(encode(tokenizer))
    return {"state": np.frombuffer(state.encode(), np.uint8), **blobs}


def load_state(arrays: dict) -> Any:
    """The tokenizer ``store_state`` stored; ``ValueError`` for anything it would not have written."""
    import tokenizers

    objects: list[Any] = []

    def blob(index: int) -> bytes:
        return arrays[f"blob{int(index)}"].tobytes()

    def decode(value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError("not a stored tokenizer")
        (kind, payload), = value.items()
        if kind in ("list", "tuple", "set"):
            items = [decode(item) for item in payload]
            return {"list": list, "tuple": tuple, "set": set}[kind](items)
        if kind == "dict":
            return {decode(k): decode(v) for k, v in payload}
        if kind == "bytes":
            return blob(payload)
        if kind == "bytes_list":
            data, ends = blob(payload), arrays[f"lengths{int(payload)}"].cumsum().tolist()
            return [data[a:b] for a, b in zip([0, *ends[:-1]], ends)]
        if kind == "rust_tokenizer":
            return tokenizers.Tokenizer.from_str(blob(payload).decode())
        if kind == "added_token":  # the Rust class checks its fields' types
            return tokenizers.AddedToken(**{k: v for k, v in payload.items() if k in _ADDED_TOKEN_FIELDS})
        if kind == "function":
            module, _, name = str(payload).partition(":")
            fn = getattr(importlib.import_module(module), name, None) if module.startswith(_FUNCTION_MODULES) else None
            if not inspect.isfunction(fn):
                raise ValueError(f"function {payload} is not one a tokenizer holds")
            return fn
        if kind == "ref":
            return objects[int(payload)]
        if kind == "object":
            name, attributes = payload
            module, _, qualname = str(name).partition(":")
            cls = getattr(importlib.import_module(module), qualname, None) if module.startswith(_MODULES) and qualname.isidentifier() else None
            if not _allowed_class(cls):
                raise ValueError(f"class {name} is not one a tokenizer is built from")
            obj = cls.__new__(cls)
            objects.append(obj)
            fields = decode(attributes)
            if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
                raise ValueError("malformed attributes")
            vars(obj).update(fields)
            return obj
        raise ValueError(f"unknown kind {kind!r}")

    return decode(json.loads(arrays["state"].tobytes()))


class LazyTokenizer:
    """A model folder's tokenizer, loaded by the first ``get()``. ``as_given``: the folder is a GGUF
    import, whose tokenizer reads text as llama.cpp does (``read_bytes_as_given``). ``key`` is a
    sha256 that changes whenever the tokens this tokenizer produces could: its ``cache_key`` (files,
    EOS ids, library versions) and ``as_given``."""

    def __init__(self, model_dir: str | Path, eos_token_ids: Any = None, *, as_given: bool = False):
        self.model_dir, self.eos_token_ids, self.as_given = Path(model_dir), eos_token_ids, as_given
        self.files_key = cache_key(self.model_dir, eos_token_ids)
        self.key = hashlib.sha256(f"{self.files_key}\0as_given={as_given}".encode()).hexdigest()
        self._tokenizer = None

    def get(self):
        if self._tokenizer is None:
            # Files changed since ``key`` was taken would make the key name another tokenizer's tokens.
            if cache_key(self.model_dir, self.eos_token_ids) != self.files_key:
                raise MacftError(f"The tokenizer files in {self.model_dir} changed while macft was running; run the command again.")
            tokenizer = load_tokenizer(self.model_dir, self.eos_token_ids, key=self.files_key)
            if self.as_given:
                from macft.models.gguf_import.tokenizer import read_bytes_as_given

                read_bytes_as_given(tokenizer)
            self._tokenizer = tokenizer
        return self._tokenizer


def eager(tokenizer: Any) -> Any:
    """The tokenizer itself, whether given as a ``LazyTokenizer`` (loaded now) or already loaded."""
    return tokenizer.get() if isinstance(tokenizer, LazyTokenizer) else tokenizer
