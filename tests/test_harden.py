"""Issue #14, each fault as a user meets it through the CLI: nothing a user owns is lost or silently
overwritten, resumes refuse changed inputs, bad numbers stop with one line naming a checkpoint that
exists, and every failure is one line. (Kills, disk-full and fuzzing are in test_faults.py.)"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from click.testing import CliRunner

from macft.models import chat_template
from macft.cli import cli
from macft.config import MethodConfig, Recipe, TrainConfig
from macft.data import Encoder, iterate_batches
from macft.data.formats import parse_line
from macft.methods import apply_method
from macft.models.gguf_import.reader import read_gguf
from macft.models.load import load_model
from macft.train.checkpoint import Checkpoints
from macft.train.guard import LossGuard
from macft.objectives.sft import SupervisedLoss
from macft.train.loop import train
from macft.train.rundir import claim_run_dir

ROWS = [{"prompt": f"Q: {i} plus one?", "completion": f" {i + 1}"} for i in range(30)]


@pytest.fixture(autouse=True)
def no_blas_note(monkeypatch):
    """The OpenBLAS install note is printed before every compute command on a machine without it."""
    monkeypatch.setenv("MACFT_OPENBLAS", "0")


def write_data(folder: Path, train=ROWS[:20], valid=ROWS[20:25], test=ROWS[25:]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("valid", valid), ("test", test)):
        if rows:
            (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def macft(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result) -> str:
    """The error line, after checking it is the only one besides `macft lora`'s progress notes ("· ...")."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("· ")]
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    return lines[0]


def final_error(result) -> str:
    """A failed training run shows its summary, then the error as its last line."""
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.output
    return last


def lora(model, data, runs, name, *extra):
    return macft("lora", "--model", model, "--data", data, "--out-dir", runs, "--name", name, "--set", "demo.count=0", *extra)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A base model copy (tests may write next to it) and a 40-step run on it that learned something."""
    root = tmp_path_factory.mktemp("harden")
    model = shutil.copytree(tiny_model_dir, root / "model")
    data = write_data(root / "data")
    result = lora(model, data, root / "runs", "base", "--iters", 40, "--lr", "1e-2", "--set", "train.eval_every=20", "--set", "train.save_every=20")
    assert result.exit_code == 0, result.output
    return {"model": model, "data": data, "run": root / "runs" / "base"}


def copy_run(trained, tmp_path) -> Path:
    return shutil.copytree(trained["run"], tmp_path / "run")


# ---------------------------------------------------------------------------- 1. no silent overwrite


def test_fuse_refuses_a_folder_it_did_not_write_and_force_replaces_it(trained, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    line = one_line_error(macft("fuse", "--adapter", trained["run"], "--out", out))
    assert "--force" in line and "not an earlier output of `macft fuse`" in line
    assert (out / "notes.txt").read_text() == "my notes"
    assert macft("fuse", "--adapter", trained["run"], "--out", out, "--force").exit_code == 0
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    again = macft("fuse", "--adapter", trained["run"], "--out", out)  # its own earlier output: no --force needed
    assert again.exit_code == 0, again.output


def test_fuse_never_writes_over_its_base_or_run(trained):
    before = sorted(p.name for p in trained["model"].iterdir())
    for out in (trained["model"], trained["run"]):
        line = one_line_error(macft("fuse", "--adapter", trained["run"], "--out", out, "--force"))
        assert "this command's input" in line
    assert sorted(p.name for p in trained["model"].iterdir()) == before


def test_export_refuses_its_input_a_folder_and_foreign_files(trained, tmp_path):
    out = tmp_path / "model.gguf"
    assert macft("export", "gguf", "--model", trained["model"], "--out", out).exit_code == 0
    exported = out.read_bytes()
    line = one_line_error(macft("export", "gguf", "--model", out, "--out", out, "--force"))
    assert "this command's input" in line and out.read_bytes() == exported
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    assert "--force" in one_line_error(macft("export", "gguf", "--model", trained["model"], "--out", folder))
    assert (folder / "keep.txt").read_text() == "keep"
    foreign = tmp_path / "other.gguf"
    foreign.write_text("not macft's")
    assert "--force" in one_line_error(macft("export", "gguf", "--model", trained["model"], "--out", foreign))
    assert foreign.read_text() == "not macft's"
    assert macft("export", "gguf", "--model", trained["model"], "--out", foreign, "--force").exit_code == 0
    assert read_gguf(foreign).metadata["macft.command"] == "export gguf"
    again = macft("export", "gguf", "--model", trained["model"], "--out", out)  # an earlier export is replaced
    assert again.exit_code == 0 and out.read_bytes() == exported


def test_import_names_force(trained, tmp_path):
    gguf = tmp_path / "m.gguf"
    assert macft("export", "gguf", "--model", trained["model"], "--out", gguf).exit_code == 0
    out = tmp_path / "mine"
    out.mkdir()
    (out / "a.txt").write_text("a")
    assert "--force" in one_line_error(macft("import", gguf, "--out", out))
    assert (out / "a.txt").read_text() == "a"


def test_eval_report_refuses_a_foreign_file(trained, tmp_path):
    report = tmp_path / "results.jsonl"
    report.write_text('{"my": "data"}\n')
    args = ["eval", "--adapter", trained["run"], "--data", trained["data"], "--no-generate", "-n", 2, "--report", report]
    line = one_line_error(macft(*args))
    assert "choose another --report, or pass --force" in line and report.read_text() == '{"my": "data"}\n'
    line = one_line_error(macft(*args[:-1], trained["data"] / "test.jsonl"))
    assert "is this command's input" in line
    assert macft(*args, "--force").exit_code == 0 and macft(*args).exit_code == 0  # then it is an earlier report


# ---------------------------------------------------------------------------- 2. run directory claim


def test_a_run_directory_in_use_is_refused(trained, tmp_path):
    folder = tmp_path / "runs" / "same"
    with claim_run_dir(folder, resume=False):
        line = one_line_error(lora(trained["model"], trained["data"], tmp_path / "runs", "same", "--iters", 1))
    assert "in use by another `macft lora`" in line
    assert not (folder / "metrics.jsonl").exists()


def test_a_dead_owner_leaves_no_lock_and_foreign_files_are_refused(trained, tmp_path):
    folder = tmp_path / "runs" / "r"
    folder.mkdir(parents=True)
    (folder / ".macft-lock").write_text(str(dead_pid()))  # what a killed run leaves behind
    assert lora(trained["model"], trained["data"], tmp_path / "runs", "r", "--iters", 1).exit_code == 0
    line = one_line_error(lora(trained["model"], trained["data"], tmp_path / "runs", "r", "--iters", 1))
    assert "already holds a run" in line
    (tmp_path / "runs" / "u").mkdir()
    (tmp_path / "runs" / "u" / "thesis.tex").write_text("x")
    assert "thesis.tex" in one_line_error(lora(trained["model"], trained["data"], tmp_path / "runs", "u", "--iters", 1))


# ---------------------------------------------------------------------------- 3. resume checks its inputs


def test_resume_refuses_changed_data_unless_allowed(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    data = Path(json.loads(json.dumps(str(trained["data"]))))
    saved = (data / "train.jsonl").read_text()
    try:
        (data / "train.jsonl").write_text(saved + json.dumps({"prompt": "Q: new?", "completion": " yes"}) + "\n")
        line = one_line_error(macft("lora", "--resume", run, "--iters", 41))
        assert "training or validation data changed" in line and "--allow-changed-inputs" in line
        allowed = macft("lora", "--resume", run, "--iters", 41, "--allow-changed-inputs", "--set", "demo.count=0")
        assert allowed.exit_code == 0 and "Resuming although the training or validation data changed" in allowed.output
    finally:
        (data / "train.jsonl").write_text(saved)


def test_resume_refuses_a_changed_base(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    model = shutil.copytree(trained["model"], tmp_path / "moved-model")
    recipe = (run / "recipe.yaml").read_text().replace(str(trained["model"]), str(model))
    (run / "recipe.yaml").write_text(recipe)
    weights = mx.load(str(model / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    mx.save_safetensors(str(model / "model.safetensors"), weights)
    line = one_line_error(macft("lora", "--resume", run, "--iters", 41))
    assert "the base model's weights changed" in line
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["base_model"]["sha256"] == json.loads((trained["run"] / "adapter_config.json").read_text())["base_model"]["sha256"]


def test_resume_recovers_a_checkpoint_swap_and_cleans_killed_writes(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    pid = dead_pid()
    (run / "checkpoints" / "last").rename(run / "checkpoints" / f".last.{pid}.old")  # killed between the two renames
    (run / f".adapters.safetensors.{pid}.k2j4.tmp").write_bytes(b"\0" * 4096)  # killed mid-write
    result = macft("lora", "--resume", run, "--iters", 42, "--set", "demo.count=0")
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 42
    leftovers = [p.name for p in [*run.iterdir(), *(run / "checkpoints").iterdir()] if p.name.endswith((".tmp", ".old"))]
    assert leftovers == []


# ---------------------------------------------------------------------------- 5. bad numbers


def test_huge_learning_rate_names_a_checkpoint_that_exists(trained, tmp_path):
    result = lora(trained["model"], trained["data"], tmp_path / "runs", "big", "--iters", 20, "--lr", "3e38", "--set", "train.save_every=1")
    line = final_error(result)
    assert "NaN/inf" in line
    named = re.search(r"the last good checkpoint is (\S+?)\.", line)
    assert named and Path(named[1]).is_dir()
    first_step = lora(trained["model"], trained["data"], tmp_path / "runs", "first", "--iters", 20, "--lr", "3e38")
    assert "no checkpoint had been saved yet" in final_error(first_step)
    assert not (tmp_path / "runs" / "first" / "checkpoints" / "last").exists()


def test_loss_pinned_at_a_uniform_guess_stops_the_run(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    line = final_error(macft("lora", "--resume", run, "--iters", 60, "--lr", "1e3", "--set", "demo.count=0"))
    assert "a uniform guess over the 384 tokens" in line and "Finished" not in line
    named = re.search(r"the last good checkpoint is (\S+?)\.", line)
    assert named and Path(named[1]).is_dir()
    assert json.loads((run / "summary.json").read_text())["stop_reason"] == "diverged"


def test_guard_rules():
    guard = LossGuard(vocab_size=1000)
    assert all(guard.check(step, x) is None for step, x in enumerate((3.0, 2.5, 6.8, 6.9), 1))  # two bad steps are noise
    assert "uniform guess" in guard.check(5, 6.9).problem
    rising = LossGuard(vocab_size=1000)
    assert [rising.check(step, x) for step, x in enumerate((2.0, 1.5, 5.8, 5.9), 1)] == [None] * 4
    assert "rose to 6.00 from 2.00" in rising.check(5, 6.0).problem
    assert LossGuard().check(1, 1.0, math.inf).nonfinite


class NanValidation(SupervisedLoss):
    def evaluate(self, model, *arrays):
        loss, tokens = super().evaluate(model, *arrays)
        return loss * mx.array(math.nan), tokens


def test_nan_validation_loss_stops_and_is_never_best(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    encoder = Encoder(loaded.tokenizer)
    examples = [encoder.encode(parse_line(json.dumps(row), f"train.jsonl:{i}")) for i, row in enumerate(ROWS[:8], start=1)]
    model = apply_method(loaded.model, MethodConfig(rank=4))
    checkpoints = Checkpoints(tmp_path / "run", Recipe(), loaded.identity)
    result = train(
        model,
        optim.Adam(learning_rate=1e-3),
        lambda e, s: iterate_batches(examples, 4, 64, epoch=e, start=s, loop=True),
        lambda: iterate_batches(examples, 4, 64),
        NanValidation(64),
        TrainConfig(iters=6, batch_size=4, eval_every=3, save_every=2),
        checkpoints=checkpoints,
    )
    assert result.failed and result.stop_reason == "nan" and "validation loss became NaN/inf" in result.message
    assert not checkpoints.path("best").exists() and f"the last good checkpoint is {checkpoints.path('last')}" in result.message
    assert json.loads((checkpoints.path("last") / "progress.json").read_text())["step"] == 2


def test_infinite_learning_rate_is_refused(trained, tmp_path):
    line = one_line_error(lora(trained["model"], trained["data"], tmp_path / "runs", "x", "--lr", "inf"))
    assert "train.learning_rate must be a finite number" in line


def test_nan_weights_are_named_at_load_and_import(trained, tmp_path):
    model = shutil.copytree(trained["model"], tmp_path / "nan-model")
    weights = mx.load(str(model / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = mx.where(mx.arange(weights[name].size).reshape(weights[name].shape) == 7, math.nan, weights[name])
    mx.save_safetensors(str(model / "model.safetensors"), weights)
    line = one_line_error(macft("generate", "--model", model, "-p", "hi", "-n", 2))
    assert f"tensor '{name}' holds NaN" in line
    gguf = tmp_path / "f16.gguf"
    assert macft("export", "gguf", "--model", trained["model"], "--out", gguf).exit_code == 0
    info = read_gguf(gguf).tensors["blk.0.ffn_down.weight"]
    raw = bytearray(gguf.read_bytes())
    raw[info.offset + 10 : info.offset + 12] = b"\x00\x7e"  # a float16 NaN
    gguf.write_bytes(bytes(raw))
    line = one_line_error(macft("import", gguf, "--out", tmp_path / "imported"))
    assert "tensor 'model.layers.0.mlp.down_proj.weight' holds NaN" in line and not (tmp_path / "imported").exists()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_truncated_weights_file_is_one_line(trained, tmp_path, method):
    model = shutil.copytree(trained["model"], tmp_path / "truncated")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    data = write_data(tmp_path / "data")
    line = one_line_error(macft("lora", "--model", model, "--data", data, "--method", method, "--iters", 1, "--out-dir", tmp_path / "runs"))
    assert f"Could not read the weights in {model}" in line and "download, import or convert the model again" in line


# ---------------------------------------------------------------------------- 4. chat templates


def model_with_template(trained, tmp_path, template: str) -> Path:
    model = shutil.copytree(trained["model"], tmp_path / "templated")
    (model / "chat_template.jinja").write_text(template)
    return model


REJECTS_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_a_template_that_rejects_the_conversation_is_one_line(trained, tmp_path):
    model = model_with_template(trained, tmp_path, REJECTS_SYSTEM)
    line = one_line_error(macft("generate", "--model", model, "-s", "Be brief.", "-p", "hi", "-n", 2))
    assert f"The chat template of {model} rejected the conversation (roles: system, user): System role not supported." in line
    assert macft("generate", "--model", model, "-p", "hi", "-n", 2).exit_code == 0
    chat = CliRunner().invoke(cli, ["chat", "--model", str(model), "-s", "Be brief.", "-n", "2"], input="hi\n/quit\n")
    assert chat.exit_code == 0 and "Traceback" not in chat.output
    assert "Error: The chat template of" in chat.output and "System role not supported" in chat.output
    data = write_data(tmp_path / "chat", train=[{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 3)
    line = one_line_error(lora(model, data, tmp_path / "runs", "t", "--iters", 1))
    assert line.startswith("Error: train.jsonl:1: The chat template of") and "System role not supported" in line


@pytest.mark.parametrize(
    "template,expected",
    [
        ("{{ messages.append(1) }}", "tried something the sandbox forbids"),
        ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "ran longer than 1 s"),
        ("{% for i in range(99999) %}{{ 'x' * 9999 }}{% endfor %}", "wrote more than 16,000,000 characters"),
        ("{% set s = 'x' * 30000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "ran longer than 1 s"),
    ],
)
def test_template_limits(trained, tmp_path, monkeypatch, template, expected):
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 1.0)
    model = model_with_template(trained, tmp_path, template)
    start = time.monotonic()
    line = one_line_error(macft("generate", "--model", model, "-p", "hi", "-n", 2))
    assert expected in line and f"The chat template of {model}" in line
    assert time.monotonic() - start < 15


# ---------------------------------------------------------------------------- 6. smaller points


def test_lora_says_once_what_it_cut_and_warns_about_validation(trained, tmp_path):
    long = [{"prompt": "Q: " + "very long question " * 20, "completion": " yes"}] + ROWS[:10]
    data = write_data(tmp_path / "d1", train=long, valid=ROWS[:3], test=[])
    result = lora(trained["model"], data, tmp_path / "runs", "a", "--iters", 1, "--set", "data.max_seq_length=48")
    assert result.exit_code == 0, result.output
    assert result.output.count("cut to data.max_seq_length") == 1
    assert "train: 1 examples cut to data.max_seq_length, 1 dropped" in result.output
    assert "3 of 3 validation examples also appear in train" in result.output
    no_valid = write_data(tmp_path / "d2", train=ROWS[:10], valid=[], test=[])
    result = lora(trained["model"], no_valid, tmp_path / "runs", "b", "--iters", 1)
    assert result.exit_code == 0 and "No validation data" in result.output


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"text": "a"', "not valid JSON (Expecting ',' delimiter at the end of the line)"),
        ('{"text": "a",}', "at column 14"),
        ('{"messages": [{"role": "assistant", "content": "a"}]}', "message 1 (assistant) is out of order"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]}', "message 2 (system) is out of order"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}', "two user turns in a row"),
        ('{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}', "turn must follow a user turn"),
    ],
)
def test_data_errors_point_at_the_problem(trained, tmp_path, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    error = one_line_error(macft("data", "check", path, "--model", trained["model"]))
    assert "train.jsonl line 2:" in error and message in error


def test_non_lora_adapters_get_advice_that_does_not_loop(trained, tmp_path):
    result = lora(trained["model"], trained["data"], tmp_path / "runs", "p", "--iters", 1, "--method", "prompt")
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "p"
    export = one_line_error(macft("export", "gguf", "--adapter", run, "--adapter-only"))
    fuse = one_line_error(macft("fuse", "--adapter", run))
    assert "macft fuse" not in export and "macft chat" in export
    assert "adapter GGUF" not in fuse and "chat, generate or eval" in fuse
