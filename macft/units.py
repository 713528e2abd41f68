"""Sizes as people read and write them."""

import math
import re

GIB = 1024**3
# A bare K, M, G or T means the binary unit, as memory is sold; GB is decimal, GiB binary.
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": GIB, "gb": 1000**3, "gib": GIB, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}  # fmt: skip


def format_bytes(n: float) -> str:
    """``1.98 GiB`` from a quarter GiB up, ``236 MiB`` below."""
    return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 1024**2:.0f} MiB"


def size_bytes(text: str) -> int:
    """Bytes in a size such as "16GiB", "12GB", "5.5G" or "800MiB"; ValueError for anything else."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or not math.isfinite(float(match.group(1))):
        raise ValueError(f"not a size: {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])
