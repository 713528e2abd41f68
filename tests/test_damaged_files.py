"""Issue #27: a run's own files damaged, truncated or holding NaN, a resume without its record of
the inputs, preference pairs that teach nothing, and a process without the memory it needs: each
is one line through the CLI, found before the slow work, and nothing is written from bad weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest
from test_harden import ROWS, macft, no_blas_note, one_line_error  # noqa: F401 (no_blas_note is an autouse fixture)
from test_output_paths import cli_in_subprocess


def write_rows(folder: Path, rows: list[dict], split: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:split]))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[split:]))
    return folder


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    data = write_rows(root / "data", ROWS, 18)
    result = macft("lora", "--model", tiny_model_dir, "--data", data, "--out-dir", root, "--name", "run", "--iters", 4,
                   "--set", "train.save_every=2", "--set", "demo.count=0")  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"run": root / "run", "model": tiny_model_dir, "data": data}


def no_model_loads(*args, **kwargs):
    raise AssertionError("the base model was loaded before the damaged file was found")


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


ADAPTER_DAMAGE = [
    ("adapters.safetensors", lambda p: truncate(p, 1000), "is damaged (1000 bytes, too short for its header)"),
    ("adapters.safetensors", lambda p: truncate(p, p.stat().st_size - 8), "the file was cut short"),
    ("adapters.safetensors", lambda p: p.write_bytes(b"\xff" * 64), "is damaged (not a safetensors file)"),
    ("adapter_config.json", lambda p: p.write_text("{"), "is damaged (not valid JSON"),
    ("adapter_config.json", lambda p: p.write_text(""), "is damaged (it is empty)"),
    ("adapter_config.json", lambda p: p.write_text("[]"), "is damaged (not a JSON object)"),
    ("adapter_config.json", lambda p: p.write_text("{}"), "is damaged (no 'method' entry)"),
]


# Each damage through one of the commands that read a run (every command reads it the same way).
@pytest.mark.parametrize("command,name,damage,expected", [(["generate", "fuse", "export"][i % 3], *case) for i, case in enumerate(ADAPTER_DAMAGE)])
def test_a_damaged_adapter_is_one_line_before_the_model_loads(trained, tmp_path, name, damage, expected, command, monkeypatch):
    run = shutil.copytree(trained["run"], tmp_path / "run")
    damage(run / name)
    monkeypatch.setattr("macft.models.load.load_model", no_model_loads)
    args = {
        "generate": ["generate", "--adapter", run, "-p", "hi", "-n", 1],
        "fuse": ["fuse", "--adapter", run],
        "export": ["export", "gguf", "--adapter", run, "--fidelity", 0],
    }[command]
    line = one_line_error(macft(*args))
    assert f"{run / name} {expected}" in line or expected in line, line
    assert "--adapter RUN/checkpoints/best or RUN/checkpoints/last" in line
    assert not (run / "fused").exists() and not list(run.glob("*.gguf"))


@pytest.mark.parametrize("command", ["generate", "fuse", "export", "adapter-only"])
def test_nan_adapter_weights_are_refused(trained, tmp_path, command):
    """Before: generate printed padding, fuse and export exited 0 having written NaN weights."""
    run = shutil.copytree(trained["run"], tmp_path / "run")
    weights = mx.load(str(run / "adapters.safetensors"))
    name = sorted(k for k in weights if k.endswith("lora_b"))[0]
    weights[name] = weights[name] + math.nan
    mx.save_safetensors(str(run / "adapters.safetensors"), weights)
    args = {
        "generate": ["generate", "--adapter", run, "-p", "hi", "-n", 2],
        "fuse": ["fuse", "--adapter", run],
        "export": ["export", "gguf", "--adapter", run, "--fidelity", 0],
        "adapter-only": ["export", "gguf", "--adapter", run, "--adapter-only"],
    }[command]
    line = one_line_error(macft(*args))
    assert f"tensor '{name}' holds NaN or infinite values" in line
    assert not (run / "fused").exists() and not list(run.glob("*.gguf"))


CHECKPOINT_DAMAGE = [
    ("progress.json", lambda p: p.write_text("{"), "progress.json is damaged (not valid JSON"),
    ("progress.json", lambda p: p.write_text("{}"), "progress.json is damaged (no 'step' entry)"),
    ("progress.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "step": "x"})), "progress.json is damaged (its entries"),
    ("progress.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "numpy_rng": [1]})), "progress.json is damaged (its entries"),
    ("optimizer.safetensors", lambda p: truncate(p, 500), "optimizer.safetensors is damaged"),
    ("adapters.safetensors", lambda p: truncate(p, p.stat().st_size // 2), "adapters.safetensors is damaged"),
    ("adapter_config.json", lambda p: p.write_text("nope"), "adapter_config.json is damaged"),
]


@pytest.mark.parametrize("name,damage,expected", CHECKPOINT_DAMAGE)
def test_a_damaged_checkpoint_is_one_line_before_the_model_loads(trained, tmp_path, name, damage, expected):
    run = shutil.copytree(trained["run"], tmp_path / "run")
    damage(run / "checkpoints" / "last" / name)
    before = (run / "metrics.jsonl").read_text()
    line = one_line_error(macft("lora", "--resume", run, "--iters", 6))
    assert expected in line and "this checkpoint cannot be resumed" in line, line
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("damage", ["deleted", "empty"])
def test_resume_without_its_record_of_the_inputs_is_refused_unless_allowed(trained, tmp_path, damage):
    """Before: a deleted or empty inputs.json let a resume train on changed data without a word."""
    run = shutil.copytree(trained["run"], tmp_path / "run")
    record = run / "checkpoints" / "last" / "inputs.json"
    record.unlink() if damage == "deleted" else record.write_text("")
    line = one_line_error(macft("lora", "--resume", run, "--iters", 5, "--set", "demo.count=0"))
    state = "missing" if damage == "deleted" else "damaged"
    assert f"{record}, which records them, is {state}" in line and "--allow-changed-inputs" in line
    allowed = macft("lora", "--resume", run, "--iters", 5, "--set", "demo.count=0", "--allow-changed-inputs")
    assert allowed.exit_code == 0 and "Resuming although possibly the base model and data" in allowed.output


PAIRS = [{"prompt": f"Q{i}?", "chosen": f" yes {i}", "rejected": f" yes {i}" if i % 3 == 0 else f" no {i}"} for i in range(16)]


def test_pairs_whose_answers_are_the_same_are_counted_and_left_out(trained, tmp_path):
    data = write_rows(tmp_path / "pairs", PAIRS, 12)
    check = macft("data", "check", data, "--model", trained["model"], "--json")
    assert check.exit_code == 0 and json.loads(check.output)["splits"]["train"]["identical"] == 4
    result = macft("lora", "--model", trained["model"], "--data", data, "--set", "train.objective=dpo", "--iters", 2,
                   "--out-dir", tmp_path, "--name", "dpo", "--set", "demo.count=0")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Left out 4 of 12 train and 2 of 4 valid pairs whose chosen and rejected answers are the same" in " ".join(result.output.split())
    same = write_rows(tmp_path / "same", [dict(r, rejected=r["chosen"]) for r in PAIRS], 12)
    line = one_line_error(macft("lora", "--model", trained["model"], "--data", same, "--set", "train.objective=dpo", "--iters", 2, "--out-dir", tmp_path))
    assert "Every training pair (12) has the same chosen and rejected answer" in line


# ---------------------------------------------------------------------------- a memory limit


def add_sparse_tensor(model: Path, name: str, shape: tuple[int, int]) -> None:
    """A weights file whose header declares a float32 tensor of ``shape``, its bytes a hole on disk."""
    size = shape[0] * shape[1] * 4
    header = json.dumps({name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, size]}}).encode()
    with (model / "model-00002-of-00002.safetensors").open("wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + size)


# Once everything is imported, this process may map 400 MiB more (as `ulimit -v` would say).
LIMIT = """
import resource, macft.chat, macft.train.run, mlx_lm
mapped = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize")][0]
resource.setrlimit(resource.RLIMIT_AS, (mapped + (400 << 20), resource.RLIM_INFINITY))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the address space a process holds from /proc")
def test_a_memory_limit_too_small_is_one_line_not_a_crash(trained, tmp_path):
    """Before: MLX crashed (a segmentation fault) after the planner said the run fits, or the load blamed
    damaged weights. Here macft has 400 MiB to spare under its limit, and the model declares 1 GiB."""
    model = shutil.copytree(trained["model"], tmp_path / "model")
    add_sparse_tensor(model, "model.extra.weight", (1 << 14, 1 << 14))
    commands = [
        ["estimate", "--model", trained["model"], "--json"],
        ["generate", "--model", model, "-p", "hi", "-n", 1],
        ["lora", "--model", model, "--data", trained["data"], "--out-dir", tmp_path, "--iters", 1],
    ]
    (code, estimate), *refused = cli_in_subprocess(commands, prelude=LIMIT)
    assert code == 0 and json.loads(estimate)["available_bytes"] < 400 << 20, estimate
    for code, output in refused:
        line = one_line_error(SimpleNamespace(exit_code=code, output=output))
        assert "needs about 1.25 GiB, but this process's memory limit (ulimit -v) is" in line and "raise it" in line, line
