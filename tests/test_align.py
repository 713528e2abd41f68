"""Alignment objectives: losses and gradients against numpy, the adapters-off reference against a
separately loaded base, GRPO advantages and clipping, rewards, pair data, exact resume."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from macft.config import AlignConfig, MethodConfig, Recipe
from macft.data import Encoder, read_records
from macft.data.pairs import build_pair_batch, encode_pair, parse_pair
from macft.data.prompts import parse_prompt
from macft.errors import MacftError
from macft.methods import adapters_disabled, apply_method
from macft.objectives import OBJECTIVES
from macft.objectives.base import LossContext
from macft.objectives.grpo import group_advantages, token_objective
from macft.objectives.rewards import load_reward, load_rewards, score
from macft.objectives.sequences import sequence_logps
from macft.models.load import load_model
from macft.train.loop import Callback
from macft.train.run import run_training

PAIRS = [
    {"prompt": f"Q: {i} plus one?", "chosen": f" {i + 1}", "rejected": f" {i + 5} or so, maybe more"} for i in range(24)
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def lora_model(model_dir, seed=1):
    """The tiny model with LoRA whose B matrices are random (so the policy differs from its base)."""
    loaded = load_model(str(model_dir))
    model = apply_method(loaded.model, MethodConfig(rank=4))
    mx.random.seed(seed)
    model.update(tree_map(lambda p: 0.05 * mx.random.normal(p.shape), model.trainable_parameters()))
    return model, loaded.tokenizer


def objective_loss(objective, cfg, chunk_size, reference=None):
    """The loop's loss of ``objective`` (a preference objective needs no model or tokenizer to be built)."""
    return OBJECTIVES[objective].loss(LossContext(None, cfg, None, chunk_size, reference))


def pair_batch(tokenizer, rows=PAIRS[:3]):
    encoder = Encoder(tokenizer, use_chat_template=False)
    pairs = [encode_pair(encoder, parse_pair(json.dumps(r), f"t:{i}")) for i, r in enumerate(rows)]
    return build_pair_batch(pairs, list(range(len(pairs))), 64)


def full_logit_logps(model, batch) -> mx.array:
    """log p of each row's trained tokens from the full logits (no slicing, no custom backward)."""
    logits = model(batch.inputs).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp, batch.targets[..., None], axis=-1)[..., 0]
    return (picked * batch.loss_mask).sum(axis=1)


def log_sigmoid(x):
    return -np.logaddexp(0, -x)


def numpy_pair_loss(objective, cfg, pi, ref, tokens):
    """The summed loss of the pairs from row log-probabilities (chosen rows first), in float64."""
    half = len(pi) // 2
    pc, pr, tc, tr = pi[:half], pi[half:], tokens[:half], tokens[half:]
    if objective == "dpo" and cfg.dpo_loss == "ipo":
        h = (pc - ref[:half]) / tc - (pr - ref[half:]) / tr
        return float(((h - 1 / (2 * cfg.beta)) ** 2).sum())
    if objective == "dpo":
        x = cfg.beta * ((pc - ref[:half]) - (pr - ref[half:]))
    elif objective == "simpo":
        x = cfg.beta * (pc / tc - pr / tr) - cfg.simpo_gamma
    else:  # orpo
        mc, mr = pc / tc, pr / tr
        odds = (mc - np.log1p(-np.exp(mc))) - (mr - np.log1p(-np.exp(mr)))
        return float((-mc - cfg.beta * log_sigmoid(odds)).sum())
    eps = cfg.label_smoothing
    return float((-(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)).sum())


@pytest.mark.parametrize(
    "objective,options",
    [("dpo", {"label_smoothing": 0.1}), ("dpo", {"dpo_loss": "ipo"}), ("orpo", {"beta": 0.5}), ("simpo", {"beta": 2.0})],
)
def test_preference_loss_and_gradient_match_numpy(tiny_model_dir, objective, options):
    model, tokenizer = lora_model(tiny_model_dir)
    cfg = AlignConfig(**options)
    batch = pair_batch(tokenizer)
    loss_fn = objective_loss(objective, cfg, chunk_size=8)  # several chunks and vocabulary slices
    arrays = loss_fn.prepare(batch)

    policy = np.array(full_logit_logps(model, batch), np.float64)
    with adapters_disabled(model):
        ref = np.array(full_logit_logps(model, batch), np.float64)
    tokens = np.array(batch.loss_mask.sum(axis=1), np.float64)
    expected = numpy_pair_loss(objective, cfg, policy, ref, tokens)
    (loss, pairs, *_), grads = nn.value_and_grad(model, lambda *a: loss_fn(model, *a))(*arrays)
    assert pairs.item() == 3
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)

    # d loss / d row log-probabilities by central differences of the numpy loss, then chained through
    # the full-logits log-probabilities with MLX: an independent route to the parameter gradient.
    step = 1e-4
    slopes = np.zeros_like(policy)
    for i in range(len(policy)):
        up, down = policy.copy(), policy.copy()
        up[i] += step
        down[i] -= step
        slopes[i] = (numpy_pair_loss(objective, cfg, up, ref, tokens) - numpy_pair_loss(objective, cfg, down, ref, tokens)) / (2 * step)
    weights = mx.array(slopes.astype(np.float32))
    _, reference_grads = nn.value_and_grad(model, lambda: (full_logit_logps(model, batch) * weights).sum())()
    ours, theirs = dict(tree_flatten(grads)), dict(tree_flatten(reference_grads))
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        np.testing.assert_allclose(np.array(ours[name]), np.array(theirs[name]), rtol=2e-3, atol=2e-5, err_msg=name)


def test_pair_batches_split_across_lanes_sum_to_the_whole(tiny_model_dir):
    """The loop's lanes split a pair batch by pairs: the parts' losses and gradients, each computed on its
    own stream, add up to the whole batch's (checked against numpy above)."""
    model, tokenizer = lora_model(tiny_model_dir)
    cfg = AlignConfig()
    batch = pair_batch(tokenizer)
    loss_fn = objective_loss("dpo", cfg, chunk_size=8)
    policy = np.array(full_logit_logps(model, batch), np.float64)
    with adapters_disabled(model):
        ref = np.array(full_logit_logps(model, batch), np.float64)
    expected = numpy_pair_loss("dpo", cfg, policy, ref, np.array(batch.loss_mask.sum(axis=1), np.float64))
    loss_and_grad = nn.value_and_grad(model, lambda *a: loss_fn(model, *a))
    (_, _, *whole_stats), whole = loss_and_grad(*loss_fn.prepare(batch))
    parts = loss_fn.split(batch, 2)
    assert [p.inputs.shape[0] for p in parts] == [4, 2]  # 2 + 1 pairs
    results = []
    for part in parts:
        with mx.stream(mx.new_stream(mx.default_device())):
            results.append(loss_and_grad(*loss_fn.prepare(part)))
    loss = sum(r[0][0].item() for r in results)
    assert sum(r[0][1].item() for r in results) == 3
    assert loss == pytest.approx(expected, rel=1e-4, abs=1e-5)
    for i, stat in enumerate(whole_stats):
        assert sum(r[0][2 + i].item() for r in results) == pytest.approx(stat.item(), rel=1e-5, abs=1e-5)
    summed = tree_map(mx.add, results[0][1], results[1][1])
    ours, theirs = dict(tree_flatten(summed)), dict(tree_flatten(whole))
    for name in theirs:
        np.testing.assert_allclose(np.array(ours[name]), np.array(theirs[name]), rtol=1e-4, atol=1e-6, err_msg=name)


def test_adapters_off_logps_equal_a_separately_loaded_base(tiny_model_dir):
    model, tokenizer = lora_model(tiny_model_dir)
    batch = pair_batch(tokenizer)
    arrays = objective_loss("dpo", AlignConfig(), chunk_size=8).prepare(batch)
    base = load_model(str(tiny_model_dir)).model
    expected, _ = sequence_logps(base, arrays, chunk_size=8, training=False)
    with adapters_disabled(model):
        off, _ = sequence_logps(model, arrays, chunk_size=8, training=False)
    on, _ = sequence_logps(model, arrays, chunk_size=8, training=False)
    np.testing.assert_allclose(np.array(off), np.array(expected), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.array(expected), np.array(full_logit_logps(base, batch)), rtol=1e-5, atol=1e-4)
    assert np.abs(np.array(on) - np.array(expected)).max() > 1e-2  # the adapters do change the policy


def test_group_advantages_and_clipped_objective():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.5, -1.0, 3.0, 0.0]])
    advantages = group_advantages(rewards)
    expected = (rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(advantages, expected)
    np.testing.assert_allclose(advantages[0], [1, -1, -1, 1], atol=1e-3)
    assert np.all(advantages[1] == 0)  # a group that agrees teaches nothing

    eps, beta = 0.2, 0.05
    old = np.log(np.array([0.5, 0.5, 0.5, 0.5, 0.5]))
    ratio = np.array([1.5, 0.5, 1.1, 1.5, 0.5])  # clipped above, below, inside; then the side that is kept
    adv = np.array([1.0, -1.0, 1.0, -1.0, 1.0])
    logps = old + np.log(ratio)
    ref = logps - 0.3
    loss, kl = token_objective(mx.array(logps), mx.array(old), mx.array(ref), mx.array(adv), eps, beta)
    clipped = np.clip(ratio, 1 - eps, 1 + eps)
    np_kl = np.exp(ref - logps) - (ref - logps) - 1
    np.testing.assert_allclose(np.array(loss), -(np.minimum(ratio * adv, clipped * adv) - beta * np_kl), rtol=1e-5)
    np.testing.assert_allclose(np.array(kl), np_kl, rtol=1e-5)

    grad = mx.grad(lambda lp: token_objective(lp, mx.array(old), mx.array(ref), mx.array(adv), eps, beta)[0].sum())(mx.array(logps))
    kl_grad = beta * (1 - np.exp(ref - logps))  # d(β·KL)/d logπ
    unclipped = np.array([False, False, True, True, True])  # where min() keeps the unclipped term
    np.testing.assert_allclose(np.array(grad), np.where(unclipped, -adv * ratio, 0.0) + kl_grad, rtol=1e-4, atol=1e-6)


def test_rewards_built_ins_user_functions_and_errors(tmp_path):
    example = {"prompt": "p", "answer": "42"}
    rewards = load_rewards(["exact_match", "json_keys=a,b", "regex=^\\d+$", "length_penalty=3"])
    totals = score(rewards, [" 42 ", '{"a": 1, "b": 2}', "[1]"], [example] * 3, ["t:1", "t:2", "t:3"])
    # " 42 ": exact, JSON but no object (0.5), digits, one character over; then a JSON object of 16 characters
    np.testing.assert_allclose(totals, [1 + 0.5 + 1 - 0.01, 0 + 1 + 0 - 0.13, 0 + 0.5 + 0 + 0])

    module = tmp_path / "my_rewards.py"
    module.write_text("def shout(completion, example):\n    return float(completion.isupper()) + len(example['answer'])\n")
    assert score(load_rewards([f"{module}:shout"]), ["HI", "hi"], [example] * 2, ["a", "b"]).tolist() == [3.0, 2.0]

    with pytest.raises(MacftError, match="neither a built-in"):
        load_reward("nonsense")
    with pytest.raises(MacftError, match="has no function 'missing'"):
        load_reward(f"{module}:missing")
    with pytest.raises(MacftError, match="importing no_such_module_xyz failed"):
        load_reward("no_such_module_xyz:f")
    with pytest.raises(MacftError, match=r"Reward 'exact_match=label' failed on train.jsonl:7 \(KeyError"):
        score(load_rewards(["exact_match=label"]), ["x"], [example], ["train.jsonl:7"])
    with pytest.raises(MacftError, match="has no function 'missing'"):
        load_rewards([f"{module}:missing"])  # loaded in the rewards' own process, refused in one line


def test_pair_and_prompt_lines_validate_with_one_line_errors(tmp_path, tiny_model_dir):
    good = tmp_path / "pairs.jsonl"
    write_jsonl(good, [
        PAIRS[0],
        {"system": "Be brief.", "prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello.", "rejected": "Go away."},
    ])
    pairs = read_records(good, parse_pair)
    assert pairs[0].chosen.kind == "completion" and pairs[1].chosen.kind == "chat"
    assert pairs[1].rejected.messages[0] == {"role": "system", "content": "Be brief."}
    assert pairs[1].rejected.messages[-1] == {"role": "assistant", "content": "Go away."}

    bad = tmp_path / "bad.jsonl"
    for line, message in [
        ({"prompt": "p", "chosen": "a"}, "line 2: missing 'rejected'"),
        ({"prompt": "p", "chosen": "a", "rejected": ""}, "line 2: 'rejected' is empty"),
        ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}, "assistant messages only"),
    ]:
        write_jsonl(bad, [PAIRS[0], line])
        with pytest.raises(MacftError, match=message):
            read_records(bad, parse_pair)
    write_jsonl(bad, [{"prompt": "p", "answer": 1}, {"answer": 2}])
    with pytest.raises(MacftError, match="bad.jsonl line 2: missing 'prompt'"):
        read_records(bad, parse_prompt)
    assert read_records(good, parse_prompt)[0].fields["chosen"] == " 1"  # every field reaches the rewards
    with pytest.raises(MacftError, match="preference pair"):
        read_records(good)  # an SFT run pointed at pairs says what to set


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_report(self, info):
        if info["step"] == self.step:
            raise KeyboardInterrupt


def test_dpo_run_reports_metrics_and_resumes_exactly(tiny_model_dir, tmp_path):
    data = tmp_path / "pairs"
    data.mkdir()
    write_jsonl(data / "train.jsonl", PAIRS[:16])
    write_jsonl(data / "valid.jsonl", PAIRS[16:])
    recipe = Recipe(name="t").replace(
        model={"path": str(tiny_model_dir)},
        data={"train": str(data), "max_seq_length": 64},
        method={"rank": 4, "dropout": 0.1},
        train={"objective": "dpo", "iters": 6, "batch_size": 4, "grad_accumulation": 2, "learning_rate": 1e-2,
               "report_every": 1, "eval_every": 2, "save_every": 2},
        output={"runs_dir": str(tmp_path / "runs")},
        demo={"count": 0},
    )
    whole = run_training(recipe.replace(output={"name": "whole"}))
    first = run_training(recipe.replace(output={"name": "cut"}), StopAt(3))
    assert first.result.stop_reason == "interrupted"
    resumed = run_training(recipe.replace(output={"name": "cut", "resume": str(first.run_dir)}))

    def rows(run):
        return [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]

    straight, pieced = rows(whole), rows(resumed)
    assert [(r["kind"], r["step"]) for r in pieced] == [(r["kind"], r["step"]) for r in straight]
    for a, b in zip(straight, pieced):
        for key in ("train_loss", "accuracy", "reward_margin", "chosen_logps", "val_loss", "val_accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), key
    train_rows = [r for r in straight if r["kind"] == "train"]
    assert train_rows[0]["accuracy"] == 0.5 and train_rows[0]["reward_margin"] == 0.0  # policy = reference at step 1
    assert train_rows[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-5)
    valid = [r for r in straight if r["kind"] == "valid"]
    assert valid[-1]["val_accuracy"] > 0.5 and valid[-1]["val_reward_margin"] > 0
    assert whole.summary.objective == "dpo" and "adapters switched off" in whole.summary.reference


def gguf_margins(path, prompts: list[list[int]], chosen: list[int], rejected: list[int]) -> np.ndarray:
    """log p(chosen) − log p(rejected) after each prompt, from llama.cpp's logits."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")
    model = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)

    def logp(ids: list[int], start: int) -> float:
        model.reset()
        model.eval(ids)
        logits = np.array(model.scores[: len(ids)], np.float64)
        logits -= np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) + logits.max(-1, keepdims=True)
        return float(sum(logits[i - 1, ids[i]] for i in range(start, len(ids))))

    return np.array([logp(p + chosen, len(p)) - logp(p + rejected, len(p)) for p in prompts])


def test_dpo_adapter_fuses_to_gguf_and_llama_cpp_prefers_the_chosen_answer(tiny_model_dir, tmp_path):
    from macft.export.pipeline import export_gguf

    loaded = load_model(str(tiny_model_dir))
    tokenizer = loaded.tokenizer
    prompts = [f"Q: is {i} even?" for i in range(8)]

    def pairs(chosen, rejected):
        return [{"prompt": p, "chosen": chosen, "rejected": rejected} for p in prompts]

    def margins(model, rows):
        logps = np.array(full_logit_logps(model, pair_batch(tokenizer, rows)))
        return logps[: len(prompts)] - logps[len(prompts) :]

    # Chosen is the answer the base model likes less, so training has to turn its preference around.
    chosen, rejected = " alpha", " omega"
    if margins(loaded.model, pairs(chosen, rejected)).mean() > 0:
        chosen, rejected = rejected, chosen
    base_margin = margins(loaded.model, pairs(chosen, rejected))
    assert (base_margin < 0).any()

    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, pairs(chosen, rejected))
    recipe = Recipe(name="t").replace(
        model={"path": str(tiny_model_dir)},
        data={"train": str(data), "max_seq_length": 32, "use_chat_template": False},
        method={"rank": 4, "target_modules": ("q_proj", "v_proj", "o_proj", "down_proj")},
        train={"objective": "dpo", "iters": 6, "batch_size": 4, "learning_rate": 2e-2, "report_every": 2, "save_every": 0},
        align={"beta": 0.5},
        output={"runs_dir": str(tmp_path / "runs"), "name": "dpo"},
        demo={"count": 0},
    )
    outcome = run_training(recipe)
    tuned_margin = margins(outcome.model, pairs(chosen, rejected))

    fused = tmp_path / "dpo.gguf"
    export_gguf(adapter=str(outcome.run_dir), quant="f16", out=fused, name="tiny")
    ids = [tokenizer.encode(p) for p in prompts]
    answer = [tokenizer.encode(a, add_special_tokens=False) for a in (chosen, rejected)]
    from_llama_cpp = gguf_margins(fused, ids, *answer)
    assert np.all(tuned_margin > 0), tuned_margin
    assert np.all(from_llama_cpp > 0), from_llama_cpp  # llama.cpp prefers the chosen answer after every prompt
    # The GGUF holds the fused weights in float16: margins of about 4 agree to within a few tenths.
    np.testing.assert_allclose(from_llama_cpp, tuned_margin, rtol=0.1, atol=0.1)


def test_grpo_run_samples_scores_and_reports(tiny_model_dir, tmp_path):
    data = tmp_path / "prompts"
    data.mkdir()
    rows = [{"prompt": f"Q: {i} plus one?", "answer": str(i + 1)} for i in range(10)]
    write_jsonl(data / "train.jsonl", rows[:8])
    write_jsonl(data / "valid.jsonl", rows[8:])
    recipe = Recipe(name="t").replace(
        model={"path": str(tiny_model_dir)},
        data={"train": str(data), "max_seq_length": 48, "use_chat_template": False},
        method={"rank": 4},
        train={"objective": "grpo", "iters": 2, "batch_size": 2, "learning_rate": 1e-2, "report_every": 1, "eval_every": 2},
        align={"group_size": 3, "max_completion_tokens": 4, "rewards": ["regex=\\d", "length_penalty=2"]},
        output={"runs_dir": str(tmp_path / "runs"), "name": "grpo"},
        demo={"count": 0},
    )
    outcome = run_training(recipe)
    rows = [json.loads(line) for line in (outcome.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 2 and all({"reward_mean", "reward_std", "kl", "completion_length"} <= set(r) for r in train_rows)
    assert all(0 < r["completion_length"] <= 4 and r["kl"] >= 0 for r in train_rows)
    valid = [r for r in rows if r["kind"] == "valid"][-1]
    assert valid["val_loss"] == pytest.approx(-valid["val_reward_mean"], abs=1e-6)  # checkpoints ranked by reward


def test_data_check_reports_pairs(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from macft.cli import cli

    folder = tmp_path / "pairs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", PAIRS[:6] + [{"prompt": "p", "chosen": " same", "rejected": " same"}, PAIRS[0]])
    args = ["data", "check", str(folder), "--model", str(tiny_model_dir), "--max-seq-length", "24", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    train = report["splits"]["train"]
    assert report["kind"] == "pairs" and train["pairs"] == 8
    assert train["identical"] == 1 and train["duplicates"] == 1
    assert train["truncated"] == 7 and train["dropped"] == 0  # the long rejected answers run past 24 tokens
    assert train["chosen_lengths"]["max"] < train["rejected_lengths"]["max"]


def test_demo_data_is_the_scripts_output_and_balanced(tmp_path):
    """The shipped demo data is what scripts/make_align_data.py writes, and in the preference pairs
    nothing but the rule (a European city: red) tells chosen from rejected: each colour is chosen in
    half the pairs, each named first in half of those, answers differ in the colour token alone."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, str(root / "scripts" / "make_align_data.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    for folder in ("prefer-city", "grpo-age"):
        for split in ("train", "valid", "test"):
            assert (tmp_path / folder / f"{split}.jsonl").read_text() == (root / "recipes" / "data" / folder / f"{split}.jsonl").read_text()
    sys.path.insert(0, str(root / "scripts"))
    try:
        from make_align_data import ELSEWHERE, EUROPEAN
    finally:
        sys.path.remove(str(root / "scripts"))
    for split in ("train", "valid", "test"):
        rows = [json.loads(line) for line in (root / "recipes" / "data" / "prefer-city" / f"{split}.jsonl").read_text().splitlines()]
        cells = Counter((row["chosen"], row["prompt"].index(" red ") < row["prompt"].index(" blue ")) for row in rows)
        assert set(cells.values()) == {len(rows) // 4} and len(cells) == 4
        for row in rows:
            city = next(c for c in EUROPEAN + ELSEWHERE if c in row["prompt"])
            assert row["chosen"] == (" red team." if city in EUROPEAN else " blue team.")
            assert row["rejected"] == row["chosen"].replace(" red", " BLUE").replace(" blue", " red").replace("BLUE", "blue")
