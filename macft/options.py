"""Recipe keys declared by the part that reads them.

A method (``macft.methods``) or an objective (``macft.objectives``) lists the ``method.*`` or
``align.*`` keys it reads as ``Option`` records next to its code; the recipe's ``method`` and
``align`` sections are the frozen dataclasses ``settings_class`` builds from every declaration, so
adding a method or an objective adds its keys without touching the recipe code (``macft.config``).

    RANK = Option("rank", int, 8, "LoRA rank r", valid=lambda r: r > 0, must="a positive integer")
    MethodConfig = settings_class("MethodConfig", "method", [("lora", (RANK, ...)), ...])
    RANK.check(MethodConfig(rank=0), "method")      # "method.rank must be a positive integer."
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal


@dataclass(frozen=True)
class Option:
    name: str
    type: Any  # the field type the recipe loader coerces to (int, float, str, bool, tuple[str, ...], Literal[...], X | None)
    default: Any
    help: str  # one line: what it does (shown by `macft recipes show`)
    valid: Callable[[Any], bool] | None = None
    must: str = ""  # what a valid value is, for the one-line error
    # For a value that names files: (value as written, the recipe file's folder) -> the value with
    # relative paths that exist there made absolute, as data paths are.
    resolve: Callable[[Any, Path], Any] | None = None

    def problem(self, settings: Any, section: str) -> str | None:
        """The one-line complaint about this option's value in ``settings``, or None."""
        if self.valid is None or self.valid(getattr(settings, self.name)):
            return None
        return f"{section}.{self.name} must be {self.must}."


def settings_class(class_name: str, owners: Iterable[tuple[str, tuple[Option, ...]]], first: Option | None = None) -> type:
    """A frozen dataclass with a field per option the owners (name, options) declare, ``first`` first.

    An option read by several owners is declared by each of them alike (same type and default), so
    each owner's module says everything it reads; declarations that disagree are a bug."""
    fields: dict[str, Option] = {} if first is None else {first.name: first}
    for owner, options in owners:
        for option in options:
            known = fields.setdefault(option.name, option)
            if (known.type, known.default) != (option.type, option.default):
                raise TypeError(f"{owner} declares {option.name} as {option.type} = {option.default!r}, another as {known.type} = {known.default!r}")
    return dataclasses.make_dataclass(
        class_name,
        [(o.name, o.type, dataclasses.field(default=o.default)) for o in fields.values()],
        frozen=True,
    )


def names_literal(names: Iterable[str]) -> Any:
    """``Literal["a", "b", ...]``: a field type the recipe loader checks choices against."""
    return Literal[tuple(names)]  # type: ignore[valid-type]
