"""What this process may still allocate, so that a limit (``ulimit -v``) is a one-line error before
the work instead of a crash in the middle of it: MLX does not check its CPU allocations, and a
refused one ends the process with a segmentation fault.

    left = address_space_left()                  # None without a limit
    check_room(model_bytes(model_dir), "load gemma3-270m")
"""

from __future__ import annotations

import errno
import resource
from pathlib import Path

from macft.errors import MacftError

# Allocations beyond the weights while a model loads (casts, the first forward pass).
LOAD_HEADROOM = 1.25


def limit_bytes() -> int | None:
    """The soft address-space or data-segment limit of this process, if one is set."""
    limits = []
    for kind in (resource.RLIMIT_AS, getattr(resource, "RLIMIT_DATA", None)):
        if kind is None:
            continue
        soft, _ = resource.getrlimit(kind)
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    return min(limits) if limits else None


def mapped_bytes() -> int:
    """Address space this process holds now (Linux's VmSize; 0 where the system does not say)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def address_space_left() -> int | None:
    """Bytes this process may still map under its limit; None when no limit is set."""
    limit = limit_bytes()
    return None if limit is None else max(0, limit - mapped_bytes())


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def out_of_memory_message(what: str, need: int | None = None) -> str:
    limit, left = limit_bytes(), address_space_left()
    wanted = f" needs about {gib(need)}, but" if need else " could not get the memory it needs;"
    if limit is not None:
        return (
            f"{what[:1].upper()}{what[1:]}{wanted} this process's memory limit (ulimit -v) is {gib(limit)} and leaves "
            f"{gib(left or 0)}; raise it (`ulimit -v unlimited`) or use a smaller model, batch or sequence length."
        )
    return f"{what[:1].upper()}{what[1:]}{wanted} this machine is out of memory; close other programs or use a smaller model, batch or sequence length."


def check_room(need: int, what: str) -> None:
    """Refuse work that needs more than a memory limit leaves (no limit: nothing to check)."""
    left = address_space_left()
    if left is not None and need > left:
        raise MacftError(out_of_memory_message(what, need))


def model_bytes(model_dir: Path, float_bytes: int) -> int:
    """Memory loading a model folder takes: its float tensors at ``float_bytes`` each element, the
    others (quantized packs, scales) as stored, and ``LOAD_HEADROOM`` on top."""
    from macft.run_files import safetensors_header

    total = 0
    for file in sorted(Path(model_dir).glob("model*.safetensors")):
        try:
            header, _ = safetensors_header(file)
        except MacftError:
            continue  # the loader reports a damaged file itself
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            start, stop = info.get("data_offsets", (0, 0))
            elements = 1
            for size in info.get("shape", ()):
                elements *= int(size)
            total += elements * float_bytes if info.get("dtype") in ("F16", "BF16", "F32", "F64") else int(stop) - int(start)
    return int(total * LOAD_HEADROOM)


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, ENOMEM, MLX's failed allocation, and under a memory limit what else a refused
    mapping looks like: a library that cannot be loaded, a thread that cannot be started."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOMEM
    text = str(exc)
    if isinstance(exc, RuntimeError) and ("Unable to allocate" in text or "[malloc" in text or "std::bad_alloc" in text):
        return True
    limited = limit_bytes() is not None
    return limited and ("failed to map segment" in text or isinstance(exc, RuntimeError) and "Resource temporarily unavailable" in text)
