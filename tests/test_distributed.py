"""Data-parallel training over several processes with MLX's ring backend on 127.0.0.1.

The reference for every multi-rank run is the same recipe trained by one process: train.batch_size
is the global batch, so 2 ranks x 4 rows must give the per-step losses of 1 rank x 8 rows.
Every subprocess runs under a hard timeout and is killed (with its process group) on the way out.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from macft.config import save_recipe
from macft.data import iterate_batches, load_splits
from macft.memory import Plan, estimate, replica_bytes
from macft.models.shape import read_model_shape
from macft.models.load import load_model
from macft.train.distributed import World
from macft.objectives.sft import SupervisedLoss
from macft.train.run import run_training
from test_train import data_dir, metric_rows, tiny_recipe  # noqa: F401 (data_dir is a fixture)

REPO = Path(__file__).resolve().parent.parent
STEP_TIMEOUT = 120  # seconds any one multi-process run may take on a loaded 2-core machine
TRAIN = {"batch_size": 8, "learning_rate": 2e-3, "lr_schedule": "constant", "eval_every": 4, "save_every": 2}


def reference_recipe(model_dir, data_dir, tmp_path, iters, objective="sft"):
    recipe = tiny_recipe(model_dir, data_dir, tmp_path, iters=iters, report_every=1, objective=objective, **TRAIN)
    return recipe.replace(method={"dropout": 0.0}, output={"name": "reference"})


def recipe_flags(model_dir: Path, data_dir: Path, runs: Path, name: str, iters: int, objective: str = "sft") -> list[str]:
    """``macft lora`` arguments for the recipe ``reference_recipe`` builds in-process."""
    path = runs.parent / f"recipe-{name}-{data_dir.name}.yaml"
    save_recipe(reference_recipe(model_dir, data_dir, runs.parent, iters, objective), path)
    return [str(path), "--out-dir", str(runs), "--name", name, "--json"]


def objective_data(tmp_path: Path, objective: str, sft_dir: Path) -> Path:
    """A data folder for ``objective``: the supervised one, or preference pairs or labelled feedback
    made from the same questions (the second half of the answers wrong)."""
    if objective == "sft":
        return sft_dir
    folder = tmp_path / f"data-{objective}"
    folder.mkdir(exist_ok=True)
    for split in ("train", "valid"):
        rows = [json.loads(line) for line in (sft_dir / f"{split}.jsonl").read_text().splitlines()]
        wrong = [" " + str(int(r["completion"]) + 3) + " or so" for r in rows]
        if objective == "kto":
            out = [{"prompt": r["prompt"], "completion": r["completion"] if i % 3 else w, "label": bool(i % 3)} for i, (r, w) in enumerate(zip(rows, wrong))]
        else:
            out = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": w} for r, w in zip(rows, wrong)]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in out))
    return folder


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


class Ranks:
    """Rank processes started by hand, as mlx.launch would start them (so one can be killed)."""

    def __init__(self, tmp_path: Path, count: int):
        self.hostfile = tmp_path / f"hosts-{time.monotonic_ns()}.json"
        self.hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(count)]))
        self.processes: list[subprocess.Popen] = []

    def start(self, rank: int, args: list[str], **env: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "macft.cli", "lora", *args]
        variables = environment(MLX_RANK=str(rank), MLX_HOSTFILE=str(self.hostfile), **env)
        process = subprocess.Popen(command, env=variables, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def ranks(tmp_path):
    started: list[Ranks] = []

    def make(count: int) -> Ranks:
        started.append(Ranks(tmp_path, count))
        return started[-1]

    yield make
    for group in started:
        group.close()


def launch(args: list[str]) -> subprocess.CompletedProcess:
    """``macft lora ... --hosts 127.0.0.1,127.0.0.1``: two ranks through mlx.launch."""
    command = [sys.executable, "-m", "macft.cli", "lora", *args, "--hosts", "127.0.0.1,127.0.0.1"]
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=STEP_TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def checkpoint_step(run_dir: Path) -> int:
    progress = run_dir / "checkpoints" / "last" / "progress.json"
    return json.loads(progress.read_text())["step"] if progress.exists() else 0


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_two_ranks_match_one_rank_through_a_dead_rank_and_a_resume(tiny_model_dir, data_dir, tmp_path, ranks, objective):
    runs, data_dir = tmp_path / "runs", objective_data(tmp_path, objective, data_dir)
    # A long run (the schedule is constant, so its length changes no step), killed in the middle.
    group = ranks(2)
    cut = [group.start(r, recipe_flags(tiny_model_dir, data_dir, runs, "cut", 100_000, objective)) for r in range(2)]
    deadline = time.monotonic() + STEP_TIMEOUT
    while checkpoint_step(runs / "cut") < 4:
        assert time.monotonic() < deadline and cut[0].poll() is None, cut[0].stderr.read() if cut[0].poll() is not None else "no checkpoint"
        time.sleep(0.02)
    cut[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = cut[0].communicate(timeout=30)
    assert time.monotonic() - killed < 20 and cut[0].returncode == 1
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "lost the connection to another rank" in lines[0] and "resume with" in lines[0]

    # The last complete checkpoint survived; the resumed 2-rank run (through mlx.launch) finishes it.
    done = checkpoint_step(runs / "cut")
    assert done >= 4 and done % TRAIN["save_every"] == 0
    iters = done + 6
    resumed = launch(["--resume", str(runs / "cut"), "--iters", str(iters), "--json"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout[resumed.stdout.index("{") :])
    assert summary["ranks"] == 2 and summary["steps"] == iters and summary["stop_reason"] == "finished"

    reference = run_training(reference_recipe(tiny_model_dir, data_dir, tmp_path, iters, objective))
    for kind, key in (("train", "train_loss"), ("valid", "val_loss")):
        one = [(r["step"], r[key]) for r in metric_rows(reference.run_dir, kind)]
        two = [(r["step"], r[key]) for r in metric_rows(runs / "cut", kind)]
        assert [s for s, _ in two] == [s for s, _ in one]
        np.testing.assert_allclose([v for _, v in two], [v for _, v in one], rtol=2e-5)
    assert {r["ranks"] for r in metric_rows(runs / "cut", "train")} == {2}
    # Rank 0 wrote the adapter; the tuned weights equal the one-process run's.
    tuned = mx.load(str(runs / "cut" / "adapters.safetensors"))
    expected = mx.load(str(reference.run_dir / "adapters.safetensors"))
    for name, value in expected.items():
        np.testing.assert_allclose(np.array(tuned[name]), np.array(value), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective", ["orpo", "simpo", "kto"])
def test_alignment_on_two_ranks_matches_one_rank(tiny_model_dir, data_dir, tmp_path, objective):
    """2 ranks x 4 of a batch's 8 items give the per-step losses of 1 rank x 8 (DPO: above, with a dead rank and a resume)."""
    data_dir = objective_data(tmp_path, objective, data_dir)
    two = launch(recipe_flags(tiny_model_dir, data_dir, tmp_path / "runs", "two", 4, objective))
    assert two.returncode == 0, two.stderr[-2000:]
    reference = run_training(reference_recipe(tiny_model_dir, data_dir, tmp_path, 4, objective))
    for kind, key in (("train", "train_loss"), ("valid", "val_loss")):
        one = [(r["step"], r[key]) for r in metric_rows(reference.run_dir, kind)]
        shared = [(r["step"], r[key]) for r in metric_rows(tmp_path / "runs" / "two", kind)]
        assert [s for s, _ in shared] == [s for s, _ in one] and one
        np.testing.assert_allclose([v for _, v in shared], [v for _, v in one], rtol=2e-5)
    assert {r["ranks"] for r in metric_rows(tmp_path / "runs" / "two", "train")} == {2}


def test_ranks_with_different_data_stop_at_start(tiny_model_dir, data_dir, tmp_path, ranks):
    other = tmp_path / "other"
    other.mkdir()
    lines = (data_dir / "train.jsonl").read_text().splitlines()
    (other / "train.jsonl").write_text("\n".join(lines[:-1] + [lines[-1].replace("plus", "minus")]) + "\n")
    (other / "valid.jsonl").write_text((data_dir / "valid.jsonl").read_text())
    group = ranks(2)
    started = time.monotonic()
    first = group.start(0, recipe_flags(tiny_model_dir, data_dir, tmp_path / "runs", "a", 8))
    second = group.start(1, recipe_flags(tiny_model_dir, other, tmp_path / "runs", "a", 8))
    _, err = first.communicate(timeout=STEP_TIMEOUT)
    _, err_other = second.communicate(timeout=30)
    assert first.returncode == 1 and second.returncode == 1 and time.monotonic() - started < STEP_TIMEOUT
    error = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "Rank 1" in error[0] and "in its data" in error[0]
    assert "Error" not in err_other and "Traceback" not in err + err_other
    assert not (tmp_path / "runs" / "a" / "checkpoints").exists()


def test_unreachable_rank_is_a_one_line_error_within_seconds(tiny_model_dir, data_dir, tmp_path, ranks):
    alone = ranks(2).start(0, recipe_flags(tiny_model_dir, data_dir, tmp_path / "runs", "alone", 8), MACFT_CONNECT_TIMEOUT="2")
    started = time.monotonic()
    _, err = alone.communicate(timeout=60)
    assert alone.returncode != 0 and time.monotonic() - started < 30
    error = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "Could not reach the other ranks within 2 s" in error[0] and "127.0.0.1:" in error[0]


def test_shares_of_a_batch_add_up_to_the_batch(tiny_model_dir, data_dir, tmp_path):
    """Each rank's rows, cut after their last trained position, give the loss and gradients of
    the whole batch once summed (what the step's all-reduce computes)."""
    loaded = load_model(str(tiny_model_dir))
    splits = load_splits(reference_recipe(tiny_model_dir, data_dir, tmp_path, 1).data, loaded.tokenizer)
    batch = next(iterate_batches(splits.train, 7, 64, bucket_by_length=False))
    loss = SupervisedLoss(64)
    whole = loss(loaded.model, *loss.prepare(batch))
    for size in (2, 3, 8):  # 8 ranks for 7 rows: one rank holds nothing to train
        shares = [World(rank=r, size=size).share(batch) for r in range(size)]
        assert sum(s.inputs.shape[0] for s in shares) == 7 + (size == 8)
        assert sum(s.num_tokens for s in shares) == batch.num_tokens
        assert all(s.inputs.shape[1] <= batch.inputs.shape[1] for s in shares)
        parts = [loss(loaded.model, *loss.prepare(s)) for s in shares]
        np.testing.assert_allclose(sum(p[0].item() for p in parts), whole[0].item(), rtol=1e-5)
        assert sum(p[1].item() for p in parts) == whole[1].item()


def test_planner_plans_per_rank(tiny_model_dir):
    shape = read_model_shape(str(tiny_model_dir))
    two = estimate(shape, Plan(method="full", batch=8, seq=64, ranks=2), available_bytes=1 << 40)
    half = estimate(shape, Plan(method="full", batch=4, seq=64), available_bytes=1 << 40)
    assert two.parts == half.parts
    three = estimate(shape, Plan(method="full", batch=8, seq=64, ranks=3), available_bytes=1 << 40)
    assert three.parts == estimate(shape, Plan(method="full", batch=3, seq=64), available_bytes=1 << 40).parts
    # When the replicated state alone exceeds one machine, more machines cannot help, and it says so.
    tight = replica_bytes(two.parts) - 1
    squeezed = estimate(shape, Plan(method="full", batch=8, seq=64, ranks=4), available_bytes=tight)
    assert not squeezed.fits and any("data parallelism gives every Mac a whole copy" in n for n in squeezed.notes)
    assert not any("Macs (data parallelism" in s for s in squeezed.suggestions)
    # When only the batch is too big, sharing it among more Macs is suggested.
    roomy = replica_bytes(two.parts) + (half.total_bytes - replica_bytes(half.parts)) + 1
    crowded = estimate(shape, Plan(method="full", batch=8, seq=64), available_bytes=roomy)
    assert not crowded.fits and any("share the batch among 2 Macs" in s for s in crowded.suggestions)


def test_estimate_command_shows_ranks(tiny_model_dir):
    from click.testing import CliRunner

    from macft.commands.estimate import estimate as estimate_command

    args = ["--model", str(tiny_model_dir), "--method", "full", "--batch", "8", "--seq", "64"]
    per_rank = json.loads(CliRunner().invoke(estimate_command, [*args, "--ranks", "2", "--json"]).output)
    single = json.loads(CliRunner().invoke(estimate_command, [*args[:-3], "4", "--seq", "64", "--json"]).output)
    assert per_rank["plan"]["ranks"] == 2 and per_rank["total_bytes"] == single["total_bytes"]
    shown = CliRunner().invoke(estimate_command, [*args, "--ranks", "2"])
    assert shown.exit_code == 0 and "over 2 ranks" in shown.output and "per rank: 4 rows" in shown.output


def test_live_view_and_launcher_arguments():
    from macft.train.launch import rank_command
    from macft.ui import throughput

    assert throughput({"tokens_per_second": 300.0, "ranks": 2}) == "300 tok/s total · 150 per rank × 2 ranks"
    assert throughput({"tokens_per_second": 300.0, "ranks": 1}) == "300 tok/s"
    argv = ["lora", "r.yaml", "--hosts", "a,b", "--iters", "3", "--hostfile=h.json", "--json"]
    assert rank_command(argv) == [sys.executable, "-m", "macft.cli", "lora", "r.yaml", "--iters", "3", "--json"]


# ---------------------------------------------------------------------------- issue #27: hosts, hangs, signals


def test_hosts_that_make_no_two_ranks_are_one_line(tiny_model_dir, data_dir, tmp_path):
    """Before: an empty hostfile exited 0 having done nothing; one host printed a JSON parse error and WARN lines."""
    from click.testing import CliRunner

    from macft.cli import cli

    empty, one, broken = tmp_path / "empty.json", tmp_path / "one.json", tmp_path / "broken.json"
    empty.write_text('{"hosts": []}')
    one.write_text('{"hosts": [{"ssh": "mac1", "ips": ["10.0.0.1"]}]}')
    broken.write_text('[{"ips": ["10.0.0.1"]}, {"ips": ["10.0.0.2"]}]')
    cases = [
        (["--hostfile", empty], "lists 0 hosts; data-parallel training needs at least two"),
        (["--hostfile", one], "lists 1 host; data-parallel training needs at least two"),
        (["--hostfile", broken], "is not an mlx.launch hostfile (an entry lacks 'ssh')"),
        (["--hosts", "127.0.0.1"], "names 1 host; data-parallel training needs at least two"),
        (["--hosts", "127.0.0.1,"], "has an empty host name"),
    ]
    for where, expected in cases:
        args = ["lora", "--model", str(tiny_model_dir), "--data", str(data_dir), "--out-dir", str(tmp_path / "runs"), *map(str, where)]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and expected in result.output, result.output
    assert not (tmp_path / "runs").exists()


def test_a_frozen_rank_ends_the_run_at_the_step_deadline(tiny_model_dir, data_dir, tmp_path, ranks):
    """A rank that stops responding without exiting held the others forever; with train.step_timeout
    every rank ends within the deadline, rank 0 with one line naming the checkpoint to resume."""
    group = ranks(2)
    args = [*recipe_flags(tiny_model_dir, data_dir, tmp_path / "runs", "frozen", 100_000), "--set", "train.step_timeout=4"]
    first, second = group.start(0, args), group.start(1, args)
    deadline = time.monotonic() + STEP_TIMEOUT
    while checkpoint_step(tmp_path / "runs" / "frozen") < 2:
        assert time.monotonic() < deadline and first.poll() is None, first.stderr.read() if first.poll() is not None else "no checkpoint"
        time.sleep(0.02)
    second.send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    _, err = first.communicate(timeout=60)
    assert time.monotonic() - frozen < 30 and second.wait(timeout=30) == -signal.SIGKILL  # its own watchdog ended it too
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "No training step finished within train.step_timeout=4 s" in lines[0], err[-2000:]
    assert f"resume with: macft lora --resume {tmp_path / 'runs' / 'frozen'}" in lines[0] and "Traceback" not in err
    assert checkpoint_step(tmp_path / "runs" / "frozen") >= 2


@pytest.fixture
def reaper(tmp_path):
    """Kills, after the test, every process whose command line names the test's folder (a launch
    that did not end: mlx.launch runs its ranks in a session of its own)."""
    yield
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(tmp_path).encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def test_the_launcher_ends_soon_after_an_unreachable_host(tiny_model_dir, data_dir, tmp_path, reaper):
    """Before: after an unreachable host's one-line error, mlx.launch hung two more minutes on ssh
    (stopping the rank there). Here `ssh` hangs like a host that is down."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ssh").write_text(f"#!/bin/sh\necho $$ >> {tmp_path / 'ssh-pids'}\nexec {sys.executable} -c 'import time; time.sleep(600)' {tmp_path}\n")
    (fake / "ssh").chmod(0o755)
    env = environment(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", MACFT_CONNECT_TIMEOUT="2")
    args = recipe_flags(tiny_model_dir, data_dir, tmp_path / "runs", "far", 8)
    command = [sys.executable, "-m", "macft.cli", "lora", *args, "--hosts", "127.0.0.1,10.255.255.1"]
    started = time.monotonic()
    far = subprocess.run(command, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    assert far.returncode == 1 and time.monotonic() - started < 90, far.stderr[-2000:]
    lines = far.stderr.strip().splitlines()
    assert len(lines) == 1 and "Could not reach the other ranks within 2 s" in lines[0], far.stderr[-2000:]
    pids = [int(pid) for pid in (tmp_path / "ssh-pids").read_text().split()]
    deadline = time.monotonic() + 10  # a SIGKILL takes effect at once, but is not reported synchronously
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pids and not any(map(running, pids))  # no ssh left behind


def running(pid: int) -> bool:
    """Whether a process exists and has not exited (a killed one may wait as a zombie to be reaped)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_launcher_passes_sigterm_to_the_ranks(tiny_model_dir, data_dir, tmp_path, reaper):
    """Before: mlx.launch shared the terminal's signals and printed its threads' tracebacks; the exit status was 130."""
    command = [sys.executable, "-m", "macft.cli", "lora", *recipe_flags(tiny_model_dir, data_dir, tmp_path / "runs", "term", 100_000)]
    launcher = subprocess.Popen([*command, "--hosts", "127.0.0.1,127.0.0.1"], env=environment(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + STEP_TIMEOUT
        while checkpoint_step(tmp_path / "runs" / "term") < 2:
            assert time.monotonic() < deadline and launcher.poll() is None, "no checkpoint"
            time.sleep(0.05)
        launcher.send_signal(signal.SIGTERM)
        out, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 143 and "Traceback" not in err and "[WARN]" not in err, err[-2000:]
    summary = json.loads(out[out.index("{") :])
    assert summary["stop_reason"] == "interrupted" and summary["steps"] == checkpoint_step(tmp_path / "runs" / "term")
