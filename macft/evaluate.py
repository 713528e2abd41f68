"""Evaluation: masked loss and perplexity, and task metrics from greedy generation, base vs tuned.

Each JSONL record is tokenized by ``macft.data`` exactly as training sees it, so the loss covers
the same tokens training does (the completion, or the assistant turns). For records with an
answer — prompt/completion, Alpaca, chat, or plain text split at ``completion_after`` (e.g. "A:"
for WikiSQL-style "Q: ... A: SELECT ...") — the model also answers the prompt greedily and is
scored by exact match (after stripping whitespace), a character similarity (difflib's ratio) and
a whitespace-token F1. With an adapter, the same model is scored with its adapter switched off
(the base) and on (tuned).

    result = evaluate(opened.model, tokenizer, read_records(path), EvalOptions(max_examples=50), tuned=True)
    result.scores["base"].perplexity, result.scores["tuned"].exact_match
    write_report(result, "eval.jsonl")
"""

from __future__ import annotations

import difflib
import json
import math
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from macft.errors import MacftError
from macft.phases import phase
from macft.paths import atomic_path


@dataclass(frozen=True)
class EvalOptions:
    max_examples: int = 0  # 0 = all
    max_tokens: int = 128  # generation limit per answer
    generate: bool = True  # task metrics need generation; loss alone is much faster
    completion_after: str | None = None  # split "text" records at the last occurrence of this marker
    use_chat_template: bool | None = None
    max_seq_length: int = 2048


@dataclass
class Scores:
    """One model's scores over the evaluated examples."""

    loss: float
    perplexity: float
    tokens: int  # trained tokens the loss is averaged over
    examples: int
    generated: int = 0  # examples with a reference answer, scored by the metrics below
    exact_match: float | None = None
    similarity: float | None = None
    f1: float | None = None


@dataclass
class EvalResult:
    scores: dict[str, Scores]  # "base" and, with an adapter, "tuned"
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per example: prompt, reference, outputs, scores

    def to_dict(self) -> dict[str, Any]:
        return {name: asdict(s) for name, s in self.scores.items()}


# ---------------------------------------------------------------------------- metrics


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def similarity(prediction: str, reference: str) -> float:
    return difflib.SequenceMatcher(None, prediction.strip(), reference.strip(), autojunk=False).ratio()


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = prediction.split(), reference.split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------- examples


@dataclass
class Item:
    """One record ready to score: its tokens and loss mask, and (when it has one) the answer."""

    tokens: list[int]
    mask: list[bool]
    prompt: str
    reference: str | None
    prompt_tokens: list[int] | None  # what the model sees before it answers


def split_text(record, marker: str):
    """A "text" record as prompt/completion, split after the last ``marker`` (None if absent)."""
    from macft.data import Record

    at = record.text.rfind(marker)
    if at < 0:
        return None
    cut = at + len(marker)
    return Record("completion", "prompt_completion", record.source, prompt=record.text[:cut], completion=record.text[cut:])


def prepare(records: list, tokenizer, options: EvalOptions) -> list[Item]:
    from macft.data import Encoder

    encoder = Encoder(tokenizer, use_chat_template=options.use_chat_template, mask_prompt=True)
    items = []
    for record in records[: options.max_examples or None]:
        if record.kind == "text" and options.completion_after:
            record = split_text(record, options.completion_after) or record
        example = encoder.encode(record)
        tokens, mask = example.tokens[: options.max_seq_length], example.mask[: options.max_seq_length]
        if not any(mask[1:]):
            continue
        if record.kind == "text":
            items.append(Item(tokens, mask, record.text, None, None))
            continue
        messages = record.as_messages()
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        # The answer is the last trained run of tokens; the prompt is everything before it.
        start = len(mask) - 1
        while start > 0 and mask[start - 1 : start + 1] != [False, True]:
            start -= 1
        prompt = record.prompt if record.kind == "completion" else messages[last - 1]["content"] if last else ""
        items.append(Item(tokens, mask, prompt, messages[last]["content"], tokens[:start]))
    if not items:
        raise MacftError("No example has tokens to evaluate (empty completions, or everything truncated).")
    return items


# ---------------------------------------------------------------------------- scoring


def example_loss(model, tokens: list[int], mask: list[bool]) -> tuple[float, int]:
    """(sum of next-token losses over the trained positions, their count), in float32."""
    import mlx.core as mx

    inputs = mx.array(tokens[:-1])[None]
    targets = mx.array(tokens[1:])
    weights = mx.array(mask[1:], dtype=mx.float32)
    logits = model(inputs)[0].astype(mx.float32)
    losses = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return float((losses * weights).sum().item()), int(sum(mask[1:]))


def answers(model, tokenizer, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Greedy answers, generated as one batch: on a CPU, decoding one prompt at a time is bound by
    reading the output matrix once per token, so a batch costs little more than one answer."""
    from mlx_lm.generate import batch_generate

    if not prompts:
        return []
    with phase(f"Generating {len(prompts)} answers"):
        return list(batch_generate(model, tokenizer, prompts, max_tokens=max_tokens).texts)


def score_model(model, tokenizer, items: list[Item], options: EvalOptions) -> tuple[Scores, list[dict[str, Any]]]:
    total, count, rows = 0.0, 0, []
    for item in items:
        loss_sum, n = example_loss(model, item.tokens, item.mask)
        total, count = total + loss_sum, count + n
        rows.append({"loss": loss_sum / n})
    answerable = [i for i, item in enumerate(items) if options.generate and item.reference is not None]
    outputs = answers(model, tokenizer, [items[i].prompt_tokens for i in answerable], options.max_tokens)
    for i, output in zip(answerable, outputs):
        reference = items[i].reference
        rows[i].update(output=output, exact=exact_match(output, reference), similarity=similarity(output, reference), f1=token_f1(output, reference))
    mean = total / count
    scores = Scores(loss=mean, perplexity=math.exp(min(mean, 700.0)), tokens=count, examples=len(items))
    scored = [r for r in rows if "output" in r]
    if scored:
        scores.generated = len(scored)
        for metric, key in (("exact_match", "exact"), ("similarity", "similarity"), ("f1", "f1")):
            setattr(scores, metric, sum(r[key] for r in scored) / len(scored))
    return scores, rows


def evaluate(model, tokenizer, records: list, options: EvalOptions = EvalOptions(), *, tuned: bool = False) -> EvalResult:
    """Score ``model``; with ``tuned`` (an adapter is applied), score it as base and as tuned."""
    from macft.methods import adapters_disabled

    items = prepare(records, tokenizer, options)
    scores, per_model = {}, {}
    for name in ("base", "tuned") if tuned else ("base",):
        with adapters_disabled(model) if name == "base" and tuned else nullcontext():
            scores[name], per_model[name] = score_model(model, tokenizer, items, options)
    rows = []
    for i, item in enumerate(items):
        row: dict[str, Any] = {"prompt": item.prompt, "reference": item.reference}
        for name, model_rows in per_model.items():
            row.update({f"{name}_{key}": value for key, value in model_rows[i].items()})
        rows.append(row)
    return EvalResult(scores, rows)


def eval_records(path: str | Path) -> list:
    """Records from a .jsonl file, or from a folder's test.jsonl (else valid.jsonl)."""
    from macft.data import read_records

    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("test.jsonl", "valid.jsonl"):
            if (path / name).is_file():
                return read_records(path / name)
        raise MacftError(f"Folder {path} has no test.jsonl or valid.jsonl to evaluate on.")
    return read_records(path)


def is_eval_report(path: Path) -> bool:
    """Whether ``path`` looks like a report `macft eval --report` wrote (JSONL rows with prompt and reference)."""
    from macft.data.formats import MAX_LINE_BYTES

    try:
        with Path(path).open() as fh:
            first = json.loads(fh.readline(MAX_LINE_BYTES))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(first, dict) and {"prompt", "reference"} <= first.keys()


def write_report(result: EvalResult, path: str | Path) -> Path:
    """The per-example rows as JSONL, written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows))
    return path
