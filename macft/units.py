"""Sizes as people read them."""

GIB = 1024**3


def format_bytes(n: float) -> str:
    """``1.98 GiB`` from a quarter GiB up, ``236 MiB`` below."""
    return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 1024**2:.0f} MiB"
