"""Find the train/valid/test files of a ``DataConfig``, tokenize them, and hold out validation data.

``data.train`` is a .jsonl file or a folder with ``train.jsonl`` and optionally ``valid.jsonl`` and
``test.jsonl``; ``data.valid``/``data.test`` may name files. Without validation data,
``data.split_valid`` > 0 holds out that fraction of train, chosen by ``data.split_seed``.
Examples longer than ``data.max_seq_length`` tokens keep their start; any left with no trained
token are dropped (both are counted).

    splits = load_splits(recipe.data, loaded.tokenizer)       # or loaded.lazy_tokenizer: cached tokens
    splits.train[0].tokens, splits.truncated["train"]
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from macft.data.formats import read_records
from macft.data.shapes import Splits
from macft.data.templates import Encoder, Example
from macft.data.token_cache import cached_examples
from macft.errors import MacftError
from macft.models.tokenizer_cache import LazyTokenizer

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class DataConfig:
    """The recipe's ``data`` section."""

    train: str | None = None  # a .jsonl file, or a folder with train.jsonl [valid.jsonl test.jsonl]
    valid: str | None = None
    test: str | None = None
    split_valid: float = 0.0  # hold out this fraction of train as validation when none is given
    split_seed: int = 0
    max_seq_length: int = 512
    mask_prompt: bool = True  # train on completions / assistant turns only
    use_chat_template: bool | None = None  # None: use it when the tokenizer has one
    packing: bool = False  # pack several examples per row (attention never crosses them)
    bucket_by_length: bool = True  # batch examples of similar length to save padding

    def problems(self) -> list[str]:
        """One line per invalid value."""
        checks = [
            (self.max_seq_length >= 8, "data.max_seq_length must be at least 8."),
            (0.0 <= self.split_valid < 1.0, "data.split_valid must be a fraction in [0, 1)."),
            (0 <= self.split_seed < 2**32, "data.split_seed must be between 0 and 4294967295."),
        ]
        return [message for ok, message in checks if not ok]


def data_files(data_cfg: DataConfig) -> dict[str, Path]:
    """The files each split reads; a folder contributes the standard names it holds."""
    if not data_cfg.train:
        raise MacftError("No training data: set data.train to a .jsonl file or a folder with train.jsonl.")
    root = Path(data_cfg.train).expanduser()
    files: dict[str, Path] = {}
    if root.is_dir():
        if not (root / "train.jsonl").is_file():
            raise MacftError(f"Folder {root} has no train.jsonl; put the training examples there.")
        files = {name: root / f"{name}.jsonl" for name in SPLITS if (root / f"{name}.jsonl").is_file()}
    elif root.is_file():
        files["train"] = root
    else:
        raise MacftError(f"Training data {root} does not exist; pass a .jsonl file or a folder with train.jsonl.")
    for name in ("valid", "test"):
        value = getattr(data_cfg, name)
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise MacftError(f"data.{name} file {path} does not exist.")
            files[name] = path
    return files


def data_fingerprint(data_cfg: DataConfig) -> str:
    """sha256 over the training and validation files a run reads, so a resume can tell they changed."""
    digest = hashlib.sha256()
    for name, path in sorted(data_files(data_cfg).items()):
        if name == "test":  # only the demo reads it
            continue
        digest.update(f"{name}\0".encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_splits(data_cfg: DataConfig, tokenizer: Any) -> tuple[dict[str, list[Example]], dict[str, str]]:
    """Tokenize every split at full length, holding out validation data if asked; also return
    where each split came from. With a ``LazyTokenizer``, each file's examples come from macft's
    cache of tokenized files when it has them, and the tokenizer loads only for a file it has not."""
    options = {"use_chat_template": data_cfg.use_chat_template, "mask_prompt": data_cfg.mask_prompt}
    lazy = isinstance(tokenizer, LazyTokenizer)

    @functools.cache
    def encoder() -> Encoder:
        return Encoder(tokenizer.get() if lazy else tokenizer, **options)

    def encode(path: Path) -> list[Example]:
        return [encoder().encode(record) for record in read_records(path)]

    files = data_files(data_cfg)
    examples = {name: [] for name in SPLITS}
    for name, path in files.items():
        examples[name] = cached_examples(path, tokenizer.key, options, encode) if lazy else encode(path)
    sources = {name: str(path) for name, path in files.items()}
    if "valid" not in files and data_cfg.split_valid > 0:
        examples["train"], examples["valid"] = hold_out(examples["train"], data_cfg.split_valid, data_cfg.split_seed)
        sources["valid"] = f"{data_cfg.split_valid:g} of train held out (seed {data_cfg.split_seed})"
    return examples, sources


def hold_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split off ``fraction`` of the examples (at least one, never all), keeping file order in both parts."""
    if len(examples) < 2:
        raise MacftError("data.split_valid needs at least 2 training examples; add data or a validation file.")
    count = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    chosen = set(np.random.default_rng(seed).permutation(len(examples))[:count].tolist())
    train = [e for i, e in enumerate(examples) if i not in chosen]
    valid = [e for i, e in enumerate(examples) if i in chosen]
    return train, valid


def overlap_count(train: list[Example], other: list[Example]) -> int:
    """Examples of ``other`` whose tokens are exactly those of some training example."""
    seen = {tuple(e.tokens) for e in train}
    return sum(tuple(e.tokens) in seen for e in other)


def truncate(examples: list[Example], max_seq_length: int) -> tuple[list[Example], int, int]:
    """Cut examples to ``max_seq_length`` tokens (keeping the start); drop those left with no
    trained token. Returns (kept, truncated count, dropped count)."""
    kept, truncated, dropped = [], 0, 0
    for example in examples:
        if len(example.tokens) > max_seq_length:
            truncated += 1
            example = dataclasses.replace(
                example, tokens=example.tokens[:max_seq_length], mask=example.mask[:max_seq_length]
            )
        if example.num_trained == 0:
            dropped += 1
            continue
        kept.append(example)
    return kept, truncated, dropped


def load_splits(data_cfg: DataConfig, tokenizer: Any) -> Splits:
    """Read, validate, tokenize, split and truncate the dataset of a recipe."""
    examples, sources = read_splits(data_cfg, tokenizer)
    splits = Splits(train=[], valid=[], test=[], files=sources)
    for name in SPLITS:
        kept, splits.truncated[name], splits.dropped[name] = truncate(examples[name], data_cfg.max_seq_length)
        setattr(splits, name, kept)
    if not splits.train:
        raise MacftError(
            f"No training example has a trained token within data.max_seq_length={data_cfg.max_seq_length}; "
            "raise it or shorten the prompts."
        )
    return splits
