"""Backend policy: OpenBLAS is loaded before MLX on Linux (pip's own when no faster system one is
installed), and its absence is reported once per command."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from macft import backend
from macft.backend import OPENBLAS_HINT, BlasThreads, detect, load_openblas, threads_for_free_cores


def run_cli(*args: str, openblas: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MACFT_OPENBLAS": openblas}
    return subprocess.run([sys.executable, "-m", "macft.cli", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenBLAS loading is Linux-only")
def test_missing_openblas_is_reported_for_compute_commands_only():
    missing = run_cli("data", "--help", openblas="/nonexistent/libopenblas.so.0")
    assert missing.returncode == 0
    assert missing.stderr.count(OPENBLAS_HINT) == 1 and "`macft doctor`" in missing.stderr  # the note says where the fix is
    assert OPENBLAS_HINT not in run_cli("recipes", "list", openblas="/nonexistent/libopenblas.so.0").stderr
    assert OPENBLAS_HINT not in run_cli("data", "--help", openblas="0").stderr


@pytest.mark.skipif(not sys.platform.startswith("linux") or load_openblas() is None, reason="needs an OpenBLAS")
def test_cpu_backend_reports_openblas_and_float32():
    backend = detect()
    if backend.device == "cpu":
        assert (backend.blas, backend.compute_dtype, backend.dequantize_for_matmul) == ("openblas", "float32", True)
        assert "openblas" in backend.describe()


linux_with_pip_openblas = pytest.mark.skipif(
    not sys.platform.startswith("linux") or backend.pip_openblas() is None, reason="pip's OpenBLAS is a Linux x86-64 dependency"
)


@linux_with_pip_openblas
def test_pip_openblas_loads_without_system_libraries_and_is_fast(tmp_path):
    """A child process with a fresh cache loads the wheel's OpenBLAS (linked to MLX's bundled libgfortran)
    and multiplies float32 matrices several times faster than MLX's reference BLAS."""
    env = {**os.environ, "MACFT_HOME": str(tmp_path)}
    env.pop("MACFT_OPENBLAS", None)
    code = "import macft.backend as b; b.load_openblas(); print(b.loaded_openblas()); print(b.detect().blas)"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert child.stdout.split() in ([backend.pip_openblas(), "openblas"], [backend.system_openblas(), "openblas"]), child.stderr
    if ctypes.util.find_library("gfortran") is None:  # a machine without libgfortran: the private links were needed
        links = list((tmp_path / "blas").glob("*/libgfortran.so.5"))
        assert len(links) == 1 and os.readlink(links[0]) == backend.bundled_gfortran()
    fast, slow = backend.measure_in_child(backend.pip_openblas()), backend.measure_in_child("0")
    print(f"\nfloat32 1024² matmul: pip OpenBLAS {fast:.1f} GFLOP/s, reference BLAS {slow:.1f} GFLOP/s")
    assert fast > 3 * slow > 0


@linux_with_pip_openblas
def test_faster_blas_goes_first_and_is_remembered(tmp_path, monkeypatch):
    """Given a slow library standing in for a system BLAS (MLX's own reference BLAS), the measured
    order puts pip's OpenBLAS first, and the second call reads the cache instead of measuring."""
    monkeypatch.setenv("MACFT_HOME", str(tmp_path))
    reference = sorted(Path(backend.bundled_gfortran()).parent.glob("libblas*.so*"))[0]
    assert backend.faster_first(str(reference), backend.pip_openblas()) == [backend.pip_openblas(), str(reference)]
    speeds = json.loads((tmp_path / "blas" / "speed.json").read_text())
    assert len(speeds) == 1 and all(v > 0 for v in next(iter(speeds.values())).values())
    monkeypatch.setattr(backend, "measure_in_child", lambda path: pytest.fail("measured twice"))
    assert backend.faster_first(str(reference), backend.pip_openblas())[0] == backend.pip_openblas()


# In a fresh process: evaluate 256 independent products of a 1 MiB array at once, and print the MLX peak
# (MiB) with the variable as this process and a child of it see it. In MLX's default order (20 wide)
# about 35 of the products are alive at a time; in macft's wide order all 256 are.
WIDTH_PROBE = """
import macft, os, subprocess
import mlx.core as mx
base = mx.ones((1 << 18,)); mx.eval(base)
mx.reset_peak_memory(); before = mx.get_active_memory()
mx.eval([(base * (i + 1)).sum() for i in range(256)])
child = subprocess.run(["env"], capture_output=True, text=True).stdout
print((mx.get_peak_memory() - before) >> 20, os.environ.get("MLX_BFS_MAX_WIDTH"), child.count("MLX_BFS_MAX_WIDTH="))
"""


@pytest.mark.skipif(detect().device != "cpu", reason="the order is widened on a CPU only")
@pytest.mark.parametrize("preset", [None, "20"])
def test_eval_order_is_widened_for_this_process_only(preset):
    """MLX reads MLX_BFS_MAX_WIDTH at its first evaluation: macft widens it for itself (the probe's
    products are all alive at once), never for the programs it starts, and keeps a value the user set
    (here MLX's own 20)."""
    env = {k: v for k, v in os.environ.items() if k != "MLX_BFS_MAX_WIDTH"}
    if preset:
        env["MLX_BFS_MAX_WIDTH"] = preset
    out = subprocess.run([sys.executable, "-c", WIDTH_PROBE], env=env, capture_output=True, text=True, check=True).stdout.split()
    peak, seen, inherited = int(out[0]), out[1], out[2]
    if preset:
        assert (seen, inherited) == (preset, "1") and peak < 100
    else:
        assert (seen, inherited) == ("None", "0") and peak >= 200


def test_blas_threads_take_the_free_cores():
    assert threads_for_free_cores(2, 1.5, most=2) == 1  # the benchmark machine, shared
    assert threads_for_free_cores(2, 0.3, most=2) == 2
    assert threads_for_free_cores(4, 9.0, most=4) == 1  # never fewer than one
    assert threads_for_free_cores(16, 3.0, most=8) == 8  # never more than OpenBLAS's own count
    assert threads_for_free_cores(2, 0.3, most=2, lanes=2) == 1  # a step's two lanes multiply at once
    assert threads_for_free_cores(16, 0.0, most=16, lanes=4) == 4
    assert threads_for_free_cores(2, 1.5, most=2, lanes=2) == 1


class Machine:
    """A machine's busy CPU seconds: this process's own plus ``others`` cores kept busy by other processes."""

    def __init__(self):
        self.others, self.busy, self.at = 0.0, 0.0, time.monotonic()

    def __call__(self) -> float:
        now = time.monotonic()
        self.busy, self.at = self.busy + self.others * (now - self.at), now
        return self.busy + time.process_time()


@pytest.mark.skipif(not sys.platform.startswith("linux") or load_openblas() is None, reason="needs an OpenBLAS")
def test_openblas_threads_follow_the_machine_load():
    machine = Machine()
    threads = BlasThreads(interval=0.05, busy_seconds=machine)
    if threads.lib is None or threads.most < 2:
        pytest.skip("OpenBLAS runs one thread here")
    try:
        machine.others = float(os.cpu_count())  # every core taken by others
        for _ in range(2):
            threads.adjust()
            time.sleep(0.1)
        threads.adjust()
        assert threads.lib.openblas_get_num_threads() == 1
        machine.others = 0.0
        time.sleep(0.1)
        threads.adjust()
        assert threads.lib.openblas_get_num_threads() == threads.most
    finally:
        threads.restore()
