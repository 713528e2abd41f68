"""Device, BLAS and dtype policy.

MLX's Linux CPU wheel ships a slow reference BLAS. Loading the system OpenBLAS with RTLD_GLOBAL
before MLX is imported makes MLX's fp32 matmuls resolve to it (≈20× faster on x86). On CPU,
bf16/fp16 matmuls get no BLAS at all, so macft computes in float32 there; on Metal and CUDA the
model's own half-precision dtype is kept.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys
from dataclasses import dataclass
from functools import lru_cache

OPENBLAS_HINT = (
    "OpenBLAS not found: training on this CPU will be ~20x slower. "
    "Install it with `sudo apt-get install libopenblas0-pthread` (Debian/Ubuntu)."
)

_OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_openblas_path: str | None = None


def load_openblas() -> str | None:
    """On Linux, load OpenBLAS globally so MLX picks it up; must run before ``import mlx``.

    ``MACFT_OPENBLAS`` names a library file to use, or ``0`` to turn this off.
    """
    global _openblas_path
    if _openblas_path is not None or not sys.platform.startswith("linux"):
        return _openblas_path
    choice = os.environ.get("MACFT_OPENBLAS", "")
    if choice == "0":
        return None
    candidates = [choice] if choice else [*_OPENBLAS_CANDIDATES, *glob.glob("/usr/lib/*/libopenblas*.so.0")]
    for path in candidates:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            _openblas_path = path
            return path
    return None


def missing_blas_hint() -> str | None:
    """The install hint when this is Linux and no OpenBLAS could be loaded (and it was not turned off)."""
    if not sys.platform.startswith("linux") or os.environ.get("MACFT_OPENBLAS") == "0":
        return None
    return None if load_openblas() else OPENBLAS_HINT


@dataclass(frozen=True)
class Backend:
    """What this process computes on, and the choices that follow from it."""

    device: str  # "gpu" (Metal or CUDA) or "cpu"
    accelerator: str  # "metal", "cuda" or "cpu"
    blas: str  # "openblas", "accelerate", "reference" or "gpu"
    compute_dtype: str  # the float dtype weights are held in for compute
    dequantize_for_matmul: bool  # CPU quantized_matmul is ~30x slower than dequantize + matmul

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
        return Backend("gpu", accelerator, "gpu", "bfloat16", dequantize_for_matmul=False)
    if sys.platform == "darwin":
        blas = "accelerate"
    else:
        blas = "openblas" if _openblas_path else "reference"
    return Backend("cpu", "cpu", blas, "float32", dequantize_for_matmul=True)


def compute_dtype():
    """The MLX dtype float weights should be held in for training and inference here."""
    import mlx.core as mx

    return getattr(mx, detect().compute_dtype)


def machine_memory_bytes() -> int:
    """Memory the model may use: Metal's recommended working set on Apple Silicon, else RAM."""
    import mlx.core as mx

    if sys.platform == "darwin" and mx.metal.is_available():
        info = mx.metal.device_info()
        if "max_recommended_working_set_size" in info:
            return int(info["max_recommended_working_set_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def machine_name() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
