"""Backend policy: OpenBLAS is loaded before MLX on Linux, and its absence is reported once per command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from macft.backend import OPENBLAS_HINT, detect, load_openblas


def run_cli(*args: str, openblas: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MACFT_OPENBLAS": openblas}
    return subprocess.run([sys.executable, "-m", "macft.cli", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS loading is Linux-only")
def test_missing_openblas_is_reported_for_compute_commands_only():
    missing = run_cli("data", "--help", openblas="/nonexistent/libopenblas.so.0")
    assert missing.returncode == 0
    assert missing.stderr.count(OPENBLAS_HINT) == 1
    assert OPENBLAS_HINT not in run_cli("recipes", "list", openblas="/nonexistent/libopenblas.so.0").stderr
    assert OPENBLAS_HINT not in run_cli("data", "--help", openblas="0").stderr


@pytest.mark.skipif(not sys.platform.startswith("linux") or load_openblas() is None, reason="needs a system OpenBLAS")
def test_cpu_backend_reports_openblas_and_float32():
    backend = detect()
    if backend.device == "cpu":
        assert (backend.blas, backend.compute_dtype, backend.dequantize_for_matmul) == ("openblas", "float32", True)
        assert "openblas" in backend.describe()
