"""Issue #27: where commands may write, through the CLI. An output never lands on an input, a run's
state or a model a run records as its base, even with --force; an earlier output that holds files
the user added is not replaced; a run's name stays inside --out-dir; ~, symbolic links and a file
in the way are the paths the user meant or one line; a read-only folder and a full disk are one
line. Every case checks that what was there is still there, byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_harden import ROWS, macft, no_blas_note, one_line_error  # noqa: F401 (no_blas_note is an autouse fixture)

REPO_ROOT = Path(__file__).resolve().parent.parent


def digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself) by its sha256."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    """A base GGUF, and two runs trained on it (one step each) in one runs folder."""
    root = tmp_path_factory.mktemp("outputs")
    data = root / "data"
    data.mkdir()
    for name, rows in (("train", ROWS[:18]), ("valid", ROWS[18:])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = root / "base.gguf"
    assert macft("export", "gguf", "--model", tiny_model_dir, "--out", base).exit_code == 0
    for name in ("run", "other"):
        result = macft("lora", "--model", base, "--data", data, "--out-dir", root / "runs", "--name", name, "--iters", 2,
                       "--set", "train.save_every=1", "--set", "demo.count=0")  # fmt: skip
        assert result.exit_code == 0, result.output
    return {"root": root, "base": base, "data": data, "model": tiny_model_dir, "run": root / "runs" / "run", "other": root / "runs" / "other"}


def protected_cases(w):
    run, other, base = w["run"], w["other"], w["base"]
    imported = Path(json.loads((run / "adapter_config.json").read_text())["base_model"]["path"])
    return [
        (["export", "gguf", "--adapter", run, "--out", base], "this command's input", base),
        (["export", "gguf", "--model", w["model"], "--out", base], "is the base model of the run ", base),
        (["fuse", "--adapter", run, "--out", run / "checkpoints"], "is part of the state of the run in", run),
        (["fuse", "--adapter", run, "--out", run / "checkpoints" / "last" / "x"], "is part of the state of the run in", run),
        (["fuse", "--adapter", run, "--out", other], "is the run directory", other),
        (["import", base, "--out", other / "checkpoints" / "last"], "is part of the state of the run in", other),
        (["fuse", "--adapter", run, "--out", w["root"] / "runs"], "holds this command's input", w["root"] / "runs"),
        (["import", base, "--out", imported], "is the base model of the run ", imported),  # the GGUF's import
    ]


def test_force_never_writes_over_inputs_run_state_or_bases(world, tmp_path, monkeypatch):
    """Each of these replaced what it named before (the base GGUF every run on it needs, checkpoints
    that --resume needs); now each is one line, and every byte stays."""
    for args, expected, kept in protected_cases(world):
        before = digest(kept)
        line = one_line_error(macft(*args, "--force"))
        assert expected in line and "--force does not change that" in line, (args, line)
        assert digest(kept) == before, args
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    line = one_line_error(macft("fuse", "--adapter", world["run"], "--out", "~", "--force"))
    assert f"is {home}, a folder macft never replaces" in line and (home / "notes").is_dir()
    resumed = macft("lora", "--resume", world["run"], "--iters", 3, "--set", "demo.count=0")  # the run's state still resumes
    assert resumed.exit_code == 0, resumed.output


def test_an_earlier_output_with_the_users_files_is_not_replaced(world):
    run = world["run"]
    assert macft("fuse", "--adapter", run).exit_code == 0
    fused = run / "fused"
    assert json.loads((fused / "macft_fuse.json").read_text())["files"]["config.json"] == (fused / "config.json").stat().st_size
    assert macft("generate", "--model", fused, "-p", "hi", "-n", 1).exit_code == 0  # leaves its weights hash behind
    assert macft("fuse", "--adapter", run).exit_code == 0  # still only what macft wrote: replaced
    (fused / "NOTES.md").write_text("mine")
    (fused / "mydata").mkdir()
    (fused / "mydata" / "a.jsonl").write_text("{}\n")
    line = one_line_error(macft("fuse", "--adapter", run))
    assert "holds 'NOTES.md', which was not written by `macft fuse`" in line and "--force would delete it" in line
    assert (fused / "NOTES.md").read_text() == "mine" and (fused / "mydata" / "a.jsonl").is_file()
    (fused / "NOTES.md").unlink()
    assert "holds 'mydata'" in one_line_error(macft("fuse", "--adapter", run))
    shutil.rmtree(fused / "mydata")
    with (fused / "config.json").open("a") as fh:
        fh.write("\n")
    assert "holds 'config.json', changed since `macft fuse`" in one_line_error(macft("fuse", "--adapter", run))
    assert macft("fuse", "--adapter", run, "--force").exit_code == 0
    assert macft("fuse", "--adapter", run).exit_code == 0


@pytest.mark.parametrize("how", [("--name", "../../escaped"), ("--set", "output.name=../escaped"), ("--name", "a/b"), ("--name", "..")])
def test_a_run_name_is_one_folder_inside_out_dir(world, tmp_path, how):
    runs = tmp_path / "deep" / "runs"
    args = ["lora", "--model", world["model"], "--data", world["data"], "--out-dir", runs, "--iters", 1, "--set", "demo.count=0", *how]
    line = one_line_error(macft(*args))
    assert "must be one folder name" in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


def test_tilde_links_and_files_in_the_way(world, tmp_path, monkeypatch):
    run = world["run"]
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert macft("fuse", "--adapter", run, "--out", "~/fused").exit_code == 0
    assert (home / "fused" / "config.json").is_file() and not (tmp_path / "~").exists()
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    assert macft("fuse", "--adapter", run, "--out", tmp_path / "link").exit_code == 0
    assert (tmp_path / "link").is_symlink() and (target / "macft_fuse.json").is_file()
    (tmp_path / "file.gguf").write_text("a file of mine")
    (tmp_path / "file-link.gguf").symlink_to(tmp_path / "file.gguf")
    assert "--force" in one_line_error(macft("export", "gguf", "--adapter", run, "--out", tmp_path / "file-link.gguf", "--fidelity", 0))
    assert (tmp_path / "file.gguf").read_text() == "a file of mine"
    assert macft("export", "gguf", "--adapter", run, "--out", tmp_path / "file-link.gguf", "--fidelity", 0, "--force").exit_code == 0
    assert (tmp_path / "file-link.gguf").is_symlink() and (tmp_path / "file.gguf").read_bytes()[:4] == b"GGUF"
    (tmp_path / "plain").write_text("x")
    line = one_line_error(macft("lora", "--model", world["model"], "--data", world["data"], "--out-dir", tmp_path / "plain", "--name", "r", "--iters", 1))
    assert f"{tmp_path / 'plain'} is a file, not a folder" in line
    line = one_line_error(macft("fuse", "--adapter", run, "--out", tmp_path / "plain" / "sub"))
    assert "is a file, not a folder" in line and (tmp_path / "plain").read_text() == "x"


def test_a_refused_run_folder_is_left_as_it_was(world, tmp_path):
    mine = tmp_path / "runs" / "mine"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("x")
    args = ["lora", "--model", world["model"], "--data", world["data"], "--out-dir", tmp_path / "runs", "--iters", 1]
    assert "thesis.tex" in one_line_error(macft(*args, "--name", "mine"))
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]


# ---------------------------------------------------------------------------- read-only and full disks

# Runs CLI commands in one fresh process (one import), after a Python ``prelude``; prints each
# command's exit code and output as a JSON line.
CLI_SCRIPT = """
import json, sys
from click.testing import CliRunner
from macft.cli import cli
{prelude}
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(cli, args)
    print(json.dumps([result.exit_code, result.output]), flush=True)
"""


def cli_in_subprocess(commands: list[list], prelude: str = "", wrapper: list[str] = ()) -> list[tuple[int, str]]:
    """The (exit code, output) of each command, run in order by one new process started through ``wrapper``."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MACFT_OPENBLAS": "0"}
    script = CLI_SCRIPT.format(prelude=prelude)
    args = [*wrapper, sys.executable, "-c", script, json.dumps([[str(a) for a in c] for c in commands])]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [tuple(json.loads(line)) for line in done.stdout.splitlines()]


def in_private_mounts(root: Path, commands: list[list]) -> list[tuple[int, str]]:
    """``commands`` in a private mount namespace (``unshare``): ``root/ro`` bind-mounted read-only and
    ``root/full`` a 96 kB tmpfs."""
    ro, full = root / "ro", root / "full"
    ro.mkdir()
    full.mkdir()
    mounts = f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} {ro} && mount -t tmpfs -o size=96k tmpfs {full}"
    return cli_in_subprocess(commands, wrapper=["unshare", "-Urm", "sh", "-c", f'{mounts} && exec "$@"', "sh"])


def private_mounts_work() -> bool:
    try:
        return subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not private_mounts_work(), reason="needs unshare (user and mount namespaces) for a read-only mount and a small tmpfs")
def test_read_only_folders_and_a_full_disk_are_one_line(world, tmp_path):
    run, ro, full = world["run"], tmp_path / "ro", tmp_path / "full"
    commands = [
        ["lora", "--model", world["model"], "--data", world["data"], "--out-dir", ro, "--name", "r", "--iters", 1],
        ["fuse", "--adapter", run, "--out", ro / "fused"],
        ["export", "gguf", "--adapter", run, "--out", ro / "x.gguf", "--fidelity", 0],
        ["import", world["base"], "--out", ro / "imported"],
        ["eval", "--adapter", run, "--data", world["data"], "--no-generate", "-n", 2, "--report", ro / "r.jsonl"],
        ["export", "gguf", "--adapter", run, "--out", full / "x.gguf", "--fidelity", 0],
        ["fuse", "--adapter", run, "--out", full / "fused"],
    ]
    results = in_private_mounts(tmp_path, commands)
    assert len(results) == len(commands)
    for index, (command, (code, output)) in enumerate(zip(commands, results)):
        lines = [line for line in output.strip().splitlines() if not line.startswith("· ")]
        assert code == 1 and "Traceback" not in output and len(lines) == 1, (command, output)
        expected = f"{ro} is not writable (a read-only disk or folder)" if index < 5 else "the disk is full"
        assert expected in lines[0], (command, lines[0])
    assert not list(ro.iterdir()) and not list(full.iterdir())
