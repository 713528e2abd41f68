"""Prompt sets, the data shape of GRPO: prompts whose answers the model samples and rewards score.

    {"prompt": "What is 6*7?", "answer": "42"}         # any other field reaches the reward functions

A prompt is rendered as generation starts from it (through the chat template with the assistant
turn opened, or as the plain prompt); the whole JSON object is kept for the rewards. A batch is a
``PromptBatch`` of prompts: the objective samples the answers itself.

    prompts = read_records(path, parse_prompt)
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from macft.models.chat_template import template_tokens
from macft.data.check import length_stats
from macft.data.formats import LineError, Record, _chat, json_object, read_records
from macft.data.pairs import as_messages, read_split_items, system_turn, turns
from macft.data.shapes import DataShape, ShapeReport, Splits, item_batches
from macft.data.splits import SPLITS, DataConfig, data_files
from macft.data.templates import Example, uses_chat_template
from macft.errors import MacftError
from macft.models.tokenizer_cache import eager

PROMPT_SHAPE = '{"prompt": "...", ...} (a string or a list of messages, optional "system"; other fields reach the rewards)'


@dataclass(frozen=True)
class PromptRecord:
    """One GRPO prompt: ``record`` renders the prompt (its completion is empty); ``fields`` is the
    whole JSON object, for the reward functions."""

    source: str
    record: Record
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptExample:
    tokens: list[int]  # the prompt, rendered as generation starts from it
    fields: dict  # the line's JSON object, for the rewards
    source: str = ""


@dataclass
class PromptBatch:
    prompts: list[PromptExample]
    epoch: int = 0
    index: int = 0


def parse_prompt(line: str, source: str) -> PromptRecord:
    obj = json_object(line, PROMPT_SHAPE)
    prompt = turns(obj, "prompt", "user", PROMPT_SHAPE)
    if isinstance(prompt, str) and not prompt.strip():
        raise LineError("'prompt' is empty; remove the line or fill it in")
    system = system_turn(obj)
    if isinstance(prompt, str) and not system:
        record = Record("completion", "prompt", source, prompt=prompt)
    else:
        # A placeholder assistant turn makes the record a valid conversation; only the turns
        # before it are rendered (with the generation prompt).
        messages = system + as_messages(prompt, "user") + [{"role": "assistant", "content": "…"}]
        record = replace(_chat({"messages": messages}, source), format="prompt")
    return PromptRecord(source, record, obj)


def prompt_tokens(tokenizer: Any, record: Record, use_chat_template: bool | None) -> list[int]:
    """A prompt as generation starts from it: through the chat template with the assistant turn
    opened, or the plain prompt (as the supervised encoder renders a prompt/completion record)."""
    if uses_chat_template(tokenizer, use_chat_template):
        return template_tokens(tokenizer, record.as_messages()[:-1], add_generation_prompt=True, where=record.source)
    return list(tokenizer.encode(record.prompt + record.prompt_suffix))


def load(data_cfg: DataConfig, tokenizer: Any, settings: Any) -> Splits:
    """Read and render every split's prompts; a prompt with no room left for
    ``align.max_completion_tokens`` within ``data.max_seq_length`` is dropped."""
    tokenizer = eager(tokenizer)

    def read(path: Path) -> list[PromptExample]:
        return [
            PromptExample(prompt_tokens(tokenizer, r.record, data_cfg.use_chat_template), r.fields, r.source)
            for r in read_records(path, parse_prompt)
        ]

    splits = read_split_items(data_cfg, read)
    room = data_cfg.max_seq_length - settings.max_completion_tokens
    for name in SPLITS:
        items = getattr(splits, name)
        kept = [p for p in items if len(p.tokens) <= room]
        splits.truncated[name], splits.dropped[name] = 0, len(items) - len(kept)
        setattr(splits, name, kept)
    if not splits.train:
        raise MacftError(
            f"No training prompt plus align.max_completion_tokens fits within data.max_seq_length={data_cfg.max_seq_length}; "
            "raise it or shorten the data."
        )
    return splits


def batches(splits: Splits, data_cfg: DataConfig, *, batch_size: int, seed: int):
    return item_batches(
        splits, lambda p: Example(tokens=p.tokens, mask=[]),
        lambda items, indices, max_len, epoch, index: PromptBatch([items[i] for i in indices], epoch, index),
        data_cfg, batch_size, seed,
    )


def demo_records(path: Path) -> list[Record]:
    """A held-out prompt, expecting its ``answer`` field (when it has one)."""
    prompts = read_records(path, parse_prompt)
    return [dataclasses.replace(p.record, completion=str(p.fields.get("answer", ""))) for p in prompts if p.record.kind == "completion"]


@dataclass
class PromptSplitReport:
    prompts: int
    source: str
    lengths: dict[str, float]
    fields: dict[str, int]  # field -> prompts that have it


class PromptReport(ShapeReport):

    def table(self) -> tuple[list[str], list[list[Any]], set[str]]:
        rows = [
            [name, s.prompts, f"{s.lengths['mean']:.1f}/{s.lengths['max']}", ", ".join(f"{k} {n}" for k, n in sorted(s.fields.items())) or "none"]
            for name, s in self.splits.items()
        ]
        return ["split", "prompts", "tokens (mean/max)", "fields for the rewards"], rows, set()


def check(data_cfg: DataConfig, tokenizer: Any, settings: Any = None, batch_size: int = 4) -> PromptReport:
    splits = {}
    for name, path in data_files(data_cfg).items():
        records = read_records(path, parse_prompt)
        tokens = [prompt_tokens(tokenizer, r.record, data_cfg.use_chat_template) for r in records]
        splits[name] = PromptSplitReport(
            prompts=len(records),
            source=str(path),
            lengths=length_stats([Example(tokens=t, mask=[]) for t in tokens]),
            fields=dict(Counter(k for r in records for k in r.fields if k not in ("prompt", "system"))),
        )
    return PromptReport("prompts", data_cfg.max_seq_length, splits)


PROMPTS = DataShape(
    name="prompts",
    line=PROMPT_SHAPE,
    recognises=lambda obj: "prompt" in obj and not {"completion", "messages", "conversations", "text", "chosen", "rejected"} & set(obj),
    load=load,
    batches=batches,
    check=check,
    demo_records=demo_records,
)
