"""Find the models already on this machine, and describe each without loading its weights.

Looks in the Hugging Face hub cache (``HF_HUB_CACHE``, ``HF_HOME/hub`` or ``~/.cache/huggingface/hub``),
macft's GGUF import cache, Ollama's blob store (``OLLAMA_MODELS`` or ``~/.ollama/models``, named
through its manifests), LM Studio's model folders (``~/.lmstudio/models``, ``~/.cache/lm-studio/models``)
and the embedded default. Family, size and quantization come from ``config.json`` or GGUF metadata.

    for found in find_models():
        print(found.name, found.spec, found.family, found.quantization)
    resolve_app_model("ollama:qwen3:0.6b")   # the GGUF blob behind an Ollama name (also lmstudio:NAME)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from macft.errors import MacftError

OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"


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
    from macft.memory import shape_from_config

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
    from macft.config import DEFAULT_MODEL

    from macft.models.load import embedded_default_path

    try:
        path = embedded_default_path()
    except ImportError:
        return []
    try:
        found = describe_gguf(path, DEFAULT_MODEL, "embedded")
    except (MacftError, OSError):
        return [LocalModel(DEFAULT_MODEL, "embedded", DEFAULT_MODEL, "gemma3", None, 0, "Q4_K_M")]
    return [LocalModel(DEFAULT_MODEL, "embedded", DEFAULT_MODEL, found.family, found.params, found.size_bytes, found.quantization)]


def hf_cache_dir() -> Path:
    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(env).expanduser()
    if env := os.environ.get("HF_HOME"):
        return Path(env).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


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


def ollama_dir() -> Path:
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


def ollama_entries() -> list[tuple[str, Path]]:
    """(name:tag, GGUF blob) of every model in Ollama's store, named as ``ollama list`` names it."""
    root = ollama_dir()
    entries = []
    for manifest in sorted(p for p in (root / "manifests").glob("*/*/*/*") if p.is_file()):  # registry/namespace/model/tag
        try:
            layers = json.loads(manifest.read_text()).get("layers", [])
            digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_LAYER)
        except (OSError, ValueError, StopIteration, KeyError, AttributeError):
            continue
        namespace, model, tag = manifest.parts[-3:]
        name = f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
        entries.append((name, root / "blobs" / digest.replace(":", "-")))
    return entries


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


def lm_studio_dirs() -> list[Path]:
    home = Path.home()
    return [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]


def lm_studio_entries() -> list[tuple[str, Path]]:
    """(publisher/model/file.gguf, path) of every language-model GGUF in LM Studio's folders."""
    entries = []
    for root in lm_studio_dirs():
        for path in sorted(root.rglob("*.gguf")):
            if not path.name.startswith("mmproj"):  # vision projectors are not language models
                entries.append((str(path.relative_to(root)), path))
    return entries


def _lm_studio() -> list[LocalModel]:
    return _described(lm_studio_entries(), "lm-studio")


# ---------------------------------------------------------------------------- --model ollama:NAME, lmstudio:NAME

SPEC_PREFIXES = ("ollama:", "lmstudio:")


def resolve_app_model(spec: str) -> str:
    """The GGUF file behind ``ollama:NAME[:TAG]`` or ``lmstudio:NAME``; any other spec is returned as is.

    Ollama names match as ``ollama list`` shows them (the tag defaults to ``latest``). An LM Studio
    name matches a file's path under the models folder (with or without ``.gguf``), its folder
    (``publisher/model`` or ``model``, when that holds one GGUF) or its file name."""
    app, _, name = spec.partition(":")
    if f"{app}:" not in SPEC_PREFIXES:
        return spec
    if not name:
        raise MacftError(f"--model {spec}: name the model, e.g. {app}:qwen3:0.6b.")
    if app == "ollama":
        entries = ollama_entries()
        wanted = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
        matches = [path for known, path in entries if known.lower() == wanted.lower()]
        where = f"Ollama's store ({ollama_dir()})"
    else:
        entries = lm_studio_entries()
        matches = _lm_studio_matches(entries, name)
        where = f"LM Studio's folders ({', '.join(str(d) for d in lm_studio_dirs())})"
    if len(matches) == 1:
        return str(matches[0])
    names = [known for known, _ in entries]
    if len(matches) > 1:
        raise MacftError(f"--model {spec} matches {len(matches)} models in {where}: {', '.join(str(m) for m in matches)}; name one.")
    raise _not_found(spec, app, name, names, where)


def _lm_studio_matches(entries: list[tuple[str, Path]], name: str) -> list[Path]:
    wanted = name.lower().removesuffix(".gguf")
    per_folder: dict[str, list[Path]] = {}
    for known, path in entries:
        folder = str(Path(known).parent).lower()
        per_folder.setdefault(folder, []).append(path)
        per_folder.setdefault(Path(folder).name, []).append(path)
    exact = [path for known, path in entries if wanted in (known.lower().removesuffix(".gguf"), path.stem.lower())]
    return exact or per_folder.get(wanted, [])


def _not_found(spec: str, app: str, name: str, names: list[str], where: str) -> MacftError:
    import difflib

    if not names:
        return MacftError(f"--model {spec}: {where} holds no models.")
    close = difflib.get_close_matches(name.lower(), [n.lower() for n in names], n=5, cutoff=0.3)
    shown = [n for n in names if n.lower() in close] or names[:5]
    label = "close names" if close else "models there"
    return MacftError(f"--model {spec}: no such model in {where}; {label}: {', '.join(f'{app}:{n}' for n in shown)}.")
