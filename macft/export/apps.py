"""Hand an exported GGUF to the apps people run models in: Ollama and LM Studio.

    path = lm_studio_path("my-model-q4_k_m.gguf")       # ~/.lmstudio/models/macft/my-model-q4_k_m/…
    done = ollama_create("my-model", Path("x.Modelfile"))  # runs `ollama create` when the command exists

Ollama and ADAPTER Modelfiles: Ollama's source up to v0.33.0-rc2 (commit fb30760, 2026-08-21) accepts
them: ``parser/parser.go`` parses ``ADAPTER``, ``cmd/cmd.go`` uploads the file, ``server/create.go`` stores
a GGUF adapter as an ``application/vnd.ollama.image.adapter`` layer (one per model) and
``llm/llama_server.go`` passes it to llama-server as ``--lora``. A third-party report (ollama/ollama pull
request 14969, merged 2026-09-15) says Ollama 0.34.1 and later refuse such Modelfiles at ``ollama create``
while still serving models built before; that source was not available to check. So the fused model is
the default route, and the adapter-only route says which versions it is known to work with.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from macft.errors import MacftError

LM_STUDIO_PUBLISHER = "macft"  # LM Studio lists models as publisher/model; ours go under one publisher
ADAPTER_VERSIONS_NOTE = (
    "Ollama accepts ADAPTER Modelfiles up to at least 0.33 (checked in its source); a third-party report "
    "(ollama/ollama#14969) says 0.34.1 and later refuse them, so export without --adapter-only for a fused "
    "model every version runs"
)


@dataclass(frozen=True)
class OllamaCreate:
    ran: bool  # whether `ollama create` ran (False: the command is not installed here)
    command: str  # the command line, to show or to run by hand
    output: str  # the last line Ollama printed, when it ran


def lm_studio_models_dir() -> Path:
    """The models folder LM Studio reads: the first of its usual folders that exists, else the newer default."""
    from macft.models.spec import lm_studio_dirs

    folders = lm_studio_dirs()
    return next((d for d in folders if d.is_dir()), folders[0])


def lm_studio_path(file_name: str) -> Path:
    """Where an exported GGUF goes so LM Studio lists it (``<models>/macft/<stem>/<file>``)."""
    stem = Path(file_name).stem
    return lm_studio_models_dir() / LM_STUDIO_PUBLISHER / stem / file_name


def ollama_model_name(name: str) -> str:
    """Ollama model names are lower case with letters, digits, '-', '_', '.', ':' and '/'."""
    if not name or any(not (c.isalnum() or c in "-_.:/") for c in name):
        raise MacftError(f"--ollama '{name}' is not a valid Ollama model name; use letters, digits, '-', '_', '.' and an optional ':tag'.")
    return name.lower()


def ollama_create(name: str, modelfile: Path) -> OllamaCreate:
    """Run ``ollama create NAME -f MODELFILE`` when ``ollama`` is on PATH; otherwise return the command to run."""
    from macft.export.modelfile import ollama_command

    shown = ollama_command(name, modelfile)
    executable = shutil.which("ollama")
    if executable is None:
        return OllamaCreate(False, shown, "")
    done = subprocess.run([executable, "create", name, "-f", str(modelfile)], capture_output=True, text=True)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    if done.returncode != 0:
        hint = f"; {ADAPTER_VERSIONS_NOTE}" if "ADAPTER" in modelfile.read_text() else ""
        raise MacftError(f"`{shown}` failed ({last or f'exit code {done.returncode}'}){hint}.")
    return OllamaCreate(True, shown, last)
