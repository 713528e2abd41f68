"""A model's tokenizer, built by mlx-lm once per tokenizer and read back from macft's cache after.

mlx-lm's ``load_tokenizer`` parses a 262k-word ``tokenizer.json`` three times (its own decoder check,
transformers' added-token scan, the Rust tokenizer) and walks the vocabulary three more times; that
is most of a run's start-up on a small model. The finished ``TokenizerWrapper`` is pickled into
``<macft home>/tokenizers/`` under a key made of the tokenizer files' contents, the EOS ids asked for,
and the versions of the libraries whose objects the pickle holds; a changed file or upgraded library
makes a new key, and a cache that cannot be read is rebuilt. The folder keeps the most recently used
tokenizers within ``CACHE_BYTES``; older ones are deleted when a new one is written.

``LazyTokenizer`` defers even that: a training run whose tokenized data is cached
(``macft.data.token_cache``) needs no tokenizer before its first step, so it loads one only when
something asks for it; its ``key`` names what the tokenizer encodes to without loading it.

    tokenizer = load_tokenizer(model_dir, eos_token_ids=config.get("eos_token_id"))
    lazy = LazyTokenizer(model_dir, config.get("eos_token_id")); lazy.key; lazy.get()
"""

from __future__ import annotations

import hashlib
import json
import pickle
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from macft.errors import DiskFullError, MacftError
from macft.paths import atomic_path, cache_dir, mark_used, prune_cache

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
    cached = cache_dir("tokenizers") / f"{key or cache_key(model_dir, eos_token_ids)}.pickle"
    try:
        with cached.open("rb") as fh:
            tokenizer = pickle.load(fh)
        mark_used(cached)
        return tokenizer
    except FileNotFoundError:
        pass
    except Exception:  # noqa: BLE001  (a damaged or stale entry of our own cache is rebuilt below)
        cached.unlink(missing_ok=True)
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    tokenizer = mlx_lm_load_tokenizer(model_dir, eos_token_ids=eos_token_ids)
    try:
        with atomic_path(cached) as tmp:
            tmp.write_bytes(pickle.dumps(tokenizer, protocol=pickle.HIGHEST_PROTOCOL))
        prune_cache(cached.parent, CACHE_BYTES, keep=cached)
    except (OSError, DiskFullError, pickle.PicklingError, TypeError, AttributeError):
        pass  # a tokenizer that cannot be pickled, or a full or read-only cache, loads the slow way next time
    return tokenizer


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
