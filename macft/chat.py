"""Generation and chat sessions over a base model and, optionally, a trained adapter.

``open_model`` loads the base (from ``--model``, or the base recorded in an adapter's run
directory) and applies the adapter; ``generate`` answers one prompt; ``ChatSession`` keeps the
conversation, swaps adapters without reloading the base, and answers the last prompt with the
base and the tuned model side by side. Streaming uses ``mlx_lm.stream_generate``; prompts go
through the tokenizer's chat template when it has one, else they are continued as plain text.
Nothing here prints: the ``chat`` and ``generate`` commands render what these functions yield.

    opened = open_model(None, adapter="runs/quickstart")      # base model from the run's recipe
    result = generate(opened.model, opened.tokenizer, "Sentence: Ann is 30.\\nJSON:", Sampling(max_tokens=40))
    session = ChatSession(opened, system="Answer briefly.")
    for piece in session.reply("Hello"): ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from macft.engines import OpenedModel
from macft.errors import MacftError


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0


@dataclass(frozen=True)
class Generated:
    prompt: str
    completion: str
    tokens: int
    tokens_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "completion": self.completion, "tokens": self.tokens, "tokens_per_second": self.tokens_per_second}


# ---------------------------------------------------------------------------- loading


def open_model(model_spec: str | None, adapter: str | Path | None = None, engine: str = "mlx") -> OpenedModel:
    """Load ``model_spec`` (or the adapter's recorded base when it is None) and apply ``adapter``;
    ``engine="llama.cpp"`` runs their cached Q8_0 GGUF export instead (``macft.engines.llamacpp``)."""
    if adapter is not None:
        from macft.adapters.peft import adapter_run

        adapter = adapter_run(adapter, model_spec)  # a PEFT adapter (folder or hub id) becomes a macft adapter folder
    if engine == "llama.cpp":
        from macft.engines.llamacpp import open_llamacpp

        return open_llamacpp(model_spec, adapter)
    from macft.models.load import load_model
    from macft.models.spec import DEFAULT_MODEL
    from macft.models.quantized import dequantize_for_generation
    from macft.run_base import load_run_base

    loaded = load_run_base(adapter, model_spec) if adapter is not None else load_model(model_spec or DEFAULT_MODEL)
    dequantize_for_generation(loaded.model)
    opened = OpenedModel(loaded, loaded.model)
    if adapter is not None:
        set_adapter(opened, adapter)
    return opened


def set_adapter(opened: OpenedModel, adapter: str | Path | None) -> None:
    """Replace the applied adapter (or remove it, for None) on the same base weights.

    A path without adapter files changes nothing; an adapter that fails to load leaves the base.
    """
    from macft.adapters.files import adapter_files, load_adapter
    from macft.adapters.peft import adapter_run

    if adapter is not None:
        adapter = adapter_run(adapter, opened.loaded.identity["source"])  # a PEFT adapter, converted for this base
        adapter_files(Path(adapter))
    base = opened.loaded.model
    for parent, key, original in reversed(opened.replaced):
        parent[key] = original
    opened.replaced = []
    opened.model, opened.adapter, opened.adapter_config, opened.warnings = base, None, None, []
    if adapter is None:
        return
    before = _module_slots(base)
    try:
        model, config = load_adapter(base, Path(adapter))
    except Exception:
        for parent, key, original in _swapped_out(before, _module_slots(base)):
            parent[key] = original  # a half-applied adapter must not stay in the base
        raise
    opened.replaced = _swapped_out(before, _module_slots(base))
    opened.model, opened.adapter, opened.adapter_config = model, Path(adapter), config
    recorded = (config.get("base_model") or {}).get("sha256")
    if recorded and recorded != opened.loaded.identity.get("sha256"):
        opened.warnings.append(
            f"{adapter} was trained on a different base model ({(config.get('base_model') or {}).get('source', '?')}); its outputs may be meaningless."
        )


def _swapped_out(before: dict, after: dict) -> list[tuple[Any, Any, Any]]:
    """The outermost base modules that a method replaced, as (parent, key, original module)."""
    changed = sorted((name for name in before if name in after and after[name][2] is not before[name][2]), key=len)
    kept: list[str] = []
    for name in changed:
        if not any(name.startswith(prefix + ".") for prefix in kept):
            kept.append(name)
    return [before[name] for name in kept]


def _module_slots(model) -> dict[str, tuple[Any, Any, Any]]:
    """name -> (parent container, key in it, module) for every submodule, lists included."""
    slots: dict[str, tuple[Any, Any, Any]] = {}

    def visit(container: Any, prefix: str) -> None:
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in items:
            name = f"{prefix}{key}"
            if isinstance(value, dict) and hasattr(value, "children"):  # an nn.Module
                slots[name] = (container, key, value)
                visit(value, name + ".")
            elif isinstance(value, (list, tuple)) and any(hasattr(v, "children") for v in value):
                visit(value, name + ".")

    visit(model, "")
    return slots


# ---------------------------------------------------------------------------- generation


def prompt_tokens(tokenizer, messages: list[dict[str, str]], use_chat_template: bool | None = None) -> list[int]:
    """Token ids for ``messages``: through the chat template (with the assistant turn opened) when
    the tokenizer has one, else the system text and the last user message as plain text."""
    from macft.models.chat_template import template_tokens
    from macft.data.templates import uses_chat_template

    if uses_chat_template(tokenizer, use_chat_template):
        return template_tokens(tokenizer, messages, add_generation_prompt=True)
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return tokenizer.encode(f"{system}\n\n{user}" if system else user)


def stream(model, tokenizer, tokens: list[int], sampling: Sampling) -> Iterator[Any]:
    """``mlx_lm`` generation responses for ``tokens``; the last one carries the totals."""
    if hasattr(model, "stream_tokens"):  # the llama.cpp engine
        yield from model.stream_tokens(tokenizer, tokens, sampling)
        return
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p if sampling.top_p < 1.0 else 0.0)
    yield from stream_generate(model, tokenizer, tokens, max_tokens=sampling.max_tokens, sampler=sampler)


def generate(
    model,
    tokenizer,
    prompt: str,
    sampling: Sampling = Sampling(),
    *,
    system: str | None = None,
    chat: bool | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generated:
    """Answer one prompt (via the chat template when ``chat`` is None and the tokenizer has one);
    ``on_text`` receives each piece of text as it is generated."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    pieces, last = [], None
    for last in stream(model, tokenizer, prompt_tokens(tokenizer, messages, chat), sampling):
        pieces.append(last.text)
        if on_text is not None:
            on_text(last.text)
    tokens = last.generation_tokens if last is not None else 0
    speed = last.generation_tps if last is not None else 0.0
    return Generated(prompt, "".join(pieces), tokens, speed)


EMPTY_ANSWER = "(empty answer: the model ended its reply without any text)"


def shown(answer: str) -> str:
    """An answer as printed: an empty or blank one says so instead of printing nothing."""
    return answer if answer.strip() else EMPTY_ANSWER


# ---------------------------------------------------------------------------- chat


HELP = """Commands:
  /reset          start a new conversation (keeps the system prompt)
  /adapter PATH   switch to another trained adapter (run directory) on the same base; /adapter none removes it
  /compare        answer the last prompt with the base and the tuned model, side by side
  /help           this help
  /quit           leave (Ctrl-D works too)"""


@dataclass
class Command:
    """A parsed chat input line: ``name`` is "say" for a message, else the slash command."""

    name: str
    argument: str = ""


def parse(line: str) -> Command:
    text = line.strip()
    if not text.startswith("/"):
        return Command("say", text)
    name, _, argument = text[1:].partition(" ")
    name = name.lower()
    if name not in ("reset", "adapter", "compare", "help", "quit", "exit"):
        raise MacftError(f"Unknown command /{name}; type /help for the list.")
    return Command("quit" if name == "exit" else name, argument.strip())


class ChatSession:
    """One conversation: history, sampling settings, and the opened model whose adapter can change."""

    def __init__(self, opened: OpenedModel, system: str | None = None, sampling: Sampling = Sampling()):
        self.opened = opened
        self.system = system
        self.sampling = sampling
        self.history: list[dict[str, str]] = []
        self.last_prompt: str | None = None

    def messages(self, prompt: str, history: bool = True) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.history if history else []) + [{"role": "user", "content": prompt}]

    def reply(self, prompt: str) -> Iterator[str]:
        """Stream the answer to ``prompt`` and add the exchange to the history."""
        self.last_prompt = prompt
        tokens = prompt_tokens(self.opened.tokenizer, self.messages(prompt))
        pieces = []
        for response in stream(self.opened.model, self.opened.tokenizer, tokens, self.sampling):
            pieces.append(response.text)
            yield response.text
        self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": "".join(pieces)}]

    def reset(self) -> None:
        self.history = []
        self.last_prompt = None

    def set_adapter(self, path: str | None) -> None:
        set_adapter(self.opened, None if path in (None, "", "none") else path)

    def compare(self) -> tuple[str, str]:
        """(base answer, tuned answer) to the last prompt, each from the conversation before it."""
        from macft.methods import adapters_disabled

        if self.last_prompt is None:
            raise MacftError("Nothing to compare yet: send a message first.")
        if self.opened.adapter is None:
            raise MacftError("No adapter is loaded, so base and tuned are the same; use /adapter PATH first.")
        before = self.history[:-2] if len(self.history) >= 2 else []
        system = [{"role": "system", "content": self.system}] if self.system else []
        tokens = prompt_tokens(self.opened.tokenizer, system + before + [{"role": "user", "content": self.last_prompt}])
        tokenizer, model = self.opened.tokenizer, self.opened.model
        tuned = "".join(r.text for r in stream(model, tokenizer, tokens, self.sampling))
        with adapters_disabled(model):
            base = "".join(r.text for r in stream(model, tokenizer, tokens, self.sampling))
        return base, tuned
