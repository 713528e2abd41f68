"""Long sequences end to end: the memory planner's choices for a budget, its refusals before any
weight loads, bounded planning work on absurd sizes, and a run that trains in attention blocks."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from macft import memory
from macft.cli import cli
from macft.config import load_recipe
from macft.errors import MacftError
from macft.memory import Freedom, Plan, choose_settings, estimate, fitting_limits
from macft.methods import MethodConfig
from macft.models.random_init import family_config
from macft.models.shape import shape_from_config
from macft.train import plan as run_plan
from macft.train.plan import config_shape, fit_budget, memory_plan
from macft.units import GIB, size_bytes

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def gemma_270m_shape():
    """Gemma 3 270M's shape (its config), held in float32 as `macft lora` holds it on a CPU."""
    config = family_config("gemma3", 262144, hidden=640, layers=18)
    config.update(intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6)
    return shape_from_config(config, name="gemma-270m-shaped")


def long_plan(seq: int, batch: int = 1, **changes) -> Plan:
    return Plan(method="lora", batch=batch, seq=seq, settings=MethodConfig(rank=8, target_modules=ALL_LINEAR), compute_bytes=4, **changes)


def test_a_plan_that_fits_is_left_alone(gemma_270m_shape):
    choice = choose_settings(gemma_270m_shape, long_plan(256), 16 * GIB)
    assert choice.plan == long_plan(256) and choice.accumulation == 1 and not choice.reasons


@pytest.mark.parametrize("seq", [4096, 8192, 16384, 32768])
def test_the_cheapest_settings_that_fit_16_gib(gemma_270m_shape, seq):
    """Block attention from 1,024 tokens on (cheaper on a CPU), checkpointing only once it is needed:
    every option the planner ranks cheaper than its choice does not fit."""
    budget = 16 * GIB
    choice = choose_settings(gemma_270m_shape, long_plan(seq), budget)
    assert choice.estimate.fits and choice.plan.attention_block
    assert choice.reasons[0].startswith(f"attention in blocks of {choice.plan.attention_block} queries")
    if choice.plan.grad_checkpoint:
        assert not estimate(gemma_270m_shape, dataclasses.replace(choice.plan, grad_checkpoint=False), budget).fits
        assert any("checkpointing" in reason for reason in choice.reasons)
    if seq >= 8192:  # without either, fused attention's L × L scores alone are past the budget
        assert not estimate(gemma_270m_shape, dataclasses.replace(choice.plan, attention_block=None, grad_checkpoint=False), budget).fits


def test_micro_batches_before_checkpointing_and_qlora_only_when_allowed(gemma_270m_shape):
    plan = long_plan(2048, batch=8)
    budget = estimate(gemma_270m_shape, dataclasses.replace(plan, batch=2, attention_block=256), 64 * GIB).total_bytes + GIB // 8
    choice = choose_settings(gemma_270m_shape, plan, budget)
    assert (choice.plan.batch, choice.accumulation, choice.plan.grad_checkpoint) == (2, 4, False)
    assert any("micro-batches of 2 rows, 4 accumulated" in reason for reason in choice.reasons)

    tight = estimate(gemma_270m_shape, dataclasses.replace(plan, batch=1, grad_checkpoint=True, attention_block=16), 64 * GIB).total_bytes - GIB // 8
    assert not choose_settings(gemma_270m_shape, plan, tight).estimate.fits
    allowed = choose_settings(gemma_270m_shape, plan, tight, Freedom(quantize=True))
    assert allowed.estimate.fits and allowed.plan.quantize_bits == 4 and any("QLoRA" in r for r in allowed.reasons)


def test_settings_the_recipe_fixed_are_kept(gemma_270m_shape):
    plan = long_plan(32768, grad_checkpoint=False, attention_block=None)
    choice = choose_settings(gemma_270m_shape, plan, 16 * GIB, Freedom(checkpoint=False, attention=False))
    assert not choice.estimate.fits
    assert (choice.plan.grad_checkpoint, choice.plan.attention_block) == (False, None)


def test_fitting_limits_are_the_edge(gemma_270m_shape):
    budget = 16 * GIB
    longest, largest = fitting_limits(gemma_270m_shape, long_plan(10**9, batch=4), budget)
    assert largest is None  # no batch fits a billion tokens
    assert choose_settings(gemma_270m_shape, long_plan(longest, batch=4), budget).estimate.fits
    assert not choose_settings(gemma_270m_shape, long_plan(longest + 1, batch=4), budget).estimate.fits


def test_planning_absurd_sizes_is_bounded_work(monkeypatch):
    """#27: `estimate --seq 1000000` and `--batch 100000000` hung (each suggestion estimated every
    other suggestion again, exponentially); now a bounded number of estimates answers each."""
    calls = []
    real = memory.estimate

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1000:  # fail rather than hang when the work runs away
            raise RuntimeError("runaway planning")
        return real(*args, **kwargs)

    monkeypatch.setattr(memory, "estimate", counted)
    runner = CliRunner()
    for options in (["--seq", "1000000"], ["--batch", "100000000"], ["--batch", "8", "--seq", "131072"]):
        calls.clear()
        result = runner.invoke(cli, ["estimate", *options])
        assert result.exit_code == 0, result.output
        assert "does not fit" in result.output.lower()
        assert len(calls) < 200, (options, len(calls))


def write_rows(folder, rows: int, words: int):
    folder.mkdir(parents=True, exist_ok=True)
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * (words // 9))
    for split in ("train", "valid"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(rows)))
    return folder


def test_a_run_that_cannot_fit_is_refused_before_loading_weights(tiny_model_dir, tmp_path, monkeypatch):
    """#27: `lora --set data.max_seq_length=10000000000` hung; the planner refuses it from the config
    alone, in one line naming the longest length and the largest batch that fit."""
    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(run_plan, "load_model", no_loading)
    data = write_rows(tmp_path / "data", 4, 40)
    result = CliRunner().invoke(cli, ["lora", "--model", str(tiny_model_dir), "--data", str(data), "--set", "data.max_seq_length=10000000000",
                                      "--memory-budget", "2GiB", "--out-dir", str(tmp_path / "runs")])
    assert result.exit_code == 1
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "2.00 GiB memory budget" in message and "fits up to" in message
    assert "not even batch 1 fits" in message
    assert not (tmp_path / "runs").exists()  # nor was a run folder made


def test_recipe_gets_the_planners_settings(tiny_model_dir):
    recipe = load_recipe("quickstart", [f"model.path={tiny_model_dir}", "model.dequantize=false", "data.max_seq_length=8192", "train.batch_size=4"])
    tight = estimate(config_shape(recipe), dataclasses.replace(memory_plan(recipe), batch=1, attention_block=512), 64 * GIB)
    recipe = recipe.replace(train={"memory_budget": f"{tight.total_bytes + 2**20}B"})
    planned, choice = fit_budget(recipe)
    assert planned.train.attention_block == choice.plan.attention_block > 0
    assert planned.train.batch_size * planned.train.grad_accumulation == 4 * recipe.train.grad_accumulation
    assert planned.train.grad_checkpoint is choice.plan.grad_checkpoint
    assert choice.estimate.total_bytes <= size_bytes(recipe.train.memory_budget)
    # Settings the recipe fixed stay; a resumed run (its saved recipe holds the choice) plans the same.
    again, _ = fit_budget(planned)
    assert again.train == planned.train
    with pytest.raises(MacftError, match="memory budget"):
        fit_budget(recipe.replace(train={"attention_block": -1, "grad_checkpoint": False}))


@pytest.mark.parametrize(
    "text,size",
    [("16GiB", 16 * GIB), ("12GB", 12 * 10**9), ("5.5G", int(5.5 * GIB)), ("800MiB", 800 * 2**20), (" 2 gib ", 2 * GIB), ("1024", 1024)],
)
def test_sizes_read_as_people_write_them(text, size):
    assert size_bytes(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "16 parsecs", "-1GiB", "1e9", "inf", "nan"])
def test_what_is_not_a_size_is_refused(text):
    with pytest.raises(ValueError):
        size_bytes(text)


def test_a_memory_budget_that_is_not_a_size_is_one_line(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "data", 2, 40)
    result = CliRunner().invoke(cli, ["lora", "--model", str(tiny_model_dir), "--data", str(data), "--memory-budget", "lots"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1 and "train.memory_budget must be a size such as 16GiB" in result.output


def test_prefix_tuning_keeps_mlx_attention(tiny_model_dir):
    """Prefix tuning hands every layer its own cache of virtual keys: the planner leaves its attention alone."""
    recipe = load_recipe("quickstart", [f"model.path={tiny_model_dir}", "model.dequantize=false", "data.max_seq_length=2048", "method.name=prefix"])
    planned, _ = fit_budget(recipe)
    assert planned.train.attention_block == -1
    lora, _ = fit_budget(recipe.replace(method={"name": "lora"}))
    assert lora.train.attention_block > 0


def test_a_long_run_trains_in_blocks_and_records_the_choice(tiny_model_dir, tmp_path):
    """From 1,024 tokens on the planner picks block attention; the run's recipe.yaml records the settled
    choice (no setting left open) and the summary says the model trained that way."""
    data = write_rows(tmp_path / "data", 2, 1400)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli, ["lora", "--model", str(tiny_model_dir), "--data", str(data), "--iters", "1", "--batch-size", "1",
                                      "--set", "data.max_seq_length=1100", "--memory-budget", "4GiB", "--out-dir", str(runs), "--name", "long", "--json"])
    assert result.exit_code == 0, result.output
    saved = load_recipe(runs / "long" / "recipe.yaml")
    assert saved.train.attention_block > 0 and saved.train.grad_checkpoint is False and saved.train.memory_budget == "4GiB"
    summary = json.loads((runs / "long" / "summary.json").read_text())
    assert any(f"attention in blocks of {saved.train.attention_block} queries" in path for path in summary["fast_paths"])
