"""Preference pairs, the data shape of DPO, ORPO and SimPO: a prompt with a chosen and a rejected answer.

    {"prompt": "2+2?", "chosen": " 4", "rejected": " 5"}                                   # strings
    {"system": "...", "prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "..."}], "rejected": [...]}               # messages

A pair becomes two ordinary records (prompt + chosen, prompt + rejected) that the supervised
``Encoder`` tokenizes, so templates and prompt masking are exactly those of instruction tuning. A
pair batch is an ordinary ``macft.data.Batch`` of 2B rows with ``pairs`` set: the B chosen answers,
then the same pairs' rejected answers, so one forward pass scores both (lanes and ranks split it by
whole pairs). Pairs are planned by their longer answer. Bad lines raise the same one-line errors
as supervised data (``train.jsonl line 7: <problem>; <what to do>``).

    pairs = read_records(path, parse_pair)
    example = encode_pair(encoder, pairs[0])          # PairExample(chosen, rejected)
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from macft.data.batching import build_batch
from macft.data.check import length_stats
from macft.data.formats import LineError, Record, _chat, _string, json_object, read_records
from macft.data.shapes import DataShape, ShapeReport, Splits, item_batches
from macft.data.splits import SPLITS, DataConfig, data_files, hold_out, truncate
from macft.data.templates import Encoder, Example
from macft.errors import MacftError
from macft.models.tokenizer_cache import eager

PAIR_SHAPE = '{"prompt", "chosen", "rejected"} (each a string or a list of messages, optional "system")'


@dataclass(frozen=True)
class PairRecord:
    """One preference line as two records that share their prompt."""

    source: str
    chosen: Record
    rejected: Record


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    source: str = ""

    @property
    def identical(self) -> bool:
        return self.chosen.tokens == self.rejected.tokens


# ---------------------------------------------------------------------------- lines (shared with the other shapes)


def turns(obj: dict, key: str, role: str, shape: str) -> list[dict] | str:
    """A field given as a string or as a list of messages."""
    if key not in obj:
        present = ", ".join(sorted(obj)) or "none"
        raise LineError(f"missing '{key}' (fields present: {present}); each line must be {shape}")
    value = obj[key]
    if isinstance(value, list):
        if not value:
            raise LineError(f"'{key}' is an empty list; give at least one {role} message")
        return value
    if role == "assistant":
        return _string(obj, key)
    return _string(obj, key, allow_empty=True)


def system_turn(obj: dict) -> list[dict]:
    if obj.get("system") is None:
        return []
    return [{"role": "system", "content": _string(obj, "system")}]


def as_messages(value: list[dict] | str, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def answer_record(obj: dict, prompt: list[dict] | str, answer: list[dict] | str, source: str, fmt: str, key: str) -> Record:
    """The record of ``prompt`` answered by ``answer`` (the line's ``key`` field): a plain
    prompt/completion when every part is a string and there is no system turn, else a conversation."""
    system = system_turn(obj)
    if isinstance(prompt, str) and isinstance(answer, str) and not system:
        return Record("completion", fmt, source, prompt=prompt, completion=answer)
    if isinstance(answer, list) and any(isinstance(m, dict) and m.get("role") != "assistant" for m in answer):
        raise LineError(f"'{key}' message lists may hold assistant messages only")
    messages = system + as_messages(prompt, "user") + as_messages(answer, "assistant")
    return replace(_chat({"messages": messages}, source), format=fmt)


def parse_pair(line: str, source: str) -> PairRecord:
    obj = json_object(line, PAIR_SHAPE)
    prompt = turns(obj, "prompt", "user", PAIR_SHAPE)
    chosen = turns(obj, "chosen", "assistant", PAIR_SHAPE)
    rejected = turns(obj, "rejected", "assistant", PAIR_SHAPE)
    return PairRecord(
        source,
        answer_record(obj, prompt, chosen, source, "preference", "chosen"),
        answer_record(obj, prompt, rejected, source, "preference", "rejected"),
    )


def encode_pair(encoder: Encoder, pair: PairRecord) -> PairExample:
    return PairExample(encoder.encode(pair.chosen), encoder.encode(pair.rejected), pair.source)


def longer(pair: PairExample) -> Example:
    """The pair's longer sequence: what its row width in a batch depends on."""
    return pair.chosen if len(pair.chosen.tokens) >= len(pair.rejected.tokens) else pair.rejected


# ---------------------------------------------------------------------------- splits and batches


def read_split_items(data_cfg: DataConfig, read: Any) -> Splits:
    """Every split's items (``read(path)``), validation held out from train when asked."""
    files = data_files(data_cfg)
    splits = Splits([], [], [], files={k: str(v) for k, v in files.items()})
    for name, path in files.items():
        setattr(splits, name, read(path))
    if "valid" not in files and data_cfg.split_valid > 0:
        splits.train, splits.valid = hold_out(splits.train, data_cfg.split_valid, data_cfg.split_seed)
        splits.files["valid"] = f"{data_cfg.split_valid:g} of train held out (seed {data_cfg.split_seed})"
    return splits


def truncate_pairs(pairs: list[PairExample], max_seq_length: int) -> tuple[list[PairExample], int, int]:
    """Cut both answers to ``max_seq_length`` tokens; drop a pair when either side has no trained
    token left. Returns (kept, pairs with a side cut, dropped)."""
    kept, cut, dropped = [], 0, 0
    for pair in pairs:
        chosen, cut_c, drop_c = truncate([pair.chosen], max_seq_length)
        rejected, cut_r, drop_r = truncate([pair.rejected], max_seq_length)
        cut += bool(cut_c or cut_r)
        if drop_c or drop_r:
            dropped += 1
            continue
        kept.append(dataclasses.replace(pair, chosen=chosen[0], rejected=rejected[0]))
    return kept, cut, dropped


def load(data_cfg: DataConfig, tokenizer: Any, settings: Any = None) -> Splits:
    """Read and tokenize every split's pairs, cut to ``data.max_seq_length``."""
    encoder = Encoder(eager(tokenizer), use_chat_template=data_cfg.use_chat_template, mask_prompt=True)
    splits = read_split_items(data_cfg, lambda path: [encode_pair(encoder, r) for r in read_records(path, parse_pair)])
    identical = []
    for name in SPLITS:
        kept, splits.truncated[name], splits.dropped[name] = truncate_pairs(getattr(splits, name), data_cfg.max_seq_length)
        # A pair whose two answers are the same holds no preference: a preference loss is constant on it
        # (DPO's ln 2) and has no gradient, so it is left out, and said.
        differing = [p for p in kept if not p.identical]
        if len(differing) < len(kept):
            identical.append(f"{len(kept) - len(differing)} of {len(kept)} {name}")
            if name == "train" and not differing:
                raise MacftError(
                    f"Every training pair ({len(kept)}) has the same chosen and rejected answer ({kept[0].source}), so there is no "
                    "preference to learn; fix the data (`macft data check` counts such pairs)."
                )
        setattr(splits, name, differing)
    if identical:
        splits.notes.append(f"Left out {' and '.join(identical)} pairs whose chosen and rejected answers are the same: they teach nothing.")
    if not splits.train:
        raise MacftError(f"No training pair fits within data.max_seq_length={data_cfg.max_seq_length}; raise it or shorten the data.")
    return splits


def build_pair_batch(items: list[PairExample], indices: list[int], max_seq_length: int, epoch: int = 0, index: int = 0):
    chosen = [items[i] for i in indices]
    flat = [p.chosen for p in chosen] + [p.rejected for p in chosen]
    batch = build_batch(flat, [[i] for i in range(len(flat))], max_seq_length, epoch=epoch, index=index)
    return dataclasses.replace(batch, pairs=True)


def batches(splits: Splits, data_cfg: DataConfig, *, batch_size: int, seed: int):
    return item_batches(splits, longer, build_pair_batch, data_cfg, batch_size, seed)


def demo_records(path: Path) -> list[Record]:
    """A held-out pair's prompt, expecting its chosen answer."""
    return [p.chosen for p in read_records(path, parse_pair) if p.chosen.kind == "completion"]


# ---------------------------------------------------------------------------- macft data check


@dataclass
class PairSplitReport:
    pairs: int
    source: str
    chosen_lengths: dict[str, float]  # min, mean, median, p95, max (tokens, prompt included)
    rejected_lengths: dict[str, float]
    truncated: int  # pairs with the chosen or rejected sequence cut at max_seq_length
    dropped: int  # pairs left with no trained token on a side
    identical: int  # chosen == rejected: such a pair teaches nothing
    duplicates: int


class PairReport(ShapeReport):

    def table(self) -> tuple[list[str], list[list[Any]], set[str]]:
        """(columns, one row per split, the columns whose non-zero counts deserve a look)."""
        columns = ["split", "pairs", "chosen tokens (mean/max)", "rejected tokens (mean/max)", "truncated", "dropped", "identical", "duplicates"]
        rows = [
            [name, s.pairs, f"{s.chosen_lengths['mean']:.1f}/{s.chosen_lengths['max']}",
             f"{s.rejected_lengths['mean']:.1f}/{s.rejected_lengths['max']}", s.truncated, s.dropped, s.identical, s.duplicates]
            for name, s in self.splits.items()
        ]
        return columns, rows, {"truncated", "dropped", "identical", "duplicates"}


def check(data_cfg: DataConfig, tokenizer: Any, settings: Any = None, batch_size: int = 4) -> PairReport:
    encoder = Encoder(tokenizer, use_chat_template=data_cfg.use_chat_template, mask_prompt=True)
    splits = {}
    for name, path in data_files(data_cfg).items():
        pairs = [encode_pair(encoder, r) for r in read_records(path, parse_pair)]
        _, truncated, dropped = truncate_pairs(pairs, data_cfg.max_seq_length)
        keys = Counter((tuple(p.chosen.tokens), tuple(p.rejected.tokens)) for p in pairs)
        splits[name] = PairSplitReport(
            pairs=len(pairs),
            source=str(path),
            chosen_lengths=length_stats([p.chosen for p in pairs]),
            rejected_lengths=length_stats([p.rejected for p in pairs]),
            truncated=truncated,
            dropped=dropped,
            identical=sum(p.identical for p in pairs),
            duplicates=len(pairs) - len(keys),
        )
    return PairReport("pairs", data_cfg.max_seq_length, splits)


PAIRS = DataShape(
    name="pairs",
    line=PAIR_SHAPE,
    recognises=lambda obj: "chosen" in obj or "rejected" in obj,
    load=load,
    batches=batches,
    check=check,
    demo_records=demo_records,
)
