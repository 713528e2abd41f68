"""Preference pairs (DPO/ORPO/SimPO) and prompt sets (GRPO): validated per line, tokenized as SFT is.

    {"prompt": "2+2?", "chosen": " 4", "rejected": " 5"}                                   # strings
    {"system": "...", "prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "..."}], "rejected": [...]}               # messages
    {"prompt": "What is 6*7?", "answer": "42"}                                              # a GRPO prompt

A pair becomes two ordinary records (prompt + chosen, prompt + rejected) that the SFT ``Encoder``
tokenizes, so templates and prompt masking are exactly those of instruction tuning. A GRPO prompt
keeps all its fields for the reward functions. Bad lines raise the same one-line errors as SFT data
(``train.jsonl line 7: <problem>; <what to do>``).

    pairs = read_records(path, parse_pair)
    example = encode_pair(encoder, pairs[0])          # PairExample(chosen, rejected)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from macft.data.formats import LineError, Record, _chat, _string, json_object
from macft.data.templates import Encoder, Example
from macft.errors import MacftError

PAIR_SHAPE = '{"prompt", "chosen", "rejected"} (each a string or a list of messages, optional "system")'
PROMPT_SHAPE = '{"prompt": "...", ...} (a string or a list of messages, optional "system"; other fields reach the rewards)'


@dataclass(frozen=True)
class PairRecord:
    """One preference line as two records that share their prompt."""

    source: str
    chosen: Record
    rejected: Record


@dataclass(frozen=True)
class PromptRecord:
    """One GRPO prompt: ``record`` renders the prompt (its completion is empty); ``fields`` is the
    whole JSON object, for the reward functions."""

    source: str
    record: Record
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    source: str = ""

    @property
    def identical(self) -> bool:
        return self.chosen.tokens == self.rejected.tokens


def _turns(obj: dict, key: str, role: str, shape: str) -> list[dict] | str:
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


def _system(obj: dict) -> list[dict]:
    if obj.get("system") is None:
        return []
    return [{"role": "system", "content": _string(obj, "system")}]


def _as_messages(value: list[dict] | str, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _conversation(prefix: list[dict], answer: list[dict] | str, source: str) -> Record:
    messages = prefix + _as_messages(answer, "assistant")
    if isinstance(answer, list) and any(isinstance(m, dict) and m.get("role") != "assistant" for m in answer):
        raise LineError("'chosen' and 'rejected' message lists may hold assistant messages only")
    return replace(_chat({"messages": messages}, source), format="preference")


def parse_pair(line: str, source: str) -> PairRecord:
    obj = json_object(line, PAIR_SHAPE)
    prompt = _turns(obj, "prompt", "user", PAIR_SHAPE)
    chosen = _turns(obj, "chosen", "assistant", PAIR_SHAPE)
    rejected = _turns(obj, "rejected", "assistant", PAIR_SHAPE)
    system = _system(obj)
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str) and not system:
        def completion(answer: str) -> Record:
            return Record("completion", "preference", source, prompt=prompt, completion=answer)

        return PairRecord(source, completion(chosen), completion(rejected))
    prefix = system + _as_messages(prompt, "user")
    return PairRecord(source, _conversation(prefix, chosen, source), _conversation(prefix, rejected, source))


def parse_prompt(line: str, source: str) -> PromptRecord:
    obj = json_object(line, PROMPT_SHAPE)
    prompt = _turns(obj, "prompt", "user", PROMPT_SHAPE)
    if isinstance(prompt, str) and not prompt.strip():
        raise LineError("'prompt' is empty; remove the line or fill it in")
    system = _system(obj)
    if isinstance(prompt, str) and not system:
        record = Record("completion", "prompt", source, prompt=prompt)
    else:
        # A placeholder assistant turn makes the record a valid conversation; only the turns
        # before it are rendered (with the generation prompt).
        messages = system + _as_messages(prompt, "user") + [{"role": "assistant", "content": "…"}]
        record = replace(_chat({"messages": messages}, source), format="prompt")
    return PromptRecord(source, record, obj)


def encode_pair(encoder: Encoder, pair: PairRecord) -> PairExample:
    return PairExample(encoder.encode(pair.chosen), encoder.encode(pair.rejected), pair.source)


def drop_identical(pairs: list[PairExample], split: str, objective: str) -> tuple[list[PairExample], int]:
    """The pairs to train on, and how many have the same chosen and rejected answer. Such a pair gives
    a preference loss a constant value (DPO's ln 2) and no gradient, so it is left out, except for
    ORPO, whose language-model term still learns the chosen answer from it."""
    kept = [p for p in pairs if not p.identical]
    if objective != "orpo" and pairs and not kept and split == "train":
        raise MacftError(
            f"Every training pair ({len(pairs)}) has the same chosen and rejected answer ({pairs[0].source}), so there is no "
            "preference to learn; fix the data (`macft data check` counts such pairs)."
        )
    return (pairs if objective == "orpo" else kept), len(pairs) - len(kept)


def identical_pairs_note(identical: dict[str, int], total: dict[str, int], objective: str) -> str | None:
    """What training says about the pairs ``drop_identical`` counted, per split."""
    parts = [f"{count} of {total[name]} {name}" for name, count in identical.items() if count]
    if not parts:
        return None
    if objective == "orpo":
        return f"{' and '.join(parts)} pairs have the same chosen and rejected answer: ORPO learns only the answer from them, no preference."
    return f"Left out {' and '.join(parts)} pairs whose chosen and rejected answers are the same: they teach nothing (constant loss, no gradient)."


def longer(pair: PairExample) -> Example:
    """The pair's longer sequence: what its row width in a batch depends on."""
    return pair.chosen if len(pair.chosen.tokens) >= len(pair.rejected.tokens) else pair.rejected


def dataset_kind(path) -> str:
    """"pairs", "prompts" or "sft", judged by the first line that is a JSON object."""
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return "sft"  # the SFT reader reports the line
            if not isinstance(obj, dict):
                return "sft"
            if "chosen" in obj or "rejected" in obj:
                return "pairs"
            if "prompt" in obj and not {"completion", "messages", "conversations", "text"} & set(obj):
                return "prompts"
            return "sft"
    return "sft"
