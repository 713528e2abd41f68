"""The data pipeline: formats, errors, templates and masking, splits, batching, packing, `macft data check`."""

from __future__ import annotations

import dataclasses

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ATTENTION_FAMILIES
from mlx_lm.utils import load_model, load_tokenizer

from macft.cli import cli
from macft.config import DataConfig
from macft.data import (
    Encoder,
    Example,
    batch_order,
    build_batch,
    iterate_batches,
    load_splits,
    packing_cache,
    plan_padding,
)
from macft.data.batching import split_rows
from macft.data.formats import read_records
from macft.errors import MacftError

CHAT = {
    "messages": [
        {"role": "system", "content": "Be nice"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Goodbye"},
    ]
}
LINES = [
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"prompt": "Q: What is two plus two?", "completion": " A: 4"},
    {"instruction": "Say hello", "input": "in English", "output": "Hello!"},
    {"instruction": "Count to three", "output": "1 2 3"},
    CHAT,
    {
        "conversations": [
            {"from": "system", "value": "Be brief"},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ]
    },
]
FORMATS = ["text", "prompt_completion", "alpaca", "alpaca", "chat", "sharegpt"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def trained_text(example: Example, tokenizer) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, trained in zip(example.tokens, example.mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


# ---------------------------------------------------------------------------- formats and errors


def test_every_format_parses_and_renders(tmp_path, tokenizer):
    records = read_records(write_jsonl(tmp_path / "train.jsonl", LINES + [""]))  # a blank line is skipped
    assert [r.format for r in records] == FORMATS
    encoder = Encoder(tokenizer)
    examples = [encoder.encode(r) for r in records]
    # text: the tokenizer's own encoding plus EOS, all trained
    assert examples[0].tokens == tokenizer.encode(LINES[0]["text"]) + [tokenizer.eos_token_id]
    assert all(examples[0].mask)
    # everything chat-like renders exactly as the chat template does
    conversation = [{"role": "user", "content": "Q: What is two plus two?"}, {"role": "assistant", "content": " A: 4"}]
    assert examples[1].tokens == tokenizer.apply_chat_template(conversation)
    alpaca = [{"role": "user", "content": "Say hello\n\nin English"}, {"role": "assistant", "content": "Hello!"}]
    assert examples[2].tokens == tokenizer.apply_chat_template(alpaca)
    assert examples[4].tokens == tokenizer.apply_chat_template(CHAT["messages"])
    sharegpt = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert examples[5].tokens == tokenizer.apply_chat_template(sharegpt)
    assert trained_text(examples[1], tokenizer) == [" A: 4<|end|>\n"]
    assert trained_text(examples[3], tokenizer) == ["1 2 3<|end|>\n"]


def test_plain_rendering_without_chat_template(tmp_path, tokenizer):
    records = read_records(write_jsonl(tmp_path / "train.jsonl", LINES[1:4]))
    examples = [Encoder(tokenizer, use_chat_template=False).encode(r) for r in records]
    eos = tokenizer.eos_token_id
    prompt = tokenizer.encode("Q: What is two plus two?")
    completion = tokenizer.encode(" A: 4", add_special_tokens=False) + [eos]
    assert examples[0].tokens == prompt + completion
    assert examples[0].mask == [False] * len(prompt) + [True] * len(completion)
    assert trained_text(examples[1], tokenizer) == ["Hello!<eos>"]
    assert tokenizer.decode(examples[1].tokens, skip_special_tokens=True) == "Say hello\n\nin English\n\nHello!"
    with pytest.raises(MacftError, match="train.jsonl:5: chat data needs a chat template"):
        Encoder(tokenizer, use_chat_template=False).encode(read_records(write_jsonl(tmp_path / "train.jsonl", LINES))[4])


BAD_LINES = [
    ('{"text": "a"', "not valid JSON"),
    ('["text"]', "expected a JSON object, got a list"),
    ('{"question": "a", "answer": "b"}', "unrecognised fields (answer, question)"),
    ('{"text": ""}', "'text' is empty"),
    ('{"text": 3}', "'text' must be a string, got a number"),
    ('{"prompt": "a"}', "missing 'completion'"),
    ('{"prompt": "a", "completion": "  "}', "'completion' is empty"),
    ('{"instruction": "a"}', "missing 'output'"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": ["hi"]}', "message 1 is a string"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', "message 1 has role 'bot'"),
    ('{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}',
     "message 1 (user) 'content' must be a string, got a list"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "no assistant turn to train on"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}', "message 2 (assistant) is empty"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": "x"}',
     "'tools' must be a list"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]}',
     "no assistant turn to train on"),
    ('{"messages": [{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]}',
     "message 1: 'weight' may only be 0 or 1, on an assistant message"),
    ('{"conversations": [{"from": "bot", "value": "a"}]}', "conversation turn 1 is from 'bot'"),
    ('{"conversations": [{"from": "human", "value": null}]}', "turn 1 'value' must be a string, got null"),
]


@pytest.mark.parametrize("line,problem", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [LINES[0], "", line])
    with pytest.raises(MacftError) as info:
        read_records(path)
    message = str(info.value)
    assert message.startswith("train.jsonl line 3: ")
    assert problem in message


def test_non_utf8_line_names_its_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(MacftError, match="train.jsonl line 2: not UTF-8 text"):
        read_records(path)


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(MacftError, match="is empty; it needs one JSON object per line"):
        read_records(path)


# ---------------------------------------------------------------------------- masking


def test_multi_turn_chat_trains_every_assistant_turn(tmp_path, tokenizer):
    record = read_records(write_jsonl(tmp_path / "train.jsonl", [CHAT]))[0]
    example = Encoder(tokenizer).encode(record)
    assert trained_text(example, tokenizer) == ["Hi there<|end|>\n", "Goodbye<|end|>\n"]
    untrained = tokenizer.decode([t for t, m in zip(example.tokens, example.mask) if not m], skip_special_tokens=False)
    assert untrained == "<bos><|system|>\nBe nice<|end|>\n<|user|>\nHello<|end|>\n<|assistant|>\n<|user|>\nThanks<|end|>\n<|assistant|>\n"
    unmasked = Encoder(tokenizer, mask_prompt=False).encode(record)
    assert unmasked.tokens == example.tokens and all(unmasked.mask)
    # OpenAI-style "weight": 0 keeps a turn as context without training on it
    weighted = {"messages": [dict(m, weight=0) if m["content"] == "Hi there" else m for m in CHAT["messages"]]}
    example = Encoder(tokenizer).encode(read_records(write_jsonl(tmp_path / "w.jsonl", [weighted]))[0])
    assert trained_text(example, tokenizer) == ["Goodbye<|end|>\n"]


TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}{{ '<|system|>\ntools: ' }}{% for t in tools %}{{ t['name'] }} {% endfor %}{{ '<|end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}{{ 'call ' + c['name'] }}{% endfor %}"
    "{% else %}{{ m['content'] }}{% endif %}{{ '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def test_tools_and_tool_calls_reach_the_template(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer._tokenizer.chat_template = TOOL_TEMPLATE
    line = {
        "tools": [{"name": "lookup"}],
        "messages": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "tool_calls": [{"name": "add"}]},
            {"role": "tool", "content": "4"},
            {"role": "assistant", "content": "It is 4"},
        ],
    }
    example = Encoder(tokenizer).encode(read_records(write_jsonl(tmp_path / "train.jsonl", [line]))[0])
    assert tokenizer.decode(example.tokens, skip_special_tokens=False).startswith("<bos><|system|>\ntools: lookup <|end|>")
    assert trained_text(example, tokenizer) == ["call add<|end|>\n", "It is 4<|end|>\n"]


# Like Qwen3: only the final assistant turn carries a (here: visible) thinking block.
LAST_TURN_DIFFERS = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
    "{% if loop.last and m['role'] == 'assistant' %}{{ '(thinking) ' }}{% endif %}{{ m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def test_template_that_renders_the_last_turn_differently(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer._tokenizer.chat_template = LAST_TURN_DIFFERS
    example = Encoder(tokenizer).encode(read_records(write_jsonl(tmp_path / "train.jsonl", [CHAT]))[0])
    assert example.tokens == tokenizer.apply_chat_template(CHAT["messages"])
    assert trained_text(example, tokenizer) == ["Hi there<|end|>\n", "(thinking) Goodbye<|end|>\n"]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def batch_loss(model, batch) -> mx.array:
    """The masked mean cross-entropy of a Batch, as a trainer computes it."""
    logits = model(batch.inputs, cache=packing_cache(model, batch.segment_ids)).astype(mx.float32)
    ce = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, batch.targets[..., None], axis=-1)[..., 0]
    return (ce * batch.loss_mask).sum() / batch.num_tokens


def test_masked_loss_matches_numpy_reference(tmp_path, tiny_model_dir, tokenizer):
    model, _ = load_model(tiny_model_dir)
    pairs = [("Q: What is two plus two?", " A: 4"), ("Say hello", " Hello! How can I help you today?"), ("Hi", " 42")]
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in pairs])
    examples = [Encoder(tokenizer, use_chat_template=False).encode(r) for r in read_records(path)]
    batch = build_batch(examples, [[0], [1], [2]], 512)
    assert batch.inputs.shape[1] % 8 == 0 and batch.padding_fraction > 0

    total, count = 0.0, 0
    for prompt, completion in pairs:
        tokens = tokenizer.encode(prompt) + tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
        first_answer = len(tokenizer.encode(prompt))
        logits = np.array(model(mx.array(tokens[:-1])[None]).astype(mx.float32))[0]
        logp = log_softmax(logits.astype(np.float64))
        for position in range(first_answer - 1, len(tokens) - 1):  # position p predicts token p + 1
            total -= logp[position, tokens[position + 1]]
            count += 1
    assert batch.num_tokens == count
    assert float(batch_loss(model, batch)) == pytest.approx(total / count, rel=1e-5)


# ---------------------------------------------------------------------------- packing


def varied_examples(tokenizer, count: int, seed: int = 0) -> list[Example]:
    """Text examples of varied length, some longer than the tiny Gemma's sliding window (32)."""
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over lazy dog model data fine tuning".split()
    examples = []
    for i in range(count):
        text = " ".join(rng.choice(words, size=int(rng.integers(2, 24))))
        tokens = tokenizer.encode(text) + [tokenizer.eos_token_id]
        mask = [bool(b) for b in rng.integers(0, 2, size=len(tokens))]
        examples.append(Example(tokens, mask, f"synthetic:{i}"))
    return examples


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)  # recurrent blocks refuse packing (test_qwen3_5)
def test_packed_logits_and_loss_equal_unpacked(family, tiny_models, tokenizer):
    model, _ = load_model(tiny_models[family])
    examples = varied_examples(tokenizer, 12)
    assert max(len(e.tokens) for e in examples) > 40
    plan = batch_order(examples, 2, 128, packing=True, seed=3)
    assert any(len(row) > 1 for rows in plan for row in rows)
    for index, rows in enumerate(plan[:2]):
        batch = build_batch(examples, rows, 128, packing=True)
        packed_logits = np.array(model(batch.inputs, cache=packing_cache(model, batch.segment_ids)))
        unpacked_batch = build_batch(examples, [[i] for row in rows for i in row], 128)
        assert float(batch_loss(model, batch)) == pytest.approx(float(batch_loss(model, unpacked_batch)), abs=1e-4)
        segments = np.array(batch.segment_ids)
        for r, row in enumerate(rows):
            for segment, i in enumerate(row, start=1):
                tokens = examples[i].tokens
                alone = np.array(model(mx.array(tokens[:-1])[None]))[0]
                np.testing.assert_allclose(packed_logits[r, segments[r] == segment], alone, atol=1e-4)


def test_packing_and_bucketing_reduce_padding(tokenizer):
    examples = varied_examples(tokenizer, 200, seed=1)
    padding = {}
    for label, options in (("random", {"bucket_by_length": False}), ("bucketed", {}), ("packed", {"packing": True})):
        plan = batch_order(examples, 4, 64, seed=0, **options)
        padding[label] = plan_padding(examples, plan, 64)
        # the plan-level estimate agrees with the arrays actually built
        batches = [build_batch(examples, rows, 64, packing=label == "packed") for rows in plan]
        padded = sum(b.padding_fraction * b.inputs.size for b in batches)
        assert padding[label] == pytest.approx(padded / sum(b.inputs.size for b in batches))
    assert padding["packed"] < padding["bucketed"] < padding["random"]


# ---------------------------------------------------------------------------- splits and batches


def test_splits_are_seeded_and_disjoint(tmp_path, tokenizer):
    rows = [{"text": f"example number {i} of the data"} for i in range(20)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    first = load_splits(DataConfig(train=str(path), split_valid=0.25, split_seed=7), tokenizer)
    again = load_splits(DataConfig(train=str(path), split_valid=0.25, split_seed=7), tokenizer)
    other = load_splits(DataConfig(train=str(path), split_valid=0.25, split_seed=8), tokenizer)
    assert first.counts == {"train": 15, "valid": 5, "test": 0}
    train, valid = {e.source for e in first.train}, {e.source for e in first.valid}
    assert not train & valid and len(train | valid) == 20
    assert valid == {e.source for e in again.valid} and valid != {e.source for e in other.valid}


def test_folder_layout_truncation_and_explicit_files(tmp_path, tokenizer):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "short"}, {"text": "a much longer example " * 8}])
    write_jsonl(folder / "valid.jsonl", [{"prompt": "Q: " + "very long prompt " * 8, "completion": "A"}])
    write_jsonl(folder / "test.jsonl", [{"text": "the test"}])
    splits = load_splits(DataConfig(train=str(folder), max_seq_length=16, split_valid=0.5), tokenizer)
    assert splits.counts == {"train": 2, "valid": 0, "test": 1}  # a valid file wins over split_valid
    assert splits.truncated == {"train": 1, "valid": 1, "test": 0}
    assert splits.dropped == {"train": 0, "valid": 1, "test": 0}  # its completion was cut off entirely
    assert max(len(e.tokens) for e in splits.train) == 16
    assert splits.train[1].tokens == tokenizer.encode("a much longer example " * 8)[:16]
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "another validation line"}])
    splits = load_splits(DataConfig(train=str(folder / "train.jsonl"), valid=str(other)), tokenizer)
    assert splits.counts == {"train": 2, "valid": 1, "test": 0}
    with pytest.raises(MacftError, match="has no train.jsonl"):
        load_splits(DataConfig(train=str(tmp_path)), tokenizer)
    with pytest.raises(MacftError, match="data.valid file .* does not exist"):
        load_splits(DataConfig(train=str(folder), valid=str(tmp_path / "nope.jsonl")), tokenizer)


@pytest.mark.parametrize("packing", [False, True])
def test_batches_are_deterministic_and_resumable(packing, tokenizer):
    examples = varied_examples(tokenizer, 30)
    options = {"packing": packing, "seed": 5}
    plan = batch_order(examples, 4, 48, epoch=2, **options)
    assert plan == batch_order(examples, 4, 48, epoch=2, **options)
    assert plan != batch_order(examples, 4, 48, epoch=3, **options)
    assert sorted(i for rows in plan for row in rows for i in row) == list(range(30))  # each example once
    full = list(iterate_batches(examples, 4, 48, epoch=2, **options))
    resumed = list(iterate_batches(examples, 4, 48, epoch=2, start=3, **options))
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed):
        assert a.index == b.index and mx.array_equal(a.inputs, b.inputs) and mx.array_equal(a.loss_mask, b.loss_mask)
    looped = iterate_batches(examples, 4, 48, epoch=2, loop=True, **options)
    crossing = [next(looped) for _ in range(len(full) + 1)]
    assert (crossing[-1].epoch, crossing[-1].index) == (3, 0)
    for batch in full:
        assert batch.inputs.shape[1] % 8 == 0 and batch.inputs.shape[1] <= 48
        # targets are the inputs shifted by one within each example
        segments = batch.segment_ids if packing else (batch.inputs != 0).astype(mx.int32)
        same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
        assert mx.array_equal(mx.where(same, batch.inputs[:, 1:], 0), mx.where(same, batch.targets[:, :-1], 0))
        assert batch.num_tokens == int(batch.loss_mask.sum())


@pytest.mark.parametrize("packing", [False, True])
def test_split_rows_partitions_a_batch_and_keeps_pairs_whole(packing, tokenizer):
    """A step's lanes: parts of consecutive rows (or of pairs, chosen rows first) that together hold the
    whole batch once, at its width."""
    batch = next(iterate_batches(varied_examples(tokenizer, 30), 5, 48, packing=packing))
    rows = np.array(batch.inputs)
    for count in (1, 2, 3, 5, 8):
        parts = split_rows(batch, count)
        assert len(parts) == min(count, 5)
        assert [p.inputs.shape[0] for p in parts] == [len(c) for c in np.array_split(np.arange(5), min(count, 5))]
        np.testing.assert_array_equal(np.concatenate([np.array(p.inputs) for p in parts]), rows)
        np.testing.assert_array_equal(np.concatenate([np.array(p.loss_mask) for p in parts]), np.array(batch.loss_mask))
        if packing:
            np.testing.assert_array_equal(np.concatenate([np.array(p.segment_ids) for p in parts]), np.array(batch.segment_ids))
        assert sum(p.num_tokens for p in parts) == batch.num_tokens
        assert all((p.epoch, p.index) == (batch.epoch, batch.index) for p in parts)

    pairs = next(iterate_batches(varied_examples(tokenizer, 30), 6, 48))  # rows 0-2 chosen, 3-5 their rejected
    first, second = split_rows(dataclasses.replace(pairs, pairs=True), 2)
    expected = np.array(pairs.targets)
    np.testing.assert_array_equal(np.array(first.targets), expected[[0, 1, 3, 4]])
    np.testing.assert_array_equal(np.array(second.targets), expected[[2, 5]])


# ---------------------------------------------------------------------------- macft data check


def test_data_check_cli(tmp_path, tiny_model_dir):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", LINES + [LINES[0]])
    write_jsonl(folder / "valid.jsonl", [LINES[1], {"text": "only in validation"}])
    runner = CliRunner()
    args = ["data", "check", str(folder), "--model", str(tiny_model_dir), "--max-seq-length", "16"]
    result = runner.invoke(cli, args + ["--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    train = report["splits"]["train"]
    assert train["examples"] == 7 and train["duplicates"] == 1
    assert train["formats"] == {"text": 2, "prompt_completion": 1, "alpaca": 2, "chat": 1, "sharegpt": 1}
    assert train["truncated"] == sum(1 for e in _full_lengths(folder, tiny_model_dir) if e > 16)
    assert report["overlap"] == {"valid": 1}
    assert set(report["padding"]) == {"random", "bucketed", "packed"}
    assert any(trained for _, trained in report["preview"]) and any(not trained for _, trained in report["preview"])

    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "trained" in result.output and "valid examples also in train: 1" in result.output

    result = runner.invoke(cli, args + ["--no-chat-template", "--no-mask-prompt", "--json"])
    assert result.exit_code == 1 and "train.jsonl:5: chat data needs a chat template" in result.output

    write_jsonl(folder / "train.jsonl", [LINES[1]])
    result = runner.invoke(cli, args + ["--no-chat-template", "--no-mask-prompt", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["preview"] == [["<bos>Q: What is two plus two? A: 4<eos>", True]]

    write_jsonl(folder / "train.jsonl", [LINES[0], {"messages": [{"role": "robot", "content": "x"}]}])
    result = runner.invoke(cli, args)
    assert result.exit_code == 1 and "train.jsonl line 2: message 1 has role 'robot'" in result.output


def _full_lengths(folder: Path, model_dir: Path) -> list[int]:
    tokenizer = load_tokenizer(model_dir)
    encoder = Encoder(tokenizer)
    return [len(encoder.encode(r).tokens) for r in read_records(folder / "train.jsonl")]
