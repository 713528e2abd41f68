"""Where macft keeps its state: the home folder (``MACFT_HOME``), the import cache, the bundled recipes."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Iterator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Package data (``macft/recipes`` links to the repository's top-level ``recipes/``), so a checkout,
# an editable install and an installed wheel all find the same files.
RECIPES_DIR = Path(str(files("macft") / "recipes"))


def macft_home() -> Path:
    """The folder for caches and settings; ``MACFT_HOME`` moves it (the tests point it at a tmp dir)."""
    if env := os.environ.get("MACFT_HOME"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "macft"


def cache_dir(kind: str) -> Path:
    path = macft_home() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    Works for files and directories, so nothing a user owns is ever half-written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.rmdir()
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            old = target.with_name(f".{target.name}.old")
            _remove(old)
            target.rename(old)
            tmp.rename(target)
            _remove(old)
        else:
            os.replace(tmp, target)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
