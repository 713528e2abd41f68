"""Import a GGUF file (llama.cpp / Ollama) as an MLX model directory, exactly and once.

Quantized weights in a type with an exact affine form (its ``macft.quants`` record says: Q8_0, the
Q4/Q5 types) become MLX quantized layers that dequantize to the very values llama.cpp uses; other
types become float. The directory is
cached under ``cache_dir("gguf")/<sha256 of the file>[-dequantized]`` and reused; the file's
hash is remembered by path, size and mtime so a re-import costs a ``stat``.

    from macft.models.gguf_import import import_gguf, import_gguf_report
    model_dir = import_gguf("gemma-3-270m-q4_k_m.gguf")           # for mlx_lm.load(model_dir)
    report = import_gguf_report("model.gguf", out="my-model", dequantize=True)
    report.summary  # {"exact": {"Q4_K": 27, ...}, "float": {"Q6_K": 9, "F32": 109}}
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from macft.errors import MacftError
from macft.models.gguf_import.convert import convert_gguf
from macft.models.gguf_import.reader import read_gguf
from macft.outputs import IMPORT_RECORD, check_output, manifest
from macft.paths import atomic_path, cache_dir
from macft.phases import phase

__all__ = ["ImportReport", "file_sha256", "import_gguf", "import_gguf_report"]

HASHES_FILE = "hashes.json"
FORMAT = 1  # bump when the importer's output changes, so older cached imports are redone


@dataclass
class ImportReport:
    path: Path  # the MLX model directory
    source: Path  # the GGUF file
    sha256: str
    architecture: str
    dequantized: bool
    cached: bool  # True when an earlier import was reused
    seconds: float
    summary: dict = field(default_factory=dict)  # {"exact": {type: n}, "float": {type: n}}

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "source": str(self.source),
            "sha256": self.sha256,
            "architecture": self.architecture,
            "dequantized": self.dequantized,
            "cached": self.cached,
            "seconds": round(self.seconds, 3),
            "summary": self.summary,
        }


def import_gguf(path: str | Path, *, dequantize: bool = False, out: str | Path | None = None) -> Path:
    """The MLX model directory for ``path``, importing it first unless it is cached."""
    return import_gguf_report(path, dequantize=dequantize, out=out).path


def import_gguf_report(path: str | Path, *, dequantize: bool = False, out: str | Path | None = None, force: bool = False) -> ImportReport:
    """Import ``path`` into ``out`` (default: the cache) and say what was converted how."""
    start = time.perf_counter()
    source = Path(path).expanduser()
    if not source.is_file():
        raise MacftError(f"GGUF file {source} does not exist.")
    sha = file_sha256(source)
    target = Path(out).expanduser() if out is not None else cache_dir("gguf") / (sha + ("-dequantized" if dequantize else ""))
    previous = _read_summary(target)
    if previous and (previous.get("sha256"), previous.get("dequantized"), previous.get("format")) == (sha, dequantize, FORMAT):
        return _report(target, source, previous, cached=True, start=start)
    if out is not None:  # the cache's own folders are macft's to replace
        target = check_output(target, "import", record=IMPORT_RECORD, inputs=[source], force=force)

    gguf = read_gguf(source)
    sibling = cache_dir("gguf") / (sha if dequantize else f"{sha}-dequantized")  # the other variant's tokenizer
    with atomic_path(target) as tmp, phase(f"Importing {source.name} (once; cached after)"):
        tmp.mkdir()
        reuse = (_read_summary(sibling) or {}).get("format") == FORMAT
        summary = convert_gguf(gguf, tmp, dequantize=dequantize, tokenizer_from=sibling if reuse else None)
        record = {
            "format": FORMAT,
            "sha256": sha,
            "source": str(source),
            "architecture": gguf.architecture,
            "dequantized": dequantize,
            "summary": summary,
            "files": manifest(tmp),
        }
        (tmp / IMPORT_RECORD).write_text(json.dumps(record, indent=2))
    return _report(target, source, record, cached=False, start=start)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered by (path, size, mtime) in the import cache."""
    stat = path.stat()
    key = str(path.resolve())
    stamp = [stat.st_size, stat.st_mtime_ns]
    memo_path = cache_dir("gguf") / HASHES_FILE
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    memo[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    with atomic_path(memo_path) as tmp:
        tmp.write_text(json.dumps(memo, indent=1))
    return memo[key]["sha256"]


def _read_summary(target: Path) -> dict | None:
    try:
        return json.loads((target / IMPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None


def _report(target: Path, source: Path, record: dict, *, cached: bool, start: float) -> ImportReport:
    return ImportReport(
        path=target,
        source=source,
        sha256=record["sha256"],
        architecture=record["architecture"],
        dequantized=record["dequantized"],
        cached=cached,
        seconds=time.perf_counter() - start,
        summary=record["summary"],
    )
