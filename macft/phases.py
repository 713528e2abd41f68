"""Named phases of slow work (importing a GGUF, loading a model, generating answers), so a front end
can show that something is happening. Library code marks them; ``macft.ui`` draws them.

    with phase("Loading model"):
        ...

Without a reporter (library use, tests) a phase costs nothing and shows nothing.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Callable, Iterator

Reporter = Callable[[str], AbstractContextManager]

_reporter: Reporter | None = None


def phase(name: str) -> AbstractContextManager:
    """A context manager around one phase of work, shown by the current reporter."""
    return _reporter(name) if _reporter is not None else nullcontext()


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Make ``reporter`` show the phases started inside this block (the previous one is restored after)."""
    global _reporter
    previous, _reporter = _reporter, reporter
    try:
        yield
    finally:
        _reporter = previous
