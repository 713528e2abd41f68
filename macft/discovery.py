"""Find the models already on this machine, and describe each without loading its weights.

Looks in the Hugging Face hub cache (``HF_HUB_CACHE``, ``HF_HOME/hub`` or ``~/.cache/huggingface/hub``),
macft's GGUF import cache, Ollama's blob store (``OLLAMA_MODELS`` or ``~/.ollama/models``, named
through its manifests), LM Studio's model folders (``~/.lmstudio/models``, ``~/.cache/lm-studio/models``)
and the embedded default. Family, size and quantization come from ``config.json`` or GGUF metadata.

    for found in find_models():
        print(found.name, found.spec, found.family, found.quantization)

``macft.models.spec`` says where each app keeps its models and resolves ``ollama:NAME`` specs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from macft.errors import MacftError
from macft.models.spec import DEFAULT_MODEL, embedded_default_path, hf_cache_dir, lm_studio_entries, ollama_entries

@dataclass(frozen=True)
class LocalModel:
    name: str  # hub id, Ollama name:tag, or file name
    source: str  # "embedded", "hf-cache", "macft-import", "ollama" or "lm-studio"
    spec: str  # what to pass to --model
    family: str | None
    params: int | None
    size_bytes: int
    quantization: str | None  # "Q4_K_M", "4-bit", "bfloat16", ...

    def to_dict(self) -> dict:
        return asdict(self)


def find_models() -> list[LocalModel]:
    """Every model found in the usual places; unreadable entries are skipped."""
    found = [*_embedded(), *_hf_cache(), *_import_cache(), *_ollama(), *_lm_studio()]
    return sorted(found, key=lambda m: (m.source != "embedded", m.source, m.name.lower()))


# ---------------------------------------------------------------------------- describing one model


def describe_dir(path: Path, name: str, source: str, spec: str) -> LocalModel:
    """A model directory, from its config.json and the sizes of its weight files."""
    from macft.models.shape import shape_from_config

    config = json.loads((path / "config.json").read_text())
    try:
        params = shape_from_config(config).params
    except MacftError:
        params = None
    quant = config.get("quantization")
    if isinstance(quant, dict) and "bits" in quant:
        quantization = f"{quant['bits']}-bit"
    else:
        quantization = config.get("torch_dtype") or config.get("dtype")
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))  # stat follows the hub's symlinks
    return LocalModel(name, source, spec, config.get("model_type"), params, size, quantization)


def describe_gguf(path: Path, name: str, source: str) -> LocalModel:
    """A GGUF file, from its metadata and tensor table (the tensors are not read)."""
    import numpy as np
    from gguf import LlamaFileType

    from macft.models.gguf_import.reader import read_gguf

    gguf = read_gguf(path)
    params = sum(int(np.prod(t.shape)) for t in gguf.tensors.values())
    file_type = gguf.metadata.get("general.file_type")
    try:
        quantization = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        quantization = None
    return LocalModel(name, source, str(path), gguf.architecture or None, params, path.stat().st_size, quantization)


# ---------------------------------------------------------------------------- where to look


def _embedded() -> list[LocalModel]:
    """The default model, described from its assembled GGUF when present (assembling it is
    left to the first ``load_model``, since it writes and hashes ~250 MB)."""
    try:
        path = embedded_default_path()
    except ImportError:
        return []
    try:
        found = describe_gguf(path, DEFAULT_MODEL, "embedded")
    except (MacftError, OSError):
        return [LocalModel(DEFAULT_MODEL, "embedded", DEFAULT_MODEL, "gemma3", None, 0, "Q4_K_M")]
    return [LocalModel(DEFAULT_MODEL, "embedded", DEFAULT_MODEL, found.family, found.params, found.size_bytes, found.quantization)]


def _hf_cache() -> list[LocalModel]:
    found = []
    for repo in sorted(hf_cache_dir().glob("models--*")):
        snapshots = [s for s in (repo / "snapshots").glob("*") if (s / "config.json").exists()]
        if not snapshots:
            continue
        latest = max(snapshots, key=lambda s: s.stat().st_mtime)
        repo_id = repo.name.removeprefix("models--").replace("--", "/", 1)
        try:
            found.append(describe_dir(latest, repo_id, "hf-cache", repo_id))
        except (OSError, ValueError):
            continue
    return found


def _import_cache() -> list[LocalModel]:
    from macft.paths import cache_dir

    found = []
    for model_dir in sorted(p for p in cache_dir("gguf").iterdir() if (p / "config.json").exists()):
        name = model_dir.name
        try:
            record = json.loads((model_dir / "macft_import.json").read_text())
            name = Path(record.get("source", name)).name + (" (dequantized)" if record.get("dequantized") else "")
        except (OSError, ValueError):
            pass
        try:
            found.append(describe_dir(model_dir, name, "macft-import", str(model_dir)))
        except (OSError, ValueError):
            continue
    return found


def _ollama() -> list[LocalModel]:
    return _described(ollama_entries(), "ollama")


def _described(entries: list[tuple[str, Path]], source: str) -> list[LocalModel]:
    """Each (name, GGUF file) described; unreadable files are skipped."""
    found = []
    for name, path in entries:
        try:
            found.append(describe_gguf(path, name, source))
        except (MacftError, OSError):
            continue
    return found


def _lm_studio() -> list[LocalModel]:
    return _described(lm_studio_entries(), "lm-studio")
