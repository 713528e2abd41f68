"""The memory planner against measured MLX peaks, config/GGUF shape reading, and `macft estimate`."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes

from macft.cli import cli
from macft.backend import detect
from macft.config import MethodConfig, Recipe
from macft.families import FAMILIES
from macft.methods import apply_method
from macft.memory import Plan, backend_settings, estimate, step_budget
from macft.models.shape import ModelShape, read_model_shape, shape_from_config
from macft.train.plan import memory_plan
from macft.units import GIB
from macft.models.random_init import family_config

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def build(family: str, hidden: int, layers: int, vocab: int):
    config = family_config(family, vocab, hidden=hidden, layers=layers)
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    # As mlx_lm.load does: a checkpoint without lm_head.weight ties the output to the embeddings.
    weights = {k: v for k, v in tree_flatten(model.parameters()) if k != "lm_head.weight" or not shape_from_config(config).tied_embeddings}
    weights = model.sanitize(weights) if hasattr(model, "sanitize") else weights
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model, config


def measured_peak(family, method, hidden, layers, vocab, batch, seq, chunk, grad_checkpoint, budget="trainer") -> int:
    """Peak bytes of a real training step above what was live before the model was built.

    With ``chunk`` set, the step is the trainer's own (``macft.train.loop.Steps`` compiled, with
    ``SupervisedLoss``, gradient clipping, AdamW, ``enable_grad_checkpoint`` and the memory limit the
    trainer holds, ``step_budget``; ``budget`` None holds none, a function ``(batch, length) ->
    bytes`` holds that one instead); with None, a
    plain ``nn.value_and_grad`` of a cross-entropy over the full logits and an AdamW update. The
    model is adapted by ``macft.methods.apply_method``, its base quantized to 4 bits for QLoRA the
    way ``load_model(quantize_bits=4)`` does.
    """
    from macft.data import Batch
    from macft.train.loop import Steps, enable_grad_checkpoint, kept_memory_limit, one_step
    from macft.models.head import auto_chunk_size
    from macft.objectives.sft import SupervisedLoss

    mx.clear_cache()
    before = mx.get_active_memory()
    model, _ = build(family, hidden, layers, vocab)
    if method == "qlora":
        nn.quantize(model, group_size=64, bits=4, class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
    model = apply_method(model, MethodConfig(name="full" if method == "full" else "lora", rank=8, target_modules=ATTENTION))
    if grad_checkpoint:
        enable_grad_checkpoint(model)
    mx.eval(model.parameters())
    optimizer = optim.AdamW(learning_rate=1e-4)
    tokens = mx.random.randint(0, vocab, (batch, seq + 1))
    inputs, targets, mask = tokens[:, :-1], tokens[:, 1:], mx.ones((batch, seq))

    if chunk is None:

        def loss_fn(m):
            logits = m(inputs).astype(mx.float32)
            return (nn.losses.cross_entropy(logits, targets) * mask).sum() / mask.sum()

        plain = nn.value_and_grad(model, loss_fn)

        def step():
            loss, grads = plain(model)
            optimizer.update(model, grads)
            mx.eval(loss, model.parameters(), optimizer.state)
    else:
        loss = SupervisedLoss(auto_chunk_size(vocab, chunk))
        shape, plan = case_plan(family, method, hidden, layers, vocab, batch, seq, chunk, grad_checkpoint)
        memory_budget = step_budget(shape, plan) if budget == "trainer" else budget
        steps = Steps(model, optimizer, loss, grad_clip=1.0, compile=True, memory_budget=memory_budget)
        data = Batch(inputs, targets, mask, None, batch * seq, 0.0)

        def step():
            loss_sum = one_step(steps, iter([data]), loss, 1)[0]
            assert np.isfinite(loss_sum.item())

    with kept_memory_limit():
        for _ in range(3):  # from the second step on, the optimizer's moments are in place: the steady state
            mx.reset_peak_memory()
            step()
    return mx.get_peak_memory() - before


def case_plan(family, method, hidden, layers, vocab, batch, seq, chunk, grad_checkpoint) -> tuple[ModelShape, Plan]:
    shape = shape_from_config(family_config(family, vocab, hidden=hidden, layers=layers))
    plan = Plan(method=method, batch=batch, seq=seq, loss_chunk_size=chunk, grad_checkpoint=grad_checkpoint, **backend_settings())
    return shape, plan


# family, method, hidden, layers, vocab, batch, seq, loss chunk (None = plain loss), grad checkpointing
CASES = [
    ("llama", "lora", 256, 4, 32000, 2, 128, None, False),
    ("llama", "qlora", 256, 4, 32000, 4, 128, 0, False),
    ("llama", "full", 384, 4, 16000, 2, 256, 0, True),
    ("gemma3", "qlora", 256, 4, 32000, 4, 128, 0, False),
    ("gemma3", "lora", 256, 4, 32000, 2, 256, 128, True),
    ("qwen3", "full", 256, 3, 8000, 2, 192, 0, False),
    ("llama", "lora", 512, 4, 4096, 4, 256, 0, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_prediction_within_20_percent_of_measured_peak(case):
    measured = measured_peak(*case)
    shape, plan = case_plan(*case)
    predicted = estimate(shape, plan, available_bytes=64 * GIB).total_bytes
    assert abs(predicted - measured) / measured < 0.20, (predicted, measured)


def test_memory_budget_holds_a_step_below_its_free_peak():
    """MLX schedules (and allocates) a QLoRA loss's vocabulary slices ahead of computing them; under
    a budget below that free peak the trainer's step waits instead and lands near the budget. The
    trainer's own budget leaves headroom above the prediction, so an ordinary step never waits."""
    case = CASES[1]
    assert case[1] == "qlora"
    free = measured_peak(*case, budget=None)
    held = measured_peak(*case, budget=lambda batch, length: int(0.7 * free))
    assert held < 0.85 * free
    predicted = estimate(*case_plan(*case), available_bytes=64 * GIB).total_bytes
    assert step_budget(*case_plan(*case))(case[5], case[6]) > 1.1 * max(predicted, free)


def test_shape_from_model_dir_and_gguf_agree(tmp_path, tiny_model_dir):
    import gguf

    shape = read_model_shape(str(tiny_model_dir))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert (shape.hidden, shape.layers, shape.vocab, shape.kv_heads) == (
        config["hidden_size"], config["num_hidden_layers"], config["vocab_size"], config["num_key_value_heads"]
    )
    # The parameter count the planner derives from the config equals the real model's.
    model, _ = build("llama", config["hidden_size"], config["num_hidden_layers"], config["vocab_size"])
    assert shape.params == sum(v.size for _, v in tree_flatten(model.parameters()))

    # The same shape written as GGUF metadata (llama.cpp's key names) reads back identically.
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_token_list([f"t{i}" for i in range(shape.vocab)])
    writer.add_tensor("token_embd.weight", np.zeros((shape.vocab, shape.hidden), dtype=np.float16))
    writer.add_tensor("output.weight", np.zeros((shape.vocab, shape.hidden), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from_gguf = read_model_shape(str(path))
    for key in ("hidden", "layers", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "tied_embeddings"):
        assert getattr(from_gguf, key) == getattr(shape, key), key


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parameter_count_is_the_loaded_models(family):
    """Every family, those whose blocks differ from the common one (Gemma 4's per-layer embeddings,
    Qwen3.5's linear attention) included: the planner's count is the loaded model's."""
    model, config = build(family, 64, 2, 512)
    mx.random.seed(7)
    assert shape_from_config(config).params == sum(v.size for _, v in tree_flatten(model.parameters()))
    # Counting built the model lazily; MLX's generator is where it was, so seeded runs draw the same.
    drawn = mx.random.normal((4,))
    mx.random.seed(7)
    assert mx.array_equal(drawn, mx.random.normal((4,)))


def test_planning_for_a_mac_does_not_count_this_machines_polynomial_exp():
    """The polynomial exp's extra blocks belong to the backend the plan is for, not the one planning."""
    from macft.memory import FROZEN_HEAD_BLOCK_COPIES, MAC_SETTINGS
    from macft.models.head import auto_vocab_slice

    shape = shape_from_config(family_config("gemma3", 262144, hidden=256, layers=2))
    plan = Plan(method="lora", batch=2, seq=128, **MAC_SETTINGS)
    block = 256 * auto_vocab_slice(262144, 256) * 4
    assert estimate(shape, plan, available_bytes=64 * GIB).parts["logits"] == int(block * FROZEN_HEAD_BLOCK_COPIES)
    cpu = estimate(shape, Plan(method="lora", batch=2, seq=128, compute_bytes=2, polynomial_exp=True), available_bytes=64 * GIB)
    assert cpu.parts["logits"] > int(block * FROZEN_HEAD_BLOCK_COPIES)


def test_embedded_default_shape_is_gemma3_270m():
    shape = read_model_shape("gemma3-270m")
    assert (shape.family, shape.hidden, shape.layers, shape.vocab) == ("gemma3", 640, 18, 262144)
    assert 260e6 < shape.params < 275e6
    assert shape.stored_bits is not None and shape.stored_bits < 8  # Q4_K_M


def test_logits_note_only_where_the_batch_logits_are_held():
    """A 262k vocabulary on a small model: the plain loss holds batch × seq × vocab logits and says
    so; macft's sliced loss holds one block, so the advice to shrink the batch would be wrong."""
    shape = shape_from_config(family_config("gemma3", 262144, hidden=256, layers=2))
    plain = estimate(shape, Plan(method="lora", batch=4, seq=512, loss_chunk_size=None), available_bytes=64 * GIB)
    sliced = estimate(shape, Plan(method="lora", batch=4, seq=512), available_bytes=64 * GIB)
    assert any("copy of the logits" in note for note in plain.notes)
    assert not any("copy of the logits" in note for note in sliced.notes)
    assert sliced.parts["logits"] < plain.parts["logits"] / 10


def test_suggestions_fix_a_plan_that_does_not_fit():
    shape = shape_from_config(family_config("llama", 32000, hidden=256, layers=4))
    plan = Plan(method="lora", batch=16, seq=1024)
    est = estimate(shape, plan, available_bytes=GIB)
    assert not est.fits and est.suggestions
    assert any("batch" in s for s in est.suggestions)
    # Each suggested batch size really fits.
    smaller = estimate(shape, Plan(method="lora", batch=1, seq=1024), available_bytes=GIB)
    assert smaller.fits


def test_estimate_cli_json_and_table(tiny_model_dir):
    runner = CliRunner()
    result = runner.invoke(cli, ["estimate", "--model", str(tiny_model_dir), "--method", "qlora", "--batch", "2", "--seq", "64", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["total_bytes"] == sum(data["parts"].values()) and data["fits"] is True
    table = runner.invoke(cli, ["estimate", "--model", str(tiny_model_dir), "--method", "lora", "--batch", "64", "--seq", "4096", "--memory", "1"])
    assert table.exit_code == 0, table.output
    assert "does not fit" in table.output.lower() and "batch" in table.output
    missing = runner.invoke(cli, ["estimate", "--model", "no/such-model-here"])
    assert missing.exit_code == 1 and "Error:" in missing.output


def test_settle_plans_the_loaded_model_and_recipe(tiny_model_dir, tmp_path):
    from macft.config import Recipe
    from macft.train.distributed import World
    from macft.train.plan import settle

    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": " b"}\n' * 4)
    recipe = Recipe().replace(
        model={"path": str(tiny_model_dir), "quantize_bits": 4}, train={"batch_size": 2}, data={"max_seq_length": 64, "train": str(tmp_path)}
    )
    plan = settle(recipe, World())
    assert plan.memory == memory_plan(plan.recipe) and plan.memory.method == "qlora"
    assert plan.estimate.total_bytes == estimate(read_model_shape(str(tiny_model_dir)), plan.memory).total_bytes
    assert plan.estimate.fits
    assert plan.recipe.train.iters == 2 and plan.recipe.train.learning_rate == 2e-4
    # A quantized base that a CPU dequantizes for its matmuls keeps one lane (each lane would dequantize it again).
    assert plan.recipe.train.lanes == (1 if detect().dequantize_for_matmul else min(detect().lanes, 2))


def measured_dpo_peak(method: str, hidden: int, layers: int, vocab: int, pairs: int, seq: int) -> int:
    """Peak bytes of real DPO steps (the trainer's compiled step and ``PreferenceLoss``) above what was
    live before the models were built, with the frozen reference copy that full fine-tuning loads."""
    from macft.data import Batch
    from macft.objectives import OBJECTIVES, AlignConfig
    from macft.objectives.base import LossContext
    from macft.train.loop import Steps, kept_memory_limit, one_step
    from macft.models.head import auto_chunk_size

    mx.clear_cache()
    before = mx.get_active_memory()
    model, _ = build("llama", hidden, layers, vocab)
    reference = None
    if method == "full":
        reference, _ = build("llama", hidden, layers, vocab)
        reference.freeze()
    model = apply_method(model, MethodConfig(name=method, rank=8, target_modules=ATTENTION))
    mx.eval(model.parameters())
    loss = OBJECTIVES["dpo"].loss(LossContext(model, AlignConfig(), None, auto_chunk_size(vocab), reference))
    steps = Steps(model, optim.AdamW(learning_rate=1e-4), loss, grad_clip=1.0, compile=True)
    # Rows 0..pairs-1 are the chosen answers, the rest the rejected ones; the last half of each row is trained.
    tokens = mx.random.randint(0, vocab, (2 * pairs, seq + 1))
    mask = mx.concatenate([mx.zeros((2 * pairs, seq // 2)), mx.ones((2 * pairs, seq - seq // 2))], axis=1)
    data = Batch(tokens[:, :-1], tokens[:, 1:], mask, None, int(mask.sum().item()), 0.0)
    with kept_memory_limit():
        for _ in range(3):
            mx.reset_peak_memory()
            assert np.isfinite(one_step(steps, iter([data]), loss, 1)[0].item())
    return mx.get_peak_memory() - before


@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_prediction_counts_the_reference_copy_of_full_fine_tuning(method):
    """DPO scores 2 rows a pair; with full fine-tuning it also holds a frozen copy of the base, which
    the plan must count (and must not count for LoRA, whose reference is the base with adapters off)."""
    hidden, layers, vocab, pairs, seq = 256, 2, 8000, 2, 32
    measured = measured_dpo_peak(method, hidden, layers, vocab, pairs, seq)
    shape = shape_from_config(family_config("llama", vocab, hidden=hidden, layers=layers))
    recipe = Recipe().replace(method={"name": method}, train={"objective": "dpo", "batch_size": pairs}, data={"max_seq_length": seq})
    plan = memory_plan(recipe)
    predicted = estimate(shape, plan, available_bytes=64 * GIB)
    assert plan.rank_batch == 2 * pairs
    assert abs(predicted.total_bytes - measured) / measured < 0.20, (predicted.parts, measured)
    sft_rows = estimate(shape, Plan(method=method, batch=2 * pairs, seq=seq, **backend_settings()), available_bytes=64 * GIB)
    if method == "full":
        # The frozen copy is the whole model again, and leaving it out would miss the measured peak.
        assert predicted.parts["reference"] == shape.params * plan.compute_bytes
        assert predicted.total_bytes - sft_rows.total_bytes == predicted.parts["reference"]
        assert abs(predicted.total_bytes - measured) / measured < 0.10
        assert sft_rows.total_bytes < 0.90 * measured
        assert any("frozen copy" in note for note in predicted.notes)
    else:
        assert "reference" not in predicted.parts and predicted.total_bytes == sft_rows.total_bytes


def test_estimate_cli_objective(tiny_model_dir):
    runner = CliRunner()

    def parts(*options):
        result = runner.invoke(cli, ["estimate", "--model", str(tiny_model_dir), "--batch", "2", "--seq", "64", "--json", *options])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["parts"]

    full_dpo, full_sft = parts("--method", "full", "--objective", "dpo"), parts("--method", "full")
    assert full_dpo["reference"] == full_dpo["trainable"] and "reference" not in full_sft
    assert "reference" not in parts("--method", "lora", "--objective", "dpo")
    assert "reference" not in parts("--method", "full", "--objective", "simpo")  # reference-free
