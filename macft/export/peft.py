"""``macft export peft``: a run's LoRA/DoRA adapter as Hugging Face PEFT saves it, with a model card.

    result = export_peft("runs/quickstart")                         # -> runs/quickstart/peft/
    result = export_peft("runs/x", "peft/x", base="Qwen/Qwen3-0.6B")  # base_model_name_or_path given

The conversion itself is ``macft.adapters.peft``; this module picks base_model_name_or_path (the
run's base as transformers names it), applies the overwrite policy and writes the folder atomically:
``adapter_config.json``, ``adapter_model.safetensors``, ``README.md`` (the card) and macft's record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from macft.errors import MacftError

CARD_FILE = "README.md"
EXPORT_RECORD = "macft_peft.json"  # how `export peft` recognises its own earlier output (never uploaded)
EMBEDDED_BASE = "google/gemma-3-270m"  # the checkpoint the embedded default's Q4_K_M GGUF was made from


@dataclass(frozen=True)
class PeftExport:
    path: Path
    base_model: str  # base_model_name_or_path
    method: str
    rank: int
    alpha: float
    modules: int  # adapted layers
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path), "notes": list(self.notes)}


def export_peft(
    run_dir: str | Path, out: str | Path | None = None, *, base: str | None = None, force: bool = False, repo: str | None = None
) -> PeftExport:
    """Write the adapter of ``run_dir`` into the folder ``out`` (default ``RUN/peft``); ``base`` replaces the
    recorded base as base_model_name_or_path; the card names ``repo`` when the folder is going to the Hub."""
    from macft.adapters.peft import peft_method, to_peft, write_peft
    from macft.export.fuse import read_adapter_config
    from macft.export.hub import model_card, run_facts
    from macft.outputs import check_output, manifest
    from macft.paths import atomic_path

    run_dir = Path(run_dir)
    config = read_adapter_config(run_dir)
    peft_method(config)  # before anything else: a method PEFT cannot carry
    out = Path(out) if out is not None else run_dir / "peft"
    recorded = config.get("base_model") or {}
    inputs = [run_dir, recorded.get("source"), recorded.get("path")]
    check_output(out, "export peft", record=EXPORT_RECORD, inputs=inputs, force=force)
    base_name, revision, notes = peft_base_name(run_dir, base)
    files = to_peft(run_dir, base_name, revision)
    card = model_card(base_name, run_facts(run_dir), kind="peft", title=repo or out.resolve().name, location=repo or str(out))
    with atomic_path(out) as tmp:
        tmp.mkdir()
        write_peft(files, tmp)
        (tmp / CARD_FILE).write_text(card)
        (tmp / EXPORT_RECORD).write_text(json.dumps({"run": str(run_dir.resolve()), "base_model": recorded, "files": manifest(tmp)}, indent=2))
    return PeftExport(out, base_name, files.method, int(config["rank"]), float(config["alpha"]), files.modules, tuple(notes))


def peft_base_name(run_dir: Path, base: str | None = None) -> tuple[str, str | None, list[str]]:
    """(base_model_name_or_path, revision, notes): ``base`` when given, else the run's recorded base as
    transformers names it (a hub id or a folder); a GGUF base names the checkpoint it came from when it says so."""
    from macft.adapters.peft import looks_like_hub_id
    from macft.models.spec import DEFAULT_MODEL
    from macft.run_base import recorded_base

    if base:
        return base, None, []
    recorded = recorded_base(run_dir)
    spec = recorded.spec
    if spec == DEFAULT_MODEL:
        return EMBEDDED_BASE, None, [
            f"the run's base is the embedded Q4_K_M GGUF of {EMBEDDED_BASE}; PEFT applies the adapter to that checkpoint's float weights"
        ]
    origin = _gguf_origin(spec)
    if origin is not None:
        if not origin:
            raise MacftError(
                f"The run's base {spec} is a GGUF file, which transformers does not load as a PEFT base; "
                "pass --base with the Hugging Face model it was made from (a hub id or a folder)."
            )
        return origin, None, [f"the run's base is the GGUF {spec}; the adapter names the checkpoint it was converted from, {origin}"]
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve()), None, []
    if looks_like_hub_id(spec):
        return spec, recorded.options.get("revision"), []
    raise MacftError(f"The run's base {spec} no longer exists; pass --base with its hub id or folder.")


def _gguf_origin(spec: str) -> str | None:
    """For a GGUF spec, the hub id its metadata names as its source ("" when it names none); None for other specs."""
    from macft.adapters.peft import looks_like_hub_id
    from macft.models.spec import resolve_app_model
    from macft.models.gguf_import.reader import is_gguf_file, read_gguf

    try:
        path = Path(resolve_app_model(spec)).expanduser()
    except MacftError:
        return None
    if not (path.is_file() and is_gguf_file(path)):
        return None
    metadata = read_gguf(path).metadata
    for key in ("general.source.huggingface.repository", "general.base_model.0.repo_url", "general.source.url"):
        hub_id = str(metadata.get(key) or "").removeprefix("https://huggingface.co/").strip("/")
        if looks_like_hub_id(hub_id):
            return hub_id
    return ""
