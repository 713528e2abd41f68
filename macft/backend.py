"""Device, BLAS and dtype policy.

MLX's Linux CPU wheel ships a slow reference BLAS. Loading an OpenBLAS with RTLD_GLOBAL before MLX
is imported makes MLX's fp32 matmuls resolve to it (≈20× faster on x86): the one pip installs with
macft (``ngsolve-openblas``), or a system OpenBLAS when it measures faster. On CPU,
bf16/fp16 matmuls get no BLAS at all, so macft computes in float32 there; on Metal and CUDA the
model's own half-precision dtype is kept.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

OPENBLAS_HINT = (
    "No OpenBLAS could be loaded: matrix products on this CPU run on MLX's reference BLAS, ~20x slower. "
    "Run `macft doctor` for the fix."
)

_SYSTEM_OPENBLAS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_openblas_path: str | None = None

# MLX orders an evaluation breadth-first up to this many arrays wide, then depth-first (MLX_BFS_MAX_WIDTH,
# default 20). Each lane of a CPU training step ends in hundreds of gradients: at 20, the first lane's whole
# graph is queued before the second's, and as MLX queues only a few tasks ahead of the cores, the lanes then
# run one after the other instead of side by side.
EVAL_ORDER_WIDTH = 4096


def load_openblas() -> str | None:
    """On Linux, load OpenBLAS globally so MLX's BLAS calls resolve to it; must run before ``import mlx``.

    ``MACFT_OPENBLAS`` names a library file to use, or ``0`` to turn this off. Otherwise macft uses
    the OpenBLAS that pip installed with it (PyPI ``ngsolve-openblas``), or a system OpenBLAS when
    one is installed and measured faster (measured once, remembered in macft's cache).
    """
    global _openblas_path
    if _openblas_path is not None or not sys.platform.startswith("linux"):
        return _openblas_path
    choice = os.environ.get("MACFT_OPENBLAS", "")
    if choice == "0":
        return None
    if choice:
        candidates = [choice]
    else:
        candidates = faster_first(system_openblas(), pip_openblas())
    for path in candidates:
        if _load_globally(path):
            _openblas_path = path
            return path
    return None


def widen_eval_order() -> None:
    """On a CPU, let MLX interleave the lanes of a training step (``EVAL_ORDER_WIDTH``). MLX reads the
    setting once, at its first evaluation, so one is made here; the variable is then removed again, so
    programs macft starts (mlx_lm.lora in the benchmark) keep MLX's own order. One the user set is kept."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu or "MLX_BFS_MAX_WIDTH" in os.environ:
        return
    os.environ["MLX_BFS_MAX_WIDTH"] = str(EVAL_ORDER_WIDTH)
    try:
        mx.eval(mx.zeros(1) + 1)
    finally:
        del os.environ["MLX_BFS_MAX_WIDTH"]


def loaded_openblas() -> str | None:
    """The OpenBLAS library file this process loaded, if any."""
    return _openblas_path


def missing_blas_hint() -> str | None:
    """The hint when this is Linux and no OpenBLAS could be loaded (and it was not turned off)."""
    if not sys.platform.startswith("linux") or os.environ.get("MACFT_OPENBLAS") == "0":
        return None
    return None if load_openblas() else OPENBLAS_HINT


def system_openblas() -> str | None:
    found = [p for p in _SYSTEM_OPENBLAS if os.path.exists(p)] or sorted(glob.glob("/usr/lib/*/libopenblas*.so.0"))
    return found[0] if found else None


def pip_openblas() -> str | None:
    """The OpenBLAS of the ``ngsolve-openblas`` wheel (found without importing it: its own import
    fails on machines without libgfortran)."""
    spec = importlib.util.find_spec("ngsolve_openblas")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "libopenblas*.so*")))
    return found[0] if found else None


def bundled_gfortran() -> str | None:
    """The libgfortran that the ``mlx[cpu]`` wheel bundles for its reference LAPACK."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = os.path.join(os.path.dirname(spec.submodule_search_locations[0]), "mlx_cpu.libs")
    found = sorted(glob.glob(os.path.join(libs, "libgfortran*.so.5*")))
    return found[0] if found else None


def _load_globally(path: str) -> bool:
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError as exc:
        if "libgfortran.so.5" not in str(exc):
            return False
    # pip's OpenBLAS needs libgfortran.so.5, which a fresh machine lacks; MLX's wheel bundles one under
    # a hashed name. A private folder links both under the names the loader looks for.
    gfortran = bundled_gfortran()
    if gfortran is None:
        return False
    try:
        folder = _linked_folder(path, gfortran)
        ctypes.CDLL(gfortran, mode=ctypes.RTLD_GLOBAL)  # by its real path, so it finds its libquadmath
        ctypes.CDLL(str(folder / "libopenblas.so.0"), mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


def preload_environment(openblas: str) -> dict[str, str]:
    """Environment variables that make another program (mlx_lm.lora in the benchmark) load ``openblas``
    as macft does: preloaded, with the libgfortran.so.5 that pip's OpenBLAS needs found beside it."""
    gfortran = bundled_gfortran()
    if gfortran is None:
        return {"LD_PRELOAD": openblas}
    folder = _linked_folder(openblas, gfortran)
    # The bundled libgfortran finds its libquadmath in its own folder.
    paths = [str(folder), os.path.dirname(gfortran), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])]
    return {"LD_PRELOAD": str(folder / "libopenblas.so.0"), "LD_LIBRARY_PATH": os.pathsep.join(paths)}


def _linked_folder(openblas: str, gfortran: str) -> Path:
    """``<cache>/blas/<hash>/`` with ``libopenblas.so.0`` and ``libgfortran.so.5`` linking to the given files."""
    from macft.paths import cache_dir

    key = hashlib.sha256(f"{openblas}\0{gfortran}".encode()).hexdigest()[:16]
    folder = cache_dir("blas") / key
    folder.mkdir(exist_ok=True)
    for name, target in (("libopenblas.so.0", openblas), ("libgfortran.so.5", gfortran)):
        link = folder / name
        if os.path.islink(link) and os.readlink(link) == target:
            continue
        staging = folder / f".{name}.{os.getpid()}"
        if os.path.lexists(staging):
            os.unlink(staging)
        os.symlink(target, staging)
        os.replace(staging, link)  # atomic: concurrent processes never see a half-made link
    return folder


def faster_first(system: str | None, pip: str | None) -> list[str]:
    """The OpenBLAS candidates, fastest first. With both present, each is measured once in a child
    process (a process can load only one BLAS) and the order is remembered per pair of files."""
    candidates = [p for p in (system, pip) if p]
    if len(candidates) < 2:
        return candidates
    from macft.paths import cache_dir

    key = "|".join(f"{p}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}" for p in candidates)
    record = cache_dir("blas") / "speed.json"
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = {path: measure_in_child(path) for path in candidates}
        staging = record.with_name(f".speed.{os.getpid()}")
        staging.write_text(json.dumps(known, indent=1))
        os.replace(staging, record)
    speeds = known[key]
    return sorted(candidates, key=lambda p: -speeds.get(p, 0.0))


def measure_in_child(openblas: str) -> float:
    """Float32 matmul GFLOP/s of MLX in a fresh process that loads ``openblas`` (0.0 if it fails)."""
    code = "from macft.backend import matmul_gflops; print(matmul_gflops())"
    env = {**os.environ, "MACFT_OPENBLAS": openblas}
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        return float(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return 0.0


def matmul_gflops(size: int = 1024, seconds: float = 0.5) -> float:
    """Measured float32 GFLOP/s of one ``size`` x ``size`` matmul on MLX's default device."""
    import mlx.core as mx

    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a @ b)  # warm-up: thread pools, first-touch pages
    runs, start = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - start < seconds:
        mx.eval(a @ b)
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - start) / 1e9


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy, all cores together (Linux's /proc/stat; None elsewhere)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    except (OSError, ValueError, IndexError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def threads_for_free_cores(cores: int, others: float, most: int, lanes: int = 1) -> int:
    """BLAS threads for each of ``lanes`` concurrent callers on a machine of ``cores`` on which other
    processes keep ``others`` cores busy: the free cores shared out, at least one and at most ``most``
    (OpenBLAS's own count)."""
    return max(1, min(most, round(cores - others) // lanes))


class BlasThreads:
    """Keeps OpenBLAS's thread count to the cores that other processes leave free, re-measured every
    ``interval`` seconds; nothing happens without a loaded OpenBLAS or without /proc/stat.

    OpenBLAS's threads wait for each other by spinning. Once every core is taken, a matmul stalls
    whenever one of its threads is descheduled, and a busy machine trains an order of magnitude
    slower (docs/benchmarks.md); the losses agree to float32 rounding. The free cores are
    shared among ``lanes`` callers that multiply matrices at the same time (a training step's lanes,
    ``macft.train.loop.Steps``); one caller on an idle machine keeps OpenBLAS's own count.
    ``busy_seconds`` reads the machine's busy CPU seconds (``machine_busy_seconds``); the process's own
    use is subtracted."""

    def __init__(self, interval: float = 2.0, busy_seconds: Callable[[], float | None] = machine_busy_seconds, lanes: int = 1):
        self.interval, self.busy_seconds, self.lanes = interval, busy_seconds, lanes
        on_blas = _openblas_path is not None and detect().device == "cpu" and busy_seconds() is not None
        self.lib = ctypes.CDLL(_openblas_path) if on_blas else None
        self.most = self.lib.openblas_get_num_threads() if self.lib else 1
        self.threads = self.most
        self.last: tuple[float, float, float] | None = None  # (machine busy, own CPU, wall) seconds
        self.set(threads_for_free_cores(os.cpu_count() or 1, 0.0, self.most, lanes))

    def adjust(self) -> None:
        """Re-measure once ``interval`` seconds have passed since the last measurement (call it between steps)."""
        if self.lib is None:
            return
        now = (self.busy_seconds(), time.process_time(), time.monotonic())
        if self.last is not None and now[2] - self.last[2] < self.interval:
            return
        if self.last is not None:
            others = max(0.0, (now[0] - self.last[0]) - (now[1] - self.last[1])) / (now[2] - self.last[2])
            self.set(threads_for_free_cores(os.cpu_count() or 1, others, self.most, self.lanes))
        self.last = now

    def set(self, threads: int) -> None:
        if self.lib is not None and threads != self.threads:
            self.lib.openblas_set_num_threads(threads)
            self.threads = threads

    def restore(self) -> None:
        self.set(self.most)


@contextmanager
def blas_threads_fitted(lanes: int = 1) -> Iterator[BlasThreads]:
    """A ``BlasThreads`` for the caller to ``adjust()``, for ``lanes`` concurrent callers; OpenBLAS's own
    count is restored on the way out."""
    threads = BlasThreads(lanes=lanes)
    try:
        yield threads
    finally:
        threads.restore()


@dataclass(frozen=True)
class Backend:
    """What this process computes on, and the choices that follow from it."""

    device: str  # "gpu" (Metal or CUDA) or "cpu"
    accelerator: str  # "metal", "cuda" or "cpu"
    blas: str  # "openblas", "accelerate", "reference" or "gpu"
    compute_dtype: str  # the float dtype weights are held in for compute
    dequantize_for_matmul: bool  # CPU quantized_matmul is far slower than dequantize + matmul
    # MLX's CPU exp, tanh and pow are scalar library calls (exp ~0.1 G/s) where its SIMD is one lane wide
    # (everywhere but macOS): the frozen-head loss then uses a polynomial exp whose multiply-adds the
    # compiler vectorises, and tanh-GELU is computed through a sigmoid
    scalar_transcendentals: bool
    # MLX runs each CPU op on one core (BLAS aside), so a CPU step splits its batch into one lane per core,
    # each on its own stream (macft.train.loop.Steps); a GPU runs one
    lanes: int = 1

    def describe(self) -> str:
        return f"{self.accelerator} · BLAS {self.blas} · compute {self.compute_dtype}"

    @property
    def blas_missing(self) -> bool:
        return self.blas == "reference"


@lru_cache(maxsize=1)
def detect() -> Backend:
    import mlx.core as mx

    on_gpu = mx.default_device() == mx.gpu
    if on_gpu:
        accelerator = "metal" if mx.metal.is_available() else "cuda"
        return Backend("gpu", accelerator, "gpu", "bfloat16", dequantize_for_matmul=False, scalar_transcendentals=False)
    if sys.platform == "darwin":
        blas = "accelerate"
    else:
        blas = "openblas" if _openblas_path else "reference"
    scalar = sys.platform != "darwin"
    return Backend("cpu", "cpu", blas, "float32", dequantize_for_matmul=True, scalar_transcendentals=scalar, lanes=os.cpu_count() or 1)


def compute_dtype():
    """The MLX dtype float weights should be held in for training and inference here."""
    import mlx.core as mx

    return getattr(mx, detect().compute_dtype)


def machine_memory_bytes() -> int:
    """Memory the model may use: Metal's recommended working set on Apple Silicon, else RAM; less
    when this process's memory limit (``ulimit -v``) leaves less."""
    import mlx.core as mx

    from macft.memory_limit import address_space_left

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if sys.platform == "darwin" and mx.metal.is_available():
        info = mx.metal.device_info()
        if "max_recommended_working_set_size" in info:
            memory = int(info["max_recommended_working_set_size"])
    left = address_space_left()
    # The planner counts the weights MLX may already hold among its needs, so they are room here.
    return memory if left is None else min(memory, left + mx.get_active_memory())


def machine_name() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
