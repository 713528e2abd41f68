"""An Ollama Modelfile for an exported GGUF (a full model, or a base plus a LoRA adapter GGUF).

    text = modelfile_text(ModelfileSpec(model="model.gguf", chat_template=tok.chat_template, eos_token="<eos>"))
    path = write_modelfile(spec, Path("Modelfile"))      # then: ollama create NAME -f Modelfile

Ollama speaks Go templates, not Jinja, so the TEMPLATE is chosen by recognising the chat format
the Jinja template writes (Gemma turns, Llama 3 headers, ChatML, Phi-3 role tags). A model without
a chat template gets the bare prompt; an unrecognised template is left to Ollama, which reads the
Jinja template stored in the GGUF. The stop tokens are the format's end-of-turn marker plus EOS,
so generation ends where the model was trained to end it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from macft.families import FAMILIES
from macft.families.base import ChatFormat
from macft.paths import atomic_path

MODELFILE_MARK = "# Written by `macft export gguf`; it replaces this file when asked to write it again."

# Each family's record names the chat format its templates write.
FORMATS = tuple(dict.fromkeys(f.chat_format for f in FAMILIES.values() if f.chat_format is not None))

PLAIN = ChatFormat("plain", "", "{{ .Prompt }}", ())


@dataclass(frozen=True)
class ModelfileSpec:
    model: str  # the GGUF (or, with an adapter, the base GGUF or model) for FROM
    adapter: str | None = None  # a LoRA adapter GGUF for ADAPTER
    chat_template: str | None = None  # the tokenizer's Jinja chat template
    eos_token: str | None = None
    context_length: int = 4096
    temperature: float = 0.7


def chat_format(chat_template: str | None) -> ChatFormat | None:
    """The known format a Jinja template writes; PLAIN without a template; None when unrecognised."""
    if not chat_template:
        return PLAIN
    return next((f for f in FORMATS if f.marker in chat_template), None)


def modelfile_text(spec: ModelfileSpec) -> str:
    fmt = chat_format(spec.chat_template)
    lines = [f"FROM {spec.model}"]
    if spec.adapter:
        lines.append(f"ADAPTER {spec.adapter}")
    if fmt is None:
        lines.append("# The chat template is not one macft knows; Ollama uses the one stored in the GGUF.")
        stops: tuple[str, ...] = ()
    else:
        lines.append(f'TEMPLATE """{fmt.template}"""')
        stops = fmt.stops
    for stop in dict.fromkeys([*stops, *([spec.eos_token] if spec.eos_token else [])]):
        lines.append(f'PARAMETER stop "{stop}"')
    lines.append(f"PARAMETER temperature {spec.temperature}")
    lines.append(f"PARAMETER num_ctx {min(spec.context_length, 4096)}")
    lines.append(MODELFILE_MARK)
    return "\n".join(lines) + "\n"


def write_modelfile(spec: ModelfileSpec, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(modelfile_text(spec))
    return path


def ollama_command(name: str, path: Path) -> str:
    return f"ollama create {name} -f {path}"


def is_exported_modelfile(path: Path) -> bool:
    try:
        return MODELFILE_MARK in Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return False
