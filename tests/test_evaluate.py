"""`macft eval`: the masked loss against numpy, the metrics on known strings, base vs tuned through the CLI."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.generate import generate as mlx_generate
from test_chat import make_run

from macft.cli import cli
from macft.config import MethodConfig
from macft.data import read_records
from macft.evaluate import EvalOptions, evaluate, exact_match, similarity, token_f1
from macft.adapters.files import load_adapter
from macft.models.load import load_model

PAIRS = [
    ("Q: What is two plus two? A:", " 4"),
    ("SELECT name FROM users WHERE", " age > 30 ORDER BY name;"),
    ("The quick brown fox", " jumps over the lazy dog."),
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    return path


def numpy_loss(model, tokenizer, pairs) -> float:
    """Mean next-token cross-entropy over completion tokens, in float64 numpy from the model's logits."""
    total, count = 0.0, 0
    for prompt, completion in pairs:
        prompt_ids = tokenizer.encode(prompt)
        answer_ids = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
        tokens = prompt_ids + answer_ids
        logits = np.array(model(mx.array(tokens[:-1])[None])[0].astype(mx.float32), dtype=np.float64)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        for position in range(len(prompt_ids), len(tokens)):  # predicting token `position` from those before
            total -= log_probs[position - 1, tokens[position]]
            count += 1
    return total / count


def test_loss_matches_numpy(tiny_model_dir, data_file):
    loaded = load_model(str(tiny_model_dir))
    options = EvalOptions(generate=False, use_chat_template=False)
    result = evaluate(loaded.model, loaded.tokenizer, read_records(data_file), options)
    expected = numpy_loss(loaded.model, loaded.tokenizer, PAIRS)
    scores = result.scores["base"]
    assert scores.loss == pytest.approx(expected, rel=1e-5)
    assert scores.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    assert scores.exact_match is None and scores.examples == 3


def test_metrics_on_known_strings():
    assert exact_match(" SELECT a FROM t \n", "SELECT a FROM t") == 1.0
    assert exact_match("SELECT a FROM t;", "SELECT a FROM t") == 0.0
    assert similarity("abc", "abd") == pytest.approx(2 * 2 / 6)
    assert similarity("", "") == 1.0
    # pred tokens {a, b, c}, ref {a, b, d, e}: precision 2/3, recall 2/4
    assert token_f1("a b c", "a b d e") == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert token_f1("x", "y") == 0.0


def test_eval_cli_base_vs_tuned_with_report(tiny_model_dir, data_file, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, 3, MethodConfig(name="lora", rank=4))
    report = tmp_path / "out" / "eval.jsonl"
    result = CliRunner().invoke(
        cli, ["eval", "--adapter", str(run), "--data", str(data_file), "--max-tokens", "6", "--report", str(report), "--json"]
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert set(scores) == {"base", "tuned"}

    base = load_model(str(tiny_model_dir))
    tuned_model = load_adapter(load_model(str(tiny_model_dir)).model, run)[0]
    options = EvalOptions(generate=False)
    records = read_records(data_file)
    assert scores["base"]["loss"] == pytest.approx(evaluate(base.model, base.tokenizer, records, options).scores["base"].loss, rel=1e-5)
    assert scores["tuned"]["loss"] == pytest.approx(evaluate(tuned_model, base.tokenizer, records, options).scores["base"].loss, rel=1e-5)
    assert scores["base"]["loss"] != pytest.approx(scores["tuned"]["loss"])

    rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert len(rows) == len(PAIRS)
    for row, (prompt, completion) in zip(rows, PAIRS):
        assert row["prompt"] == prompt and row["reference"] == completion
        ids = base.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        assert row["tuned_output"] == mlx_generate(tuned_model, base.tokenizer, ids, max_tokens=6)
        assert row["base_output"] == mlx_generate(base.model, base.tokenizer, ids, max_tokens=6)
        assert row["tuned_exact"] == exact_match(row["tuned_output"], completion)
        assert row["base_similarity"] == pytest.approx(similarity(row["base_output"], completion))
    assert scores["tuned"]["exact_match"] == pytest.approx(sum(r["tuned_exact"] for r in rows) / len(rows))


def test_text_records_split_at_a_marker(tiny_model_dir, tmp_path):
    lines = [
        json.dumps({"text": "table: 1-10015132-11\ncolumns: Player, No., Position\nQ: What position does number 21 play?\nA: SELECT Position FROM 1-10015132-11 WHERE No. = '21'"}),
        json.dumps({"text": "table: 2-1137694-3\ncolumns: Round, Winner, Team\nQ: Who won round 4?\nA: SELECT Winner FROM 2-1137694-3 WHERE Round = 4"}),
    ]  # WikiSQL-style text records: the answer follows "A:"
    path = tmp_path / "wikisql.jsonl"
    path.write_text("\n".join(lines) + "\n")
    loaded = load_model(str(tiny_model_dir))
    options = EvalOptions(max_tokens=4, completion_after="A:", use_chat_template=False)
    result = evaluate(loaded.model, loaded.tokenizer, read_records(path), options)
    for row, line in zip(result.rows, lines):
        text = json.loads(line)["text"]
        assert row["prompt"] + row["reference"] == text and row["reference"].lstrip().startswith("SELECT")
    assert result.scores["base"].generated == 2


def test_eval_cli_errors_are_one_line(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = CliRunner().invoke(cli, ["eval", "-m", str(tiny_model_dir), "--data", str(empty)])
    assert result.exit_code == 1 and result.output.startswith("Error:") and len(result.output.strip().splitlines()) == 1
