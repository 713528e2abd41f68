"""The training engine: chunked loss vs numpy, schedules, methods that learn, exact resume,
early stopping with the best checkpoint, NaN handling."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from macft.backend import BlasThreads, detect
from macft.config import MethodConfig, Recipe, TrainConfig, load_recipe
from macft.data import Example, iterate_batches
from macft.methods import apply_method
from macft.methods.lora import LoRALinear
from macft.models.load import load_model
from macft.train.checkpoint import Checkpoints
from macft.train.loop import Callback, evaluate, train
from macft.train.plan import lane_count
from macft.models.head import full_logits_losses, position_losses, selected_positions
from macft.objectives.sft import SupervisedLoss, supervised_loss
from macft.train.run import run_training
from macft.train.schedule import build_schedule


def random_examples(n: int, seed: int = 0, length: int = 18, prompt: int = 6) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [
        Example(tokens=[2, *rng.integers(10, 300, length - 1).tolist()], mask=[False] * prompt + [True] * (length - prompt))
        for _ in range(n)
    ]


def numpy_loss(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    peak = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - peak).sum(-1)) + peak[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float(((lse - picked) * mask).sum() / mask.sum())


@pytest.mark.parametrize("family,bits", [("llama", None), ("qwen3", None), ("gemma3", None), ("qwen3_5", None), ("llama", 4)])
def test_chunked_loss_matches_numpy_and_full_logits(tiny_models, family, bits):
    """A frozen head (plain, tied or quantized) through the chunks with the custom backward."""
    mx.random.seed(0)
    model = apply_method(load_model(str(tiny_models[family]), quantize_bits=bits).model, MethodConfig(rank=4))
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = 0.2 * mx.random.normal(m.lora_b.shape)
    batch = next(iterate_batches(random_examples(3, length=40, prompt=9), 3, 64))
    chunk = 16  # 93 trained positions -> several chunks and a padded tail
    vocab_slice = 100  # several vocabulary slices with a shorter last one (and one slice in SupervisedLoss)
    assert model.model.embed_tokens.weight.shape[0] % vocab_slice
    arrays = (batch.inputs, *reorder(selected_positions(batch.targets, batch.loss_mask)))
    loss_sum, tokens = supervised_loss(model, *arrays, chunk_size=chunk, vocab_slice=vocab_slice)
    expected = numpy_loss(np.array(model(batch.inputs)), np.array(batch.targets), np.array(batch.loss_mask))
    assert tokens.item() == batch.num_tokens
    assert abs(loss_sum.item() / tokens.item() - expected) < 1e-5
    loss_fn = SupervisedLoss(chunk)
    evaluated, _ = loss_fn.evaluate(model, *loss_fn.prepare(batch))  # validation's gradient-free path
    assert abs(evaluated.item() / tokens.item() - expected) < 1e-5

    def grads(fn):
        return dict(tree_flatten(nn.value_and_grad(model, lambda *a: fn(model, *a)[0])(*arrays)[1]))

    chunked = grads(lambda m, *a: supervised_loss(m, *a, chunk_size=chunk, vocab_slice=vocab_slice))
    full = grads(lambda m, *a: (full_logits_losses(m, *a).sum(),))
    assert chunked.keys() == full.keys() and chunked
    for name in chunked:
        reference = np.array(full[name])
        # Gradients of a sum over ~90 tokens: float32 rounding scales with their size.
        np.testing.assert_allclose(np.array(chunked[name]), reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())


def test_quantized_head_slices_through_quantized_matmul(tiny_models, monkeypatch):
    """On Metal/CUDA the head's slices go through quantized_matmul instead of a dequantized copy:
    the same loss and gradients as the CPU's dequantize-then-matmul path."""
    import dataclasses

    from macft.models import head as losses

    mx.random.seed(0)
    model = apply_method(load_model(str(tiny_models["llama"]), quantize_bits=4).model, MethodConfig(rank=4))
    batch = next(iterate_batches(random_examples(3, length=40, prompt=9), 3, 64))
    arrays = (batch.inputs, *reorder(selected_positions(batch.targets, batch.loss_mask)))

    def loss_and_grads():
        fn = nn.value_and_grad(model, lambda *a: supervised_loss(model, *a, chunk_size=32, vocab_slice=128)[0])
        loss, grads = fn(*arrays)
        return loss.item(), dict(tree_flatten(grads))

    dequantized = loss_and_grads()
    gpu_like = dataclasses.replace(losses.detect(), dequantize_for_matmul=False)
    monkeypatch.setattr(losses, "detect", lambda: gpu_like)
    quantized = loss_and_grads()
    assert abs(quantized[0] - dequantized[0]) < 1e-3 * abs(dequantized[0])
    for name, reference in dequantized[1].items():
        reference = np.array(reference)
        np.testing.assert_allclose(np.array(quantized[1][name]), reference, rtol=1e-3, atol=1e-4 * np.abs(reference).max())


def test_polynomial_exp_matches_float64_exp():
    """The CPU's polynomial exp against numpy's float64 exp over its whole domain (x <= 0): within
    3e-7 relative where the result is a normal float, exactly 0 where it underflows, never inf or NaN."""
    from macft.models.head import exp_nonpositive

    x = np.concatenate([
        -np.geomspace(1e-9, 87.0, 200_000), np.linspace(-87.3, 0.0, 300_001),  # tiny, and every size up to the edge
        [0.0, -0.0, -87.5, -87.7, -88.0, -88.5, -100.0, -1e30, -np.inf],
    ]).astype(np.float32)
    got = np.array(exp_nonpositive(mx.array(x))).astype(np.float64)
    expected = np.exp(x.astype(np.float64))
    assert np.isfinite(got).all() and (got >= 0).all()
    normal = expected > np.finfo(np.float32).tiny
    assert np.max(np.abs(got[normal] / expected[normal] - 1)) < 3e-7
    assert (got[x <= -87.7] == 0).all()
    assert got[x == 0][0] == 1.0


@pytest.mark.parametrize("scalar_transcendentals", [False, True])
def test_frozen_head_loss_and_hidden_gradient_match_float64(monkeypatch, scalar_transcendentals):
    """The sliced head's losses and d(loss)/d(hidden) with either exp (mx.exp on Metal/CUDA, the
    polynomial on CPUs), against float64 numpy on a random head whose logits span more than exp's
    float32 range (so some terms underflow to 0) and rows weighted unequally."""
    import dataclasses

    from macft.backend import detect
    from macft.models import head as losses

    backend = dataclasses.replace(detect(), scalar_transcendentals=scalar_transcendentals)
    monkeypatch.setattr(losses, "detect", lambda: backend)
    rng = np.random.default_rng(0)
    vocab, dims, rows = 1000, 32, 24
    weight = rng.normal(0, 1, (vocab, dims)).astype(np.float32)
    hidden = rng.normal(0, 1, (rows, dims)).astype(np.float32) * np.linspace(0.1, 4.0, rows, dtype=np.float32)[:, None]
    targets = rng.integers(0, vocab, rows).astype(np.int32)
    weights = rng.uniform(0, 2, rows).astype(np.float32)
    weights[:3] = 0  # padding entries
    head = nn.Linear(dims, vocab, bias=False)
    head.weight = mx.array(weight)
    head.freeze()
    loss_fn = losses.frozen_head_loss(head, vocab_slice=256)  # three full slices and a short one
    cotangent = rng.uniform(-1, 2, rows).astype(np.float32)
    got_losses = loss_fn(mx.array(hidden), mx.array(targets), mx.array(weights))
    got_grad = mx.grad(lambda h: (loss_fn(h, mx.array(targets), mx.array(weights)) * mx.array(cotangent)).sum())(mx.array(hidden))

    logits = hidden.astype(np.float64) @ weight.astype(np.float64).T
    assert (logits.max(-1) - logits.min(-1)).max() > 150  # far beyond float32 exp's range of about 88
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    lse = np.log(shifted.sum(-1)) + logits.max(-1)
    expected = (lse - logits[np.arange(rows), targets]) * weights
    softmax = shifted / shifted.sum(-1, keepdims=True)
    softmax[np.arange(rows), targets] -= 1
    expected_grad = (cotangent * weights)[:, None] * (softmax @ weight.astype(np.float64))
    np.testing.assert_allclose(np.array(got_losses), expected, rtol=2e-6, atol=1e-5)
    np.testing.assert_allclose(np.array(got_grad), expected_grad, rtol=1e-5, atol=1e-5 * np.abs(expected_grad).max())


def reorder(selected):
    targets, weights, select = selected
    return select, targets, weights


@pytest.mark.parametrize("method", ["lora", "full"])
def test_position_losses_match_numpy_per_position(tiny_models, method):
    """Per-position losses (what alignment objectives sum per answer) through several chunks, and the
    gradient of an unequally weighted sum of them, against the full logits: the frozen head's custom
    backward must scale each row by its own cotangent, the trainable head's checkpointed chunks too."""
    mx.random.seed(1)
    model = apply_method(load_model(str(tiny_models["qwen3"])).model, MethodConfig(name=method, rank=4))
    batch = next(iterate_batches(random_examples(3, length=30, prompt=7), 3, 64))
    arrays = (batch.inputs, *reorder(selected_positions(batch.targets, batch.loss_mask)))
    losses = position_losses(model, *arrays, chunk_size=16, vocab_slice=100)
    logits = np.array(model(batch.inputs)).reshape(-1, model.model.embed_tokens.weight.shape[0]).astype(np.float64)
    select, targets, weights = (np.array(a) for a in arrays[1:])
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    expected = (lse[select] - logits[select, targets]) * weights
    np.testing.assert_allclose(np.array(losses), expected, rtol=1e-4, atol=1e-5)

    scale = mx.array(np.random.default_rng(0).uniform(-1, 2, losses.shape[0]).astype(np.float32))

    def grads(fn):
        return dict(tree_flatten(nn.value_and_grad(model, lambda *a: (fn(model, *a) * scale).sum())(*arrays)[1]))

    chunked = grads(lambda m, *a: position_losses(m, *a, chunk_size=16, vocab_slice=100))
    full = grads(full_logits_losses)
    assert chunked.keys() == full.keys() and chunked
    for name in chunked:
        reference = np.array(full[name])
        np.testing.assert_allclose(np.array(chunked[name]), reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())


def test_full_finetuning_gets_tied_head_gradient(tiny_models):
    """Through the checkpointed chunks, a trainable tied embedding still gets its head gradient."""
    model = apply_method(load_model(str(tiny_models["qwen3"])).model, MethodConfig(name="full"))
    batch = next(iterate_batches(random_examples(2), 2, 64))
    arrays = (batch.inputs, *reorder(selected_positions(batch.targets, batch.loss_mask)))
    chunked = nn.value_and_grad(model, lambda *a: supervised_loss(model, *a, chunk_size=8)[0])(*arrays)[1]
    full = nn.value_and_grad(model, lambda *a: full_logits_losses(model, *a).sum())(*arrays)[1]
    reference = np.array(full["model"]["embed_tokens"]["weight"])
    assert np.abs(reference).max() > 0.1
    np.testing.assert_allclose(
        np.array(chunked["model"]["embed_tokens"]["weight"]), reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max()
    )


def test_packed_loss_equals_separate_rows(tiny_model_dir):
    model = load_model(str(tiny_model_dir)).model
    examples = random_examples(4, length=12, prompt=3)
    loss_fn = SupervisedLoss(64)
    packed = next(iterate_batches(examples, 4, 64, packing=True))
    assert packed.segment_ids is not None and packed.inputs.shape[0] == 1
    total, tokens = loss_fn(model, *loss_fn.prepare(packed))
    separate = [loss_fn(model, *loss_fn.prepare(b)) for b in iterate_batches(examples, 1, 64)]
    assert tokens.item() == sum(t.item() for _, t in separate)
    assert abs(total.item() - sum(s.item() for s, _ in separate)) < 1e-4


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_matches_reference(kind):
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=4, lr_schedule=kind, min_lr_ratio=0.1)
    schedule = build_schedule(cfg, total_steps=20)
    for step in range(20):
        if step < 4:
            expected = 1e-3 * (step + 1) / 4
        else:
            progress = (step - 4) / 15
            expected = {
                "cosine": 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * progress)),
                "linear": 1e-3 + (1e-4 - 1e-3) * progress,
                "constant": 1e-3,
            }[kind]
        assert abs(schedule(mx.array(step)).item() - expected) < 1e-9
    assert abs(schedule(mx.array(19)).item() - (1e-3 if kind == "constant" else 1e-4)) < 1e-9


class Recorder(Callback):
    def __init__(self, stop_at: int | None = None):
        self.train, self.valid, self.stop_at = [], [], stop_at

    def on_train_report(self, info):
        self.train.append(info)
        if info["step"] == self.stop_at:
            raise KeyboardInterrupt

    def on_valid_report(self, info):
        self.valid.append(info)


def train_tiny(model, examples, iters=8, lr=1e-2, callback=None, **train_options):
    cfg = TrainConfig(iters=iters, batch_size=4, learning_rate=lr, report_every=1, eval_every=0, **train_options)
    return train(
        model,
        optim.Adam(learning_rate=lr),
        lambda epoch, start: iterate_batches(examples, 4, 64, epoch=epoch, start=start, loop=True),
        None,
        SupervisedLoss(64),
        cfg,
        callback,
    )


@pytest.mark.parametrize(
    "method,bits", [("lora", None), ("dora", None), ("full", None), ("lora", 4), ("lora", 8)], ids=["lora", "dora", "full", "qlora4", "qlora8"]
)
def test_training_lowers_loss_and_keeps_base_frozen(tiny_model_dir, method, bits):
    mx.random.seed(0)
    model = apply_method(load_model(str(tiny_model_dir), quantize_bits=bits).model, MethodConfig(name=method, rank=4))
    examples = [random_examples(2)[i % 2] for i in range(8)]  # two sequences to learn, four times each
    frozen = {
        k: np.array(v) for k, v in tree_flatten(model.parameters()) if k not in dict(tree_flatten(model.trainable_parameters()))
    }
    before = evaluate(model, iterate_batches(examples, 4, 64), SupervisedLoss(64))
    result = train_tiny(model, examples, iters=10, lr=1e-3 if method == "full" else 3e-3)
    after = evaluate(model, iterate_batches(examples, 4, 64), SupervisedLoss(64))
    assert result.stop_reason == "finished" and result.compiled
    assert after < before - 0.3
    now = dict(tree_flatten(model.parameters()))
    for name, value in frozen.items():  # quantized weights, scales and biases included
        np.testing.assert_array_equal(np.array(now[name]), value)
    if bits:
        assert any(k.endswith(".base.scales") for k in frozen)


def test_grad_checkpoint_and_accumulation_give_the_same_step(tiny_model_dir):
    examples = random_examples(8, length=16)  # one length: no padding, so 2x2 batches == 1x4 batch

    def losses(**options):
        mx.random.seed(0)
        model = apply_method(load_model(str(tiny_model_dir)).model, MethodConfig(rank=4))
        recorder = Recorder()
        batch_size = 2 if options.get("grad_accumulation", 1) == 2 else 4
        cfg = TrainConfig(iters=3, batch_size=batch_size, learning_rate=1e-2, report_every=1, eval_every=0, **options)
        order = [examples[i] for i in range(8)]
        train(
            model,
            optim.Adam(learning_rate=1e-2),
            lambda epoch, start: iterate_batches(order, batch_size, 64, bucket_by_length=False, epoch=epoch, start=start, loop=True),
            None,
            SupervisedLoss(64),
            cfg,
            recorder,
        )
        return [r["train_loss"] for r in recorder.train], evaluate(model, iterate_batches(examples, 4, 64), SupervisedLoss(64))

    plain = losses()
    checkpointed = losses(grad_checkpoint=True)
    np.testing.assert_allclose(checkpointed[0], plain[0], atol=1e-5)
    assert abs(checkpointed[1] - plain[1]) < 1e-5
    accumulated = losses(grad_accumulation=2)
    assert len(accumulated[0]) == 3 and all(math.isfinite(x) for x in accumulated[0])


@pytest.mark.parametrize("packing", [False, True])
def test_lanes_train_the_same_steps(tiny_model_dir, packing):
    """A batch split across lanes (streams computed side by side, evenly or not) trains the steps one
    lane trains: the same losses, weight updates and validation loss up to float32 rounding."""
    examples = random_examples(8, length=40) + random_examples(8, seed=1, length=23)  # padded rows too
    if packing:
        examples = examples[:4] + random_examples(12, seed=2, length=12)  # rows of several examples

    class RowsSeen(SupervisedLoss):
        """The training loss, noting the rows of every part it prepares."""

        def __init__(self):
            super().__init__(64)
            self.rows = []

        def prepare(self, batch):
            self.rows.append(batch.inputs.shape[0])
            return super().prepare(batch)

    def run(lanes: int) -> tuple[list[float], dict]:
        mx.random.seed(0)
        model = apply_method(load_model(str(tiny_model_dir)).model, MethodConfig(rank=4))
        start = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
        recorder = Recorder()
        cfg = TrainConfig(iters=4, batch_size=4, learning_rate=0.5, report_every=1, eval_every=0, lanes=lanes)
        batches = lambda epoch, first: iterate_batches(examples, 4, 64, packing=packing, epoch=epoch, start=first, loop=True)  # noqa: E731
        # Plain SGD, so that an update is the gradient itself (Adam would magnify rounding in tiny gradients).
        valid = lambda: iterate_batches(examples[::2], 4, 64, packing=packing)  # noqa: E731
        loss = RowsSeen()
        train(model, optim.SGD(learning_rate=0.5), batches, valid, loss, cfg, recorder)
        # Batches of up to 4 rows reached the loss as the lanes' parts (2 + 2, or 2 + 1 + 1).
        assert max(loss.rows) == -(-4 // lanes)
        moved = {k: np.array(v) - start[k] for k, v in tree_flatten(model.trainable_parameters())}
        return [r["train_loss"] for r in recorder.train] + [recorder.valid[-1]["val_loss"]], moved

    one, moved = run(1)
    assert len(one) == 5 and all(np.abs(m).max() > 0 for m in moved.values())
    for lanes in (2, 3):  # 3 lanes: parts of 2, 1 and 1 rows
        losses, lane_moved = run(lanes)
        np.testing.assert_allclose(losses, one, rtol=1e-5)
        for name, change in moved.items():
            np.testing.assert_allclose(lane_moved[name], change, rtol=1e-3, atol=1e-4 * np.abs(change).max(), err_msg=name)


def test_lanes_follow_cores_batch_and_base():
    cores = detect().lanes
    assert lane_count(0, 64, splits=True, quantized=False) == (cores if detect().device == "cpu" else 1)
    assert lane_count(0, 1, splits=True, quantized=False) == 1  # one row: nothing to split
    assert lane_count(3, 2, splits=True, quantized=False) == 2
    assert lane_count(2, 4, splits=True, quantized=True) == 2  # asked for
    assert lane_count(0, 4, splits=True, quantized=True) == (1 if detect().dequantize_for_matmul else min(cores, 4))
    assert lane_count(4, 4, splits=False, quantized=False) == 1  # an objective whose batches do not split (GRPO samples per batch)
@pytest.mark.skipif(BlasThreads().lib is None, reason="needs OpenBLAS on the CPU")
def test_one_blas_thread_trains_the_same_steps(tiny_model_dir):
    """The loop drops OpenBLAS to one thread on a busy machine: that may change float32 rounding (OpenBLAS
    splits some products differently), never what is trained."""
    examples = random_examples(8, length=40)
    blas = BlasThreads()

    def losses(threads: int) -> list[float]:
        mx.random.seed(0)
        model = apply_method(load_model(str(tiny_model_dir)).model, MethodConfig(rank=4))
        recorder = Recorder()
        blas.set(threads)  # the loop never goes above the count it finds
        try:
            train_tiny(model, examples, iters=4, callback=recorder)
        finally:
            blas.restore()
        return [r["train_loss"] for r in recorder.train]

    many = losses(blas.most)
    assert len(many) == 4
    np.testing.assert_allclose(losses(1), many, rtol=1e-6)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"prompt": f"Q: {i} plus one?", "completion": f" {i + 1}"} for i in range(40)]
    write_jsonl(folder / "train.jsonl", rows[:28])
    write_jsonl(folder / "valid.jsonl", rows[28:34])
    write_jsonl(folder / "test.jsonl", rows[34:])
    return folder


def tiny_recipe(model_dir, data_dir, tmp_path, **train) -> Recipe:
    options = {"iters": 8, "batch_size": 4, "learning_rate": 1e-2, "report_every": 1, "eval_every": 2, "save_every": 2}
    return Recipe(name="t").replace(
        model={"path": str(model_dir)},
        data={"train": str(data_dir), "max_seq_length": 64},
        method={"rank": 4, "dropout": 0.1},
        train={**options, **train},
        output={"runs_dir": str(tmp_path / "runs")},
    )


def metric_rows(run_dir, kind):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_interrupted_run_resumes_exactly(tiny_model_dir, data_dir, tmp_path):
    base = tiny_recipe(tiny_model_dir, data_dir, tmp_path, grad_accumulation=2)
    whole = run_training(base.replace(output={"name": "whole"}))
    assert whole.result.stop_reason == "finished"

    first = run_training(base.replace(output={"name": "cut"}), Recorder(stop_at=3))
    assert first.result.stop_reason == "interrupted" and first.result.progress.step == 3
    resumed = run_training(base.replace(output={"name": "cut", "resume": str(first.run_dir)}))
    assert resumed.result.stop_reason == "finished" and resumed.result.progress.step == 8

    for kind, key in (("train", "train_loss"), ("valid", "val_loss")):
        straight = [(r["step"], r[key]) for r in metric_rows(whole.run_dir, kind)]
        pieced = [(r["step"], r[key]) for r in metric_rows(resumed.run_dir, kind)]
        assert [s for s, _ in pieced] == [s for s, _ in straight]
        np.testing.assert_allclose([v for _, v in pieced], [v for _, v in straight], rtol=0, atol=1e-6)
    for name in ("adapters.safetensors", "adapter_config.json", "recipe.yaml", "summary.json", "loss.png"):
        assert (resumed.run_dir / name).exists()
    # The run's recipe records the lanes it ran, so `macft lora --resume` on another machine splits alike.
    assert load_recipe(first.run_dir / "recipe.yaml").train.lanes == first.result.lanes == min(detect().lanes, 4)


def test_early_stopping_keeps_best_checkpoint(tiny_model_dir, tmp_path):
    folder = tmp_path / "conflict"
    folder.mkdir()
    # Validation asks for the opposite answers, so it gets worse as training succeeds.
    write_jsonl(folder / "train.jsonl", [{"prompt": f"Q{i}:", "completion": " yes"} for i in range(16)])
    write_jsonl(folder / "valid.jsonl", [{"prompt": f"Q{i}:", "completion": " no"} for i in range(4)])
    recipe = tiny_recipe(tiny_model_dir, folder, tmp_path, iters=30, eval_every=1, early_stopping_patience=2)
    outcome = run_training(recipe.replace(method={"dropout": 0.0}, output={"name": "early"}))
    result = outcome.result
    assert result.stop_reason == "early_stopping"
    assert result.progress.step < 30 and result.progress.best_step == result.progress.step - 2
    valid = metric_rows(outcome.run_dir, "valid")
    assert min(r["val_loss"] for r in valid) == result.progress.best_val_loss
    # The run's adapter is the best one: re-evaluating it gives the best validation loss.
    from macft.data import load_splits

    splits = load_splits(recipe.data, load_model(str(tiny_model_dir)).tokenizer)
    outcome.model.eval()
    again = evaluate(outcome.model, iterate_batches(splits.valid, 4, 64), SupervisedLoss(64))
    assert abs(again - result.progress.best_val_loss) < 1e-5


class InfAtBatch(SupervisedLoss):
    """The training loss with an inf loss weight injected into the ``at``-th batch (counting from 1)."""

    def __init__(self, at: int):
        super().__init__(64)
        self.at, self.seen = at, 0

    def prepare(self, batch):
        self.seen += 1
        inputs, select, targets, weights = super().prepare(batch)
        if self.seen == self.at:
            weights = weights * mx.array(math.inf)
        return inputs, select, targets, weights


def test_nan_stops_and_keeps_last_good_checkpoint(tiny_model_dir, tmp_path):
    mx.random.seed(0)
    loaded = load_model(str(tiny_model_dir))
    model = apply_method(loaded.model, MethodConfig(rank=4))
    recipe = Recipe()
    checkpoints = Checkpoints(tmp_path / "run", recipe, loaded.identity)
    # One lane: the loss counts its prepare calls as batches.
    cfg = TrainConfig(iters=10, batch_size=4, report_every=1, eval_every=0, save_every=1, lanes=1)
    examples = random_examples(8)
    result = train(
        model,
        optim.Adam(learning_rate=1e-3),
        lambda e, s: iterate_batches(examples, 4, 64, epoch=e, start=s, loop=True),
        None,
        InfAtBatch(4),
        cfg,
        checkpoints=checkpoints,
    )
    assert result.stop_reason == "nan" and "NaN" in result.message and "step 4" in result.message
    saved = json.loads((checkpoints.path("last") / "progress.json").read_text())
    assert saved["step"] == 3
    weights = mx.load(str(checkpoints.path("last") / "adapters.safetensors"))
    assert all(np.isfinite(np.array(v)).all() for v in weights.values())


def test_demo_compares_base_and_tuned(tiny_models, data_dir, tmp_path):
    from mlx_lm import generate

    from macft.evaluate import EvalOptions, prepare
    from macft.train.run import demo_records, run_demo

    recipe = tiny_recipe(tiny_models["gemma3"], data_dir, tmp_path, iters=4)
    outcome = run_training(recipe.replace(demo={"count": 2, "max_tokens": 6}, output={"name": "demo"}))
    demo = run_demo(outcome)
    assert demo.total == 6 and len(demo.examples) == 2
    records = demo_records(outcome.recipe)
    assert [e["expected"] for e in demo.examples] == [r.completion for r in records[:2]]
    # The base column is what mlx-lm generates greedily from a freshly loaded base model
    # (its streaming detokenizer drops a leading space that a plain decode keeps).
    base = load_model(str(tiny_models["gemma3"]))
    for example, item in zip(demo.examples, prepare(records, base.tokenizer, EvalOptions())):
        assert example["base"].strip() == generate(base.model, base.tokenizer, item.prompt_tokens, max_tokens=6).strip()
    assert any(e["base"] != e["tuned"] for e in demo.examples)
