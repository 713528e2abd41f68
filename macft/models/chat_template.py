"""A model's chat template, rendered with limits on time and output, every failure one line.

    ids = template_tokens(tokenizer, messages, add_generation_prompt=True)

A chat template is code that ships with the model. transformers renders it in jinja2's sandbox (no
files, imports or private attributes; each ``range()`` at most 100,000 items) but puts no bound on
how long it runs or how much it writes: two nested ``range(99999)`` loops hang, and a template may
legitimately refuse a conversation by raising. Here every render gets a deadline and an output
budget: the sandbox environment transformers compiled checks them on every call, attribute
lookup and output chunk, and on the main thread a timer stops loops that do none of those.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from macft.errors import MacftError

RENDER_SECONDS = 5.0
RENDER_CHARS = 16_000_000


class TemplateLimit(Exception):
    """A render ran past its deadline or output budget."""


@dataclass
class _Budget:
    deadline: float
    chars: int

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"ran longer than {RENDER_SECONDS:g} s (a runaway loop?)")


_budget: ContextVar[_Budget | None] = ContextVar("macft_template_budget", default=None)


class _Limited:
    """Mixed into the sandbox environment's class: checks the active budget, if any, as it renders."""

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        if budget := _budget.get():
            budget.tick()
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        if budget := _budget.get():
            budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        if budget := _budget.get():
            budget.tick()
        return super().getitem(obj, argument)

    def concat(self, chunks) -> str:
        budget = _budget.get()
        if budget is None:
            return "".join(chunks)
        kept, size = [], 0
        for chunk in chunks:
            size += len(chunk)
            if size > budget.chars:
                raise TemplateLimit(f"wrote more than {budget.chars:,} characters (a runaway loop?)")
            budget.tick()
            kept.append(chunk)
        return "".join(kept)


@lru_cache(maxsize=None)
def _limited_class(base: type) -> type:
    return type(f"Limited{base.__name__}", (_Limited, base), {})


def _limit_environment(tokenizer: Any, tools: list | None) -> None:
    """Give the sandbox environment transformers compiled this template into the budget checks."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        environment = _compile_jinja_template(hf.get_chat_template(None, tools)).environment
    except Exception:  # another transformers layout: the main-thread timer still bounds the time
        return
    if not isinstance(environment, _Limited):
        environment.__class__ = _limited_class(type(environment))


@contextmanager
def _render_budget() -> Iterator[None]:
    token = _budget.set(_Budget(time.monotonic() + RENDER_SECONDS, RENDER_CHARS))
    timer = threading.current_thread() is threading.main_thread()
    if timer:

        def expire(signum, frame):
            raise TemplateLimit(f"ran longer than {RENDER_SECONDS:g} s (a runaway loop?)")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, RENDER_SECONDS + 0.5)
    try:
        yield
    finally:
        if timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        _budget.reset(token)


def template_tokens(tokenizer: Any, messages: list[dict], *, add_generation_prompt: bool, tools: list | None = None, where: str = "") -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template; ``where`` prefixes errors (a data line)."""
    kwargs = {"tools": tools} if tools else {}
    _limit_environment(tokenizer, tools)
    try:
        with _render_budget():
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs)
    except Exception as exc:  # jinja's TemplateError and SecurityError, TemplateLimit, and whatever template code raises
        raise MacftError(f"{where + ': ' if where else ''}{template_failure(tokenizer, messages, exc)}") from None
    if isinstance(ids, dict):  # some tokenizers return a BatchEncoding even when asked not to
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def template_failure(tokenizer: Any, messages: list[dict], exc: Exception) -> str:
    """One sentence: whose template failed, on what, and why."""
    from jinja2.exceptions import SecurityError, TemplateError

    reason = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
    roles = ", ".join(str(m.get("role")) for m in messages)
    owner = f"The chat template of {template_owner(tokenizer)}"
    if isinstance(exc, TemplateLimit):
        return f"{owner} was stopped: it {reason}; fix or replace the template (chat_template in tokenizer_config.json)."
    if isinstance(exc, SecurityError):
        return f"{owner} tried something the sandbox forbids ({reason}); fix or replace the template."
    if isinstance(exc, TemplateError):
        return f"{owner} rejected the conversation (roles: {roles}): {reason}."
    return f"{owner} failed on the conversation (roles: {roles}): {type(exc).__name__}: {reason}."


def template_owner(tokenizer: Any) -> str:
    """The model the template came from: the GGUF file of an import, else the model folder."""
    from macft.models.gguf_import.convert import SUMMARY_FILE

    folder = Path(str(getattr(tokenizer, "name_or_path", "") or getattr(getattr(tokenizer, "_tokenizer", None), "name_or_path", "")))
    try:
        return json.loads((folder / SUMMARY_FILE).read_text())["source"]
    except (OSError, ValueError, KeyError):
        return str(folder) if str(folder) not in ("", ".") else "this model"
