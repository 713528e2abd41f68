"""Fault injection (issue #14): real processes killed at seeded random points, SIGTERM, two runs
racing for one folder, a write limit that makes the disk "full", and a fuzzed GGUF reader.

Each check is what a user would see afterwards: every file in the run directory still parses,
an interrupted export left either the old or the new GGUF (never a half-written one), a resumed
run ends bit-identical to one that was never interrupted, and every failure is one line. Every
process is bounded by a timeout and killed on the way out.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from macft.cli import cli
from macft.errors import MacftError
from macft.models.gguf_import.reader import read_gguf

REPO_ROOT = Path(__file__).resolve().parent.parent
ROWS = [{"prompt": f"Q: {i} plus one?", "completion": f" {i + 1}"} for i in range(30)]
ITERS = 60
TRAIN_ARGS = ["--iters", ITERS, "--batch-size", 2, "--set", "train.save_every=1", "--set", "train.report_every=1",
              "--set", "train.eval_every=50", "--set", "demo.count=0"]  # fmt: skip


@pytest.fixture(autouse=True)
def no_blas_note(monkeypatch):
    monkeypatch.setenv("MACFT_OPENBLAS", "0")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault-data")
    for name, rows in (("train", ROWS[:20]), ("valid", ROWS[20:25])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def macft(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def spawn(*args, **kwargs) -> subprocess.Popen:
    # MLX's reference BLAS: its results do not depend on the process's history; OpenBLAS's differ in the
    # last bits between processes that ran different steps (3.5e-7 on this test's adapter).
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MACFT_OPENBLAS": "0"}
    command = [sys.executable, "-m", "macft.cli", *map(str, args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@contextmanager
def bounded(*processes: subprocess.Popen):
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


def wait_for(condition, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def assert_run_files_whole(run: Path) -> None:
    """Everything `macft lora` leaves in a run directory parses (metrics may end in half a line,
    which the resume drops). Hidden names are a killed writer's temporaries, whole files or folders
    (a checkpoint is written into ``.last.PID.*.tmp/`` and renamed), which the next write removes."""
    yaml.safe_load((run / "recipe.yaml").read_text())
    for path in run.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(run).parts):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            mx.load(str(path))


def saved_step(run: Path) -> int:
    """The step of the run's last checkpoint; -1 while there is none (or it is being swapped)."""
    try:
        return json.loads((run / "checkpoints" / "last" / "progress.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def adapter(run: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(run / "adapters.safetensors")).items()}


def test_training_killed_at_random_points_resumes_exactly(tiny_model_dir, data_dir, tmp_path):
    """SIGKILL at a seeded random point, then SIGTERM (as `kill` sends) on the resumed process,
    then a resume to the end: the adapter equals an uninterrupted run's, bit for bit."""
    rng = random.Random(14)
    reference = spawn("lora", "--model", tiny_model_dir, "--data", data_dir, "--out-dir", tmp_path, "--name", "ref", *TRAIN_ARGS)
    output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, output
    run = tmp_path / "killed"
    first = ["--model", tiny_model_dir, "--data", data_dir, "--out-dir", tmp_path, "--name", "killed", *TRAIN_ARGS]
    for args, signum in ((first, signal.SIGKILL), (["--resume", run, "--set", "demo.count=0"], signal.SIGTERM)):
        process = spawn("lora", *args)
        with bounded(process):  # a seeded random step, then a seeded random moment within it
            target = rng.randint(max(saved_step(run), 0) + 1, max(saved_step(run), 0) + 20)
            wait_for(lambda: saved_step(run) >= target, process)
            time.sleep(rng.uniform(0.0, 0.02))
            process.send_signal(signum)
            output, _ = process.communicate(timeout=60)
        assert_run_files_whole(run)
        if signum == signal.SIGKILL:
            assert process.returncode == -signal.SIGKILL
        else:  # like Ctrl-C: the step in progress finishes, a checkpoint is saved, the resume command shown
            assert process.returncode == 143 and "Traceback" not in output, output  # 128 + SIGTERM, as the shell reports a kill
            assert f"Interrupted after step {saved_step(run)};" in output and f"macft lora --resume {run}" in output
    resumed = spawn("lora", "--resume", run, "--set", "demo.count=0")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    expected, got = adapter(tmp_path / "ref"), adapter(run)
    assert expected.keys() == got.keys() and all(np.array_equal(expected[k], got[k]) for k in expected)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, ITERS + 1))
    hidden = [p.name for p in [*run.iterdir(), *(run / "checkpoints").iterdir()] if p.name.endswith((".tmp", ".old"))]
    assert hidden == []


def test_export_killed_at_random_points_leaves_the_old_or_the_new_file(tiny_model_dir, tmp_path):
    rng = random.Random(1414)
    out = tmp_path / "model.gguf"
    assert macft("export", "gguf", "--model", tiny_model_dir, "--out", out, "--name", "old").exit_code == 0
    old = out.read_bytes()
    new_file = tmp_path / "reference.gguf"
    assert macft("export", "gguf", "--model", tiny_model_dir, "--out", new_file, "--name", "model").exit_code == 0
    new = new_file.read_bytes()
    (tmp_path / "notes.txt").write_text("mine")
    process = spawn("export", "gguf", "--model", tiny_model_dir, "--out", out, "--name", "model")
    with bounded(process):  # killed while it writes: once its hidden copy exists, after a seeded delay
        wait_for(lambda: any(tmp_path.glob(".model.gguf.*.tmp")) or process.poll() is not None, process)
        time.sleep(rng.uniform(0.0, 0.05))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert out.read_bytes() in (old, new)
    read_gguf(out)
    assert (tmp_path / "notes.txt").read_text() == "mine" and new_file.read_bytes() == new
    assert macft("export", "gguf", "--model", tiny_model_dir, "--out", out, "--name", "model").exit_code == 0
    assert out.read_bytes() == new and not list(tmp_path.glob(".model.gguf.*"))


def test_two_runs_started_together_with_one_name(tiny_model_dir, data_dir, tmp_path):
    args = ["lora", "--model", tiny_model_dir, "--data", data_dir, "--out-dir", tmp_path, "--name", "same",
            "--iters", 10, "--set", "train.report_every=1", "--set", "demo.count=0"]  # fmt: skip
    processes = [spawn(*args), spawn(*args)]
    with bounded(*processes):
        outputs = [p.communicate(timeout=120)[0] for p in processes]
    codes = sorted(p.returncode for p in processes)
    assert codes == [0, 1], outputs
    refused = outputs[[p.returncode for p in processes].index(1)]
    error = [line for line in refused.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and ("in use by another `macft lora`" in error[0] or "already holds a run" in error[0])
    rows = (tmp_path / "same" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in rows if '"train"' in r]) == 10


@contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` fail as on a full disk (EFBIG; MLX's own writer raises its '[write]' error)."""
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_is_one_line_and_keeps_what_was_there(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "model.gguf"
    assert macft("export", "gguf", "--model", tiny_model_dir, "--out", out, "--name", "old").exit_code == 0
    old = out.read_bytes()
    with file_size_limit(len(old) // 2):
        export = macft("export", "gguf", "--model", tiny_model_dir, "--out", out)
        train = macft("lora", "--model", tiny_model_dir, "--data", data_dir, "--out-dir", tmp_path, "--name", "full",
                      "--iters", 2, "--set", "train.save_every=1", "--set", "demo.count=0")  # fmt: skip
    for result, target in ((export, out), (train, tmp_path / "full" / "checkpoints" / "last")):
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert result.output.strip().splitlines()[-1].startswith(f"Error: Could not write {target}: the ")
    assert out.read_bytes() == old and not list(tmp_path.glob(".model.gguf.*"))
    assert not (tmp_path / "full" / "checkpoints" / "last").exists()
    assert not list((tmp_path / "full" / "checkpoints").glob(".last.*"))


@contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a corrupt file gets one line, not numpy's warnings too
def test_gguf_reader_fuzz_never_hangs_or_crashes(tiny_model_dir, tmp_path):
    source = tmp_path / "tiny.gguf"
    assert macft("export", "gguf", "--model", tiny_model_dir, "--out", source, "--quant", "q8_0").exit_code == 0
    original = source.read_bytes()
    header = read_gguf(source).tensors  # the tensor data starts after the header
    data_start = min(info.offset for info in header.values())
    rng = np.random.default_rng(14)
    path = tmp_path / "fuzzed.gguf"
    outcomes = {"read": 0, "refused": 0}
    start = time.monotonic()
    for case in range(400):
        raw = bytearray(original)
        if case % 4 == 0:
            raw = raw[: int(rng.integers(0, len(raw)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                at = int(rng.integers(0, data_start if rng.random() < 0.9 else len(raw)))
                raw[at] = int(rng.integers(0, 256))
        path.write_bytes(bytes(raw))
        with time_limit(2.0):
            try:
                read_gguf(path)
                outcomes["read"] += 1
            except MacftError as exc:
                assert "\n" not in str(exc)
                outcomes["refused"] += 1
        if case % 20 in (0, 1):  # the whole import too (truncated and flipped): a model or one line, never a traceback
            with time_limit(20.0):
                result = macft("import", path, "--out", tmp_path / f"import-{case}")
            assert result.exit_code in (0, 1) and isinstance(result.exception, (SystemExit, type(None))), result.output
            assert result.exit_code == 0 or len(result.output.strip().splitlines()) == 1, result.output
    assert outcomes["read"] > 20 and outcomes["refused"] > 100 and time.monotonic() - start < 30
