"""Read a GGUF file's header, metadata and tensor table, checking every length against the file.

gguf-py's ``GGUFReader`` builds a Python object per array element (slow for a large vocabulary)
and trusts the lengths it reads. This reader parses the same format with bounds
checks, so a corrupt, truncated or foreign file becomes one ``MacftError`` instead of a crash
or a hang, and tensor bytes stay in a read-only memory map until they are converted.

    gguf = read_gguf("model.gguf")
    gguf.architecture, gguf.metadata["gemma3.block_count"], gguf.rows("token_embd.weight")
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from macft.errors import MacftError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_DIMENSION = 2**31 - 1  # MLX's shape dimensions are int32

# struct format and size of each fixed-size metadata value type (GGUF is little-endian)
_SCALARS = {
    GGUFValueType.UINT8: ("<B", np.uint8),
    GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16),
    GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32),
    GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.FLOAT32: ("<f", np.float32),
    GGUFValueType.BOOL: ("<?", np.bool_),
    GGUFValueType.UINT64: ("<Q", np.uint64),
    GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT64: ("<d", np.float64),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, columns); GGUF stores the reverse
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    buffer: np.ndarray  # the whole file, memory-mapped read-only

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_key(self, key: str, default: Any = None) -> Any:
        """``{architecture}.{key}`` from the metadata."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def rows(self, name: str) -> np.ndarray:
        """A tensor's raw bytes as ``(rows, bytes per row)`` uint8; one row per output feature."""
        info = self.tensors[name]
        data = self.buffer[info.offset : info.offset + info.nbytes]
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        return data.reshape(rows, -1)


def is_gguf_file(path: Path) -> bool:
    """A .gguf file, or a file that starts like one (Ollama's blobs have no extension)."""
    if path.suffix == ".gguf":
        return True
    try:
        with path.open("rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse ``path``; raise ``MacftError`` naming the file if it is not a complete GGUF."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise MacftError(f"Cannot read {path}: {exc.strerror}.") from None
    if size < 24:
        raise MacftError(f"{path} is not a GGUF file (only {size} bytes).")
    with path.open("rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if mapped[:4] != MAGIC:
        raise MacftError(f"{path} is not a GGUF file (it does not start with 'GGUF').")
    try:
        version, metadata, tensors = _Parser(mapped, size).parse()
    except _Truncated as exc:
        # names read from a corrupt file may hold any bytes: escape them so the message stays one line
        reason = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(exc))[:300]
        raise MacftError(f"{path} is truncated or corrupt ({reason}); download or export it again.") from None
    buffer = np.frombuffer(mapped, dtype=np.uint8)
    return GGUFFile(path, version, metadata, tensors, buffer)


class _Truncated(Exception):
    pass


class _Parser:
    def __init__(self, data: mmap.mmap, size: int):
        self.data = data
        self.size = size
        self.pos = 4

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(f"{what} runs past the end of the file at byte {self.pos}")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise _Truncated(f"metadata '{key}' has unknown value type {vtype}") from None
        if vtype == GGUFValueType.STRING:
            return self.string(key)
        if vtype == GGUFValueType.ARRAY:
            item_type = self.scalar("<I", key)
            count = self.scalar("<Q", key)
            if item_type in _SCALARS:
                fmt, dtype = _SCALARS[GGUFValueType(item_type)]
                nbytes = count * struct.calcsize(fmt)
                self.need(nbytes, key)
                items = np.frombuffer(self.data, dtype=np.dtype(dtype).newbyteorder("<"), count=count, offset=self.pos)
                self.pos += nbytes
                return items.tolist()
            # each element takes at least 8 bytes (a string length or an array header)
            self.need(count * 8, key)
            return [self.value(item_type, key) for _ in range(count)]
        fmt, _ = _SCALARS[vtype]
        return self.scalar(fmt, key)

    def parse(self) -> tuple[int, dict[str, Any], dict[str, TensorInfo]]:
        version = self.scalar("<I", "version")
        if version not in (2, 3):
            raise _Truncated(f"unsupported GGUF version {version}; only versions 2 and 3 (little-endian) are read")
        n_tensors = self.scalar("<Q", "tensor count")
        n_kv = self.scalar("<Q", "metadata count")
        # the smallest metadata entry is 13 bytes and the smallest tensor entry 24
        self.need(n_kv * 13 + n_tensors * 24, "header counts")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self.string("metadata key")
            metadata[key] = self.value(self.scalar("<I", key), key)
        entries = []
        for _ in range(n_tensors):
            name = self.string("tensor name")
            n_dims = self.scalar("<I", name)
            if not 1 <= n_dims <= MAX_DIMS:
                raise _Truncated(f"tensor '{name}' has {n_dims} dimensions")
            dims = [self.scalar("<Q", name) for _ in range(n_dims)]
            if max(dims) > MAX_DIMENSION:
                raise _Truncated(f"tensor '{name}' has a dimension of {max(dims)}, more than MLX holds ({MAX_DIMENSION})")
            raw_type = self.scalar("<I", name)
            offset = self.scalar("<Q", name)
            entries.append((name, dims, raw_type, offset))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise _Truncated(f"general.alignment is {alignment!r}")
        data_start = -(-self.pos // alignment) * alignment
        return version, metadata, {e[0]: self.tensor(*e, data_start) for e in entries}

    def tensor(self, name: str, dims: list[int], raw_type: int, offset: int, data_start: int) -> TensorInfo:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise _Truncated(f"tensor '{name}' has unknown type {raw_type}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise _Truncated(f"tensor '{name}' has rows of {dims[0]}, not a multiple of {qtype.name}'s block of {block}")
        count = int(np.prod(dims, dtype=np.float64))
        nbytes = count // block * type_size
        start = data_start + offset
        if start + nbytes > self.size:
            raise _Truncated(f"tensor '{name}' ends at byte {start + nbytes} of {self.size}")
        return TensorInfo(name, tuple(int(d) for d in reversed(dims)), qtype, start, nbytes)
