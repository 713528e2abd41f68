"""Read the files macft writes for itself (adapters, their configs, checkpoints) so that a damaged,
truncated or hand-edited one is one line naming the file and what to do, found before any slow
work starts (a safetensors header is checked against the file's size without reading the tensors).

    config = read_json(run / "adapter_config.json", fix="train the run again", keys=("method",))
    check_safetensors(run / "adapters.safetensors", fix="train the run again")
    weights = load_safetensors(run / "adapters.safetensors", fix="train the run again", finite=True)
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from macft.errors import MacftError

HEADER_LIMIT = 100 << 20  # safetensors' own limit on the JSON header
# What to do about a damaged adapter (its run directory still has its checkpoints, whole or not).
ADAPTER_FIX = "train the run again, or pass one of its checkpoints (--adapter RUN/checkpoints/best or RUN/checkpoints/last)"
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
               "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}  # fmt: skip


def check_adapter_files(weights: Path, config: Path) -> None:
    """An adapter's config and weights are whole, before any model is loaded for them."""
    read_json(config, fix=ADAPTER_FIX, keys=("method",))
    check_safetensors(weights, fix=ADAPTER_FIX)


def damaged(path: Path, reason: str, fix: str) -> MacftError:
    return MacftError(f"{path} is damaged ({reason}); {fix}.")


def read_json(path: Path, *, fix: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object with at least ``keys``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MacftError(f"{path} is missing; {fix}.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise damaged(path, getattr(exc, "strerror", None) or type(exc).__name__, fix) from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        reason = "it is empty" if not text.strip() else f"not valid JSON: {str(exc).split(':')[0]}"
        raise damaged(path, reason, fix) from None
    if not isinstance(value, dict):
        raise damaged(path, "not a JSON object", fix)
    missing = [key for key in keys if key not in value]
    if missing:
        raise damaged(path, f"no '{missing[0]}' entry", fix)
    return value


def safetensors_header(path: Path, *, fix: str = "download or write it again") -> tuple[dict, int]:
    """The JSON header of a safetensors file (read without the tensors), and where its data starts."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if length < 2 or length > HEADER_LIMIT:
                raise damaged(path, "not a safetensors file" if size >= 10 else f"{size} bytes, too short for a safetensors file", fix)
            if 8 + length > size:
                raise damaged(path, f"{size} bytes, too short for its header", fix)
            header = json.loads(fh.read(length))
    except FileNotFoundError:
        raise MacftError(f"{path} is missing; {fix}.") from None
    except OSError as exc:
        raise damaged(path, exc.strerror or str(exc), fix) from None
    except (ValueError, UnicodeDecodeError):
        raise damaged(path, "its header is not valid JSON", fix) from None
    if not isinstance(header, dict):
        raise damaged(path, "its header is not a JSON object", fix)
    return header, 8 + length


def check_safetensors(path: Path, *, fix: str) -> None:
    """The header parses and every tensor lies inside the file (a truncated copy fails here)."""
    path = Path(path)
    header, data_start = safetensors_header(path, fix=fix)
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            expected = math.prod(int(d) for d in info["shape"]) * DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise damaged(path, f"tensor '{name}' has no valid dtype, shape and offsets", fix) from None
        if stop - start != expected or start < 0:
            raise damaged(path, f"tensor '{name}' does not match its shape", fix)
        end = max(end, stop)
    if data_start + end > (size := path.stat().st_size):
        raise damaged(path, f"{size} bytes where its header promises {data_start + end}: the file was cut short", fix)


def load_safetensors(path: Path, *, fix: str, finite: bool = False) -> dict:
    """The tensors of a checked safetensors file as MLX arrays; with ``finite``, NaN or inf are refused."""
    import mlx.core as mx

    check_safetensors(path, fix=fix)
    try:
        weights = mx.load(str(path))
    except (RuntimeError, ValueError) as exc:
        raise damaged(path, str(exc).splitlines()[0], fix) from None
    if finite:
        for name, value in weights.items():
            if mx.issubdtype(value.dtype, mx.floating) and not mx.all(mx.isfinite(value)).item():
                raise MacftError(f"{path}: tensor '{name}' holds NaN or infinite values (training diverged, or the file is damaged); {fix}.")
    return weights
