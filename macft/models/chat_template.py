"""A model's chat template, rendered with limits on time and output, every failure one line.

    ids = template_tokens(tokenizer, messages, add_generation_prompt=True)

A chat template is code that ships with the model. transformers renders it in jinja2's sandbox (no
files, imports or private attributes; each ``range()`` at most 100,000 items) but puts no bound on
how long it runs or how much it builds: two nested ``range(99999)`` loops hang, ``'xy' * 5*10**9``
builds 10 GB in one C call (while compiling, as jinja folds constants), and a template may
legitimately refuse a conversation by raising. Here every compilation and render gets a deadline
and an output budget. The template is compiled in a sandbox of ours, which

- sends the operators that can multiply a size (``*``, ``**``, ``+``, ``%``) through checks that
  refuse a result over the budget before it is built (so jinja no longer folds them while compiling),
  and does the same for the calls and filters that can (``center``, ``join``, ``replace``,
  ``format``, ``indent``, ``tojson``, ...);
- checks the deadline, and the size of every value, on every call, attribute lookup and output chunk;

and on the main thread a timer stops loops that do none of those. Tokenizing the rendered text is
not part of the template's time.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

from macft.errors import MacftError

RENDER_SECONDS = 5.0
RENDER_CHARS = 16_000_000
RENDER_BITS = 1 << 16  # the largest integer a template may compute; templates count turns, not atoms


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


def _tick() -> None:
    if budget := _budget.get():
        budget.tick()


def _fits(size: int, what: str) -> None:
    """Refuse to build ``what`` of ``size`` characters or items when that is over the budget."""
    budget = _budget.get()
    limit = budget.chars if budget else RENDER_CHARS
    if size > limit:
        raise TemplateLimit(f"asked for {what} of {size:,} characters or items, more than the {limit:,} allowed (a runaway loop?)")


def _checked(value: Any) -> Any:
    """``value``, unless it is a string or collection already over the budget."""
    if isinstance(value, (str, bytes, list, tuple, dict)):
        _fits(len(value), "a value")
    return value


def _number_fits(bits: int) -> None:
    if bits > RENDER_BITS:
        raise TemplateLimit(f"asked for a number of about {bits:,} bits, more than the {RENDER_BITS:,} allowed (a runaway computation?)")


_DIGITS = re.compile(r"\d+")


def _format_fits(spec: str, args: Any = ()) -> None:
    """A %- or {}-format string pads to the widths and precisions it names, and ``*`` takes them from its arguments."""
    for digits in _DIGITS.findall(spec):
        if len(digits) > 9 and int(digits) > RENDER_CHARS:
            _fits(int(digits), "a format width")
    if "*" in spec:
        for value in args if isinstance(args, (tuple, list)) else (args,):
            if isinstance(value, int) and not isinstance(value, bool):
                _fits(abs(value), "a format width")


def _replaced_size(text: str, old: Any, new: Any, count: Any = -1) -> int:
    old, new = str(old), str(new)
    hits = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * max(0, len(new) - len(old))


def _joined(separator: str, items: Any) -> list:
    """``items`` as a list, once their join with ``separator`` is known to fit."""
    items = list(items)
    _fits(sum(len(str(item)) for item in items) + len(separator) * max(len(items) - 1, 0), "a joined string")
    return items


def _binop_fits(operator: str, left: Any, right: Any) -> None:
    sized = (str, bytes, list, tuple)
    if operator == "*":
        if isinstance(left, sized) and isinstance(right, int):
            _fits(len(left) * right, "a repeated value")
        elif isinstance(right, sized) and isinstance(left, int):
            _fits(len(right) * left, "a repeated value")
        elif isinstance(left, int) and isinstance(right, int):
            _number_fits(left.bit_length() + right.bit_length())
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        _number_fits(right * left.bit_length() if right <= RENDER_BITS else right)
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        _fits(len(left) + len(right), "a concatenated value")
    elif operator == "%" and isinstance(left, str):
        _format_fits(left, right)


def _call_fits(obj: Any, args: tuple, kwargs: dict) -> tuple:
    """Check a call of a string method that can build a larger string; return the arguments to call it with."""
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    text = getattr(target, "__self__", None)
    if not isinstance(text, str):
        return args
    name = getattr(target, "__name__", "")
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _fits(args[0], f"a {name}() width")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            _fits(len(text) + text.count("\t") * tab, "an expandtabs() result")
    elif name == "replace" and len(args) >= 2:
        _fits(_replaced_size(text, *args[:3]), "a replace() result")
    elif name == "join" and args:
        return (_joined(text, args[0]), *args[1:])
    elif name in ("format", "format_map"):
        _format_fits(text)
    return args


def _filter_fits(name: str, value: Any, rest: tuple, kwargs: dict) -> Any:
    """Check a filter that can build a larger value; return the value to call it with."""

    def argument(position: int, key: str, default: Any) -> Any:
        return rest[position] if len(rest) > position else kwargs.get(key, default)

    if name == "center" and isinstance(width := argument(0, "width", 80), int):
        _fits(width, "a center width")
    elif name == "indent":
        width = argument(0, "width", 4)
        width = len(width) if isinstance(width, str) else width
        if isinstance(width, int):
            text = str(value)
            _fits(len(text) + (text.count("\n") + 1) * width, "an indented string")
    elif name == "replace" and len(rest) >= 2:
        _fits(_replaced_size(str(value), *rest[:3]), "a replace result")
    elif name == "join":
        return _joined(str(argument(0, "d", "")), value)
    elif name == "format":
        _format_fits(str(value), rest)
    elif name == "tojson" and isinstance(indent := argument(0, "indent", None), int) and indent > 0:
        _fits(len(json.dumps(value, default=str)) * (indent + 1), "an indented JSON text")
    elif name in ("slice", "batch") and isinstance(count := argument(0, "slices" if name == "slice" else "linecount", 1), int):
        _fits(count, f"a {name} count")
    return value


def _bounded_filter(name: str, fn: Callable) -> Callable:
    """Filter ``fn``, refusing a result over the budget before (``_filter_fits``) and after it is built."""
    if getattr(fn, "_macft_bounded", False):
        return fn

    @functools.wraps(fn)  # keeps jinja's pass_context/pass_environment mark
    def bounded(*args, **kwargs):
        _tick()
        at = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0
        if len(args) > at:
            args = (*args[:at], _filter_fits(name, _checked(args[at]), args[at + 1 :], kwargs), *args[at + 1 :])
        return _checked(fn(*args, **kwargs))

    bounded._macft_bounded = True
    return bounded


class _BoundedFilters(dict):
    """An environment's filters, each bounded as it is added: transformers adds ``tojson`` after
    creating the environment, and jinja runs filters on constants while compiling."""

    def __setitem__(self, name: str, fn: Callable) -> None:
        super().__setitem__(name, _bounded_filter(name, fn))


class _Limited:
    """Mixed into the sandbox environment's class: checks the active budget, if any, as it compiles and renders."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})  # compiled into call_binop(), never folded

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.filters = _BoundedFilters((name, _bounded_filter(name, fn)) for name, fn in self.filters.items())

    def call_binop(self, context, operator, left, right):
        _tick()
        _binop_fits(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        _tick()
        for value in (*args, *kwargs.values()):
            _checked(value)
        args = _call_fits(__obj, args, kwargs)
        return _checked(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        _tick()
        return _checked(super().getattr(obj, attribute))

    def getitem(self, obj, argument):
        _tick()
        return _checked(super().getitem(obj, argument))

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


_compiling = threading.Lock()


def _compile_limited(tokenizer: Any, tools: list | None) -> None:
    """Have transformers compile this template, which it caches by the template's text, in our sandbox
    class; a compilation it cached earlier in jinja's own sandbox is dropped and redone."""
    try:
        from transformers.utils import chat_template_utils as hf_templates

        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        template = hf.get_chat_template(None, tools)
        plain = hf_templates.ImmutableSandboxedEnvironment
        compile_template = hf_templates._compile_jinja_template
    except Exception:  # another transformers layout: the main-thread timer still bounds the time
        return
    with _compiling:
        hf_templates.ImmutableSandboxedEnvironment = _limited_class(plain)
        try:
            if not isinstance(compile_template(template).environment, _Limited):
                compile_template.cache_clear()
                compile_template(template)
        finally:
            hf_templates.ImmutableSandboxedEnvironment = plain


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
    try:
        with _render_budget():
            _compile_limited(tokenizer, tools)
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)
    except Exception as exc:  # jinja's TemplateError and SecurityError, TemplateLimit, and whatever template code raises
        raise MacftError(f"{where + ': ' if where else ''}{template_failure(tokenizer, messages, exc)}") from None
    # what apply_chat_template(tokenize=True) does, outside the template's time
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]


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
    from macft.outputs import IMPORT_RECORD

    folder = Path(str(getattr(tokenizer, "name_or_path", "") or getattr(getattr(tokenizer, "_tokenizer", None), "name_or_path", "")))
    try:
        return json.loads((folder / IMPORT_RECORD).read_text())["source"]
    except (OSError, ValueError, KeyError):
        return str(folder) if str(folder) not in ("", ".") else "this model"
