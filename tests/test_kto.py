"""KTO on unpaired feedback: the loss and gradient against numpy, the KL estimate over the whole
batch whatever the lanes, the data shape's lines and `data check`, and a run through the CLI."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_map

from macft.cli import cli
from macft.data import Encoder, read_records
from macft.data.feedback import FeedbackExample, build_feedback_batch, parse_feedback
from macft.errors import MacftError
from macft.methods import adapters_disabled
from macft.objectives import AlignConfig, OBJECTIVES
from macft.objectives.base import LossContext
from macft.train.loop import lane_arrays
from macft.train.distributed import World
from test_align import full_logit_logps, log_sigmoid, lora_model, write_jsonl

FEEDBACK = [
    {"prompt": f"Q: {i} plus one?", "completion": f" {i + 1}" if i % 3 else f" {i + 7} or more", "label": bool(i % 3)} for i in range(24)
]


def kto_loss(cfg, chunk_size=8):
    return OBJECTIVES["kto"].loss(LossContext(None, cfg, None, chunk_size, None))


def feedback_batch(tokenizer, rows=FEEDBACK[:4]):
    encoder = Encoder(tokenizer, use_chat_template=False, mask_prompt=True)
    items = []
    for i, row in enumerate(rows):
        record = parse_feedback(json.dumps(row), f"t:{i}")
        items.append(FeedbackExample(encoder.encode(record.record), record.desirable, record.source))
    return build_feedback_batch(items, list(range(len(items))), 64)


def numpy_kto(cfg, policy, ref, kl_policy, kl_ref, desirable):
    """The summed KTO loss in float64 (z from the mismatched rows, held constant)."""
    z = max(0.0, float((kl_policy - kl_ref).mean()))
    r = policy - ref
    sig = lambda x: np.exp(log_sigmoid(x))  # noqa: E731
    losses = np.where(desirable, cfg.desirable_weight * (1 - sig(cfg.beta * (r - z))), cfg.undesirable_weight * (1 - sig(cfg.beta * (z - r))))
    return float(losses.sum())


@pytest.mark.parametrize("options", [{}, {"beta": 2.0, "desirable_weight": 1.5, "undesirable_weight": 0.5}])
def test_kto_loss_and_gradient_match_numpy(tiny_model_dir, options):
    model, tokenizer = lora_model(tiny_model_dir)
    cfg = AlignConfig(**options)
    batch = feedback_batch(tokenizer)
    half = batch.inputs.shape[0] // 2
    loss_fn = kto_loss(cfg)
    (arrays,) = lane_arrays(loss_fn, model, batch, 1, World())

    logps = np.array(full_logit_logps(model, batch), np.float64)
    with adapters_disabled(model):
        ref = np.array(full_logit_logps(model, batch), np.float64)
    desirable = np.array([row["label"] for row in FEEDBACK[:4]])
    expected = numpy_kto(cfg, logps[:half], ref[:half], logps[half:], ref[half:], desirable)
    (loss, count, *stats), grads = nn.value_and_grad(model, lambda *a: loss_fn(model, *a))(*arrays)
    assert count.item() == 4 and stats[2].item() == desirable.sum() and stats[4].item() == (~desirable).sum()
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)

    # d loss / d each example's log-probability by central differences of the numpy loss (z constant,
    # as KTO holds it), chained through the full-logits log-probabilities: an independent gradient.
    step, slopes = 1e-4, np.zeros(half)
    for i in range(half):
        up, down = logps[:half].copy(), logps[:half].copy()
        up[i] += step
        down[i] -= step
        slopes[i] = (
            numpy_kto(cfg, up, ref[:half], logps[half:], ref[half:], desirable)
            - numpy_kto(cfg, down, ref[:half], logps[half:], ref[half:], desirable)
        ) / (2 * step)
    weights = mx.array(np.concatenate([slopes, np.zeros(half)]).astype(np.float32))
    _, reference_grads = nn.value_and_grad(model, lambda: (full_logit_logps(model, batch) * weights).sum())()
    ours, theirs = dict(tree_flatten(grads)), dict(tree_flatten(reference_grads))
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        np.testing.assert_allclose(np.array(ours[name]), np.array(theirs[name]), rtol=2e-3, atol=2e-6, err_msg=name)


def test_kto_lanes_and_ranks_share_the_whole_batch_kl_estimate(tiny_model_dir):
    """Split into lanes or shared among ranks, every part uses the KL estimate of the whole global
    batch, so the parts' losses and gradients add up to the whole batch's."""
    model, tokenizer = lora_model(tiny_model_dir)
    loss_fn = kto_loss(AlignConfig(beta=1.0))
    batch = feedback_batch(tokenizer, FEEDBACK[:5])
    loss_and_grad = nn.value_and_grad(model, lambda *a: loss_fn(model, *a))
    (whole, count, *stats), grads = loss_and_grad(*lane_arrays(loss_fn, model, batch, 1, World())[0])
    for parts in ([lane_arrays(loss_fn, model, batch, 2, World())],
                  [lane_arrays(loss_fn, model, batch, 1, World(rank=r, size=2)) for r in range(2)]):
        results = [loss_and_grad(*arrays) for group in parts for arrays in group]
        assert len(results) == 2
        assert sum(r[0][0].item() for r in results) == pytest.approx(whole.item(), rel=1e-5)
        assert sum(r[0][1].item() for r in results) == count.item() == 5
        summed = tree_map(mx.add, results[0][1], results[1][1])
        for name, value in tree_flatten(grads):
            np.testing.assert_allclose(np.array(dict(tree_flatten(summed))[name]), np.array(value), rtol=1e-4, atol=1e-5 * np.abs(np.array(value)).max(), err_msg=name)


def test_feedback_lines_validate_and_data_check_reports_the_balance(tmp_path, tiny_model_dir):
    folder = tmp_path / "feedback"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", FEEDBACK[:12] + [FEEDBACK[1]])
    records = read_records(folder / "train.jsonl", parse_feedback)
    assert [r.desirable for r in records[:3]] == [False, True, True] and records[0].record.completion == " 7 or more"
    bad = tmp_path / "bad.jsonl"
    for line, message in [
        ({"prompt": "p", "completion": "a", "label": "yes"}, "line 2: 'label' must be true"),
        ({"prompt": "p", "label": True}, "line 2: missing 'completion'"),
        ({"prompt": "p", "completion": [{"role": "user", "content": "x"}], "label": True}, "assistant messages only"),
    ]:
        write_jsonl(bad, [FEEDBACK[0], line])
        with pytest.raises(MacftError, match=message):
            read_records(bad, parse_feedback)
    out = CliRunner().invoke(cli, ["data", "check", str(folder), "--model", str(tiny_model_dir), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output[out.output.index("{") :])
    train = report["splits"]["train"]
    assert report["kind"] == "feedback" and train["examples"] == 13
    assert (train["desirable"], train["undesirable"], train["duplicates"]) == (9, 4, 1)
    table = CliRunner().invoke(cli, ["data", "check", str(folder), "--model", str(tiny_model_dir)])
    row = next(line for line in table.output.splitlines() if line.strip().startswith("train"))
    assert [cell.strip() for cell in row.split("│")][:4] == ["train", "13", "9", "4"]


def test_kto_run_reports_its_margin(tiny_model_dir, tmp_path):
    """A KTO run through the CLI: the margin between desirable and undesirable rewards is reported
    in training and validation, and grows."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", FEEDBACK[:20])
    write_jsonl(data / "valid.jsonl", FEEDBACK[20:])
    flags = ["--model", str(tiny_model_dir), "--data", str(data), "--out-dir", str(tmp_path / "runs"), "--lr", "5e-3",
             "--set", "train.objective=kto", "--set", "train.eval_every=2", "--set", "train.report_every=1",
             "--set", "train.save_every=2", "--set", "align.beta=1.0", "--set", "demo.count=0", "--json"]
    whole = CliRunner().invoke(cli, ["lora", *flags, "--iters", "6", "--name", "whole"])
    assert whole.exit_code == 0, whole.output
    rows = [json.loads(line) for line in (tmp_path / "runs" / "whole" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert all("reward_margin" in r and "kl" in r for r in train)
    assert train[-1]["reward_margin"] > train[0]["reward_margin"]
    valid = [r for r in rows if r["kind"] == "valid"]
    assert valid and all("val_reward_margin" in r for r in valid)
    summary = json.loads(whole.output[whole.output.index("{") :])
    assert summary["objective"] == "kto" and "reference" in summary["reference"]
