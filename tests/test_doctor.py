"""`macft doctor` reports what this machine really has, and a fix for each problem."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from macft import backend
from macft.cli import cli
from macft.doctor import check_cache, check_ollama, folder_size
from macft.units import format_bytes


def doctor_json(env: dict | None = None) -> dict[str, dict]:
    if env is None:
        result = CliRunner().invoke(cli, ["doctor", "--json"])
        assert result.exit_code == 0, result.output
        output = result.output
    else:
        done = subprocess.run([sys.executable, "-m", "macft.cli", "doctor", "--json"], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        output = done.stdout
    return {row["name"]: row for row in json.loads(output)}


def gflops(check: dict) -> float:
    return float(re.search(r"([\d.]+) GFLOP/s", check["value"]).group(1))


def test_doctor_reports_this_machine():
    checks = doctor_json()
    assert checks["memory"]["value"].startswith(format_bytes(backend.machine_memory_bytes()))
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    assert (checks["llama.cpp"]["problem"] is None) == has_llama_cpp
    assert checks["llama.cpp"]["fix"] is None if has_llama_cpp else checks["llama.cpp"]["fix"].endswith("pip install llama-cpp-python")
    assert checks["MLX"]["value"].split()[0] == __import__("mlx.core").core.__version__
    if backend.detect().device == "cpu":
        assert gflops(checks["BLAS"]) > 0
        assert (checks["BLAS"]["problem"] is None) == (backend.detect().blas != "reference")


@pytest.mark.skipif(not sys.platform.startswith("linux") or backend.pip_openblas() is None, reason="needs pip's OpenBLAS")
def test_doctor_flags_a_turned_off_blas_with_its_fix():
    slow = doctor_json({**os.environ, "MACFT_OPENBLAS": "0"})["BLAS"]
    assert "reference BLAS" in slow["problem"] and slow["fix"] == "unset MACFT_OPENBLAS"
    fast = doctor_json()["BLAS"]
    # ~20x apart on a quiet machine; under load both rates fall, so only the order is asserted
    assert fast["problem"] is None and "OpenBLAS" in fast["value"] and gflops(fast) > gflops(slow)


def test_ollama_found_on_path_or_named_with_its_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    missing = check_ollama()
    assert missing.problem and "ollama" in missing.fix
    fake = tmp_path / "ollama"
    fake.write_text("#!/bin/sh\necho 'ollama version is 0.12.3'\n")
    fake.chmod(0o755)
    found = check_ollama()
    assert found.problem is None and found.value == f"{fake} (ollama version is 0.12.3)"


def test_cache_sizes_count_files_once(tmp_path):
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "a").write_bytes(b"x" * 300_000)
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "model.safetensors").symlink_to(tmp_path / "blobs" / "a")
    assert folder_size(tmp_path) == 300_000
    assert check_cache("cache", tmp_path).value == f"{tmp_path} ({format_bytes(300_000)})"
    assert check_cache("cache", tmp_path / "none").value.endswith("(empty)")
