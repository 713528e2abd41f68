"""Where macft keeps its state: the home folder (``MACFT_HOME``), the import cache, the bundled recipes."""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Iterator

from macft.errors import DiskFullError, MacftError

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


def mark_used(entry: Path) -> None:
    """Record that a cache entry was just read: its modification time orders ``prune_cache``."""
    try:
        os.utime(entry)
    except OSError:
        pass  # a read-only cache still serves the entry


def prune_cache(folder: Path, budget_bytes: int, keep: Path) -> None:
    """Delete the least recently used entries of a cache folder until it holds at most ``budget_bytes``.

    ``keep`` (the entry just written) always stays, and so do hidden files (writes in progress). An entry
    another process deletes or reads meanwhile is harmless: a reader holding it open keeps its data, and
    a missing entry is built again."""
    entries = []
    for path in folder.iterdir():
        try:
            if path.is_file() and not path.name.startswith(".") and path != keep:
                info = path.stat()
                entries.append((info.st_mtime, info.st_size, path))
        except OSError:
            continue
    total = sum(size for _, size, _ in entries) + (keep.stat().st_size if keep.exists() else 0)
    for _, size, path in sorted(entries):
        if total <= budget_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size


def write_arrays(target: Path, arrays: dict) -> None:
    """Write numpy arrays as an uncompressed ``.npz`` file, atomically (``read_arrays`` reads it back)."""
    import numpy as np

    with atomic_path(target) as tmp, tmp.open("wb") as fh:
        np.savez(fh, **arrays)


def read_arrays(path: Path) -> dict:
    """The arrays of an ``.npz`` file, read without pickle (numbers, booleans and bytes only, so a planted
    file cannot run code) and only if stored uncompressed (so none holds more than the file's own size).
    A file that breaks either rule raises ``ValueError``; a missing one ``FileNotFoundError``."""
    import zipfile

    import numpy as np

    with zipfile.ZipFile(path) as archive:
        if any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist()):
            raise ValueError(f"{path} holds compressed arrays")
    with np.load(path, allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    Works for files and directories, so nothing a user owns is ever half-written. Leftovers of a
    writer that was killed (its ``.tmp`` copy, or the previous version parked as ``.old`` between
    the two renames of a directory swap) are cleaned up, or put back, by the next write of ``target``.
    A full disk becomes a ``MacftError`` saying the previous version is intact.
    """
    target = Path(target).expanduser()
    if target.is_symlink():  # write what the link points to; the link stays
        target = Path(os.path.realpath(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover(target)
        pid = os.getpid()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{pid}.", suffix=".tmp", dir=target.parent))
        tmp.rmdir()
    except OSError as exc:
        raise unwritable(target, exc) from None
    try:
        try:
            yield tmp
        except (OSError, RuntimeError) as exc:
            if is_disk_full(exc):
                raise DiskFullError(disk_full_message(target, exc)) from None
            if isinstance(exc, OSError) and exc.errno in UNWRITABLE_ERRNOS:
                raise unwritable(target, exc) from None
            raise
        if (target.is_dir() or tmp.is_dir() and target.exists()) and not target.is_symlink():
            # a folder cannot be renamed over (or onto a file): move the old one aside first
            old = target.with_name(f".{target.name}.{pid}.old")
            _remove(old)
            target.rename(old)
            tmp.rename(target)
            _remove(old)
        else:
            os.replace(tmp, target)
    finally:
        _remove(tmp)


def recover(target: Path) -> None:
    """Undo what a killed ``atomic_path`` left beside ``target``: remove its half-written copies,
    and put back a previous version it had moved aside but not yet replaced."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.(old|\w+\.tmp)")
    for leftover in target.parent.glob(glob.escape(f".{target.name}.") + "*"):
        match = pattern.fullmatch(leftover.name)
        if match is None or process_alive(int(match[1])):
            continue
        if match[2] == "old" and not target.exists():
            leftover.rename(target)
        else:
            _remove(leftover)


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (ours always does)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
UNWRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def unwritable(target: Path, exc: OSError) -> MacftError:
    """The one line for a write refused by the system: a read-only disk or folder, a file in the way, ..."""
    if is_disk_full(exc):
        return DiskFullError(disk_full_message(target, exc))
    reasons = {
        errno.EROFS: "it is on a read-only disk",
        errno.EACCES: "this user may not write there",
        errno.EPERM: "this user may not write there",
        errno.ENOTDIR: "a file stands where a folder should be",
        errno.EEXIST: "a file stands where a folder should be",
    }
    reason = reasons.get(exc.errno, exc.strerror or str(exc))
    return MacftError(f"Could not write {target}: {reason}; choose another place to write, or make it writable.")


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full disk or quota, or a short write reported without an errno: numpy's
    ``tofile`` ("8192 requested and 6144 written") and MLX's RuntimeError ("[write] Unable to write")."""
    text = str(exc).lower()
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS or exc.errno is None and re.fullmatch(r"\d+ requested and \d+ written", text) is not None
    return isinstance(exc, RuntimeError) and ("no space left" in text or text.startswith("[write]"))


def disk_full_message(target: Path, exc: BaseException) -> str:
    reason = "the file size limit (ulimit -f) was reached" if getattr(exc, "errno", None) == errno.EFBIG else "the disk is full"
    try:
        free = f" ({shutil.disk_usage(Path(target).parent).free / 2**20:.0f} MiB free)"
    except OSError:
        free = ""
    return (
        f"Could not write {target}: {reason}{free}; free some space and run the command again "
        f"(the previous {Path(target).name}, if any, is intact)."
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
