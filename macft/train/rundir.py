"""Claim a run directory for one ``macft lora`` process before anything is written into it.

    with claim_run_dir(Path("runs/demo"), resume=False):
        ...  # train; a second run with the same --name is refused until this block ends

The claim is an exclusive ``flock`` on ``.macft-lock`` inside the folder: the kernel releases it
when the process exits, however it exits, so a killed run never leaves a stale lock behind (the
file stays, holding the last owner's process id for the message). A new run also refuses a folder
that holds a finished or interrupted run, or files ``macft lora`` did not write.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from macft.errors import MacftError
from macft.adapters.files import ADAPTER_FILE, CONFIG_FILE
from macft.outputs import check_parent
from macft.paths import unwritable

LOCK_FILE = ".macft-lock"
# What a run writes at its top level; a new run may reuse a folder holding nothing else.
RUN_FILES = {LOCK_FILE, "recipe.yaml", "metrics.jsonl", "summary.json", "loss.png", ADAPTER_FILE, CONFIG_FILE}


@contextmanager
def claim_run_dir(folder: Path, *, resume: bool) -> Iterator[Path]:
    folder = Path(folder)
    if not resume:  # before anything is created: a refused folder is left as it was
        check_parent(folder, "--out-dir")
        if folder.is_dir():
            check_new_run_dir(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        had_lock = (folder / LOCK_FILE).exists()
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise unwritable(folder, exc) from None
    refused = True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise MacftError(
                f"Run directory {folder} is in use by another `macft lora` (process {owner}); "
                "wait for it to finish or choose another --name."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        if not resume:
            check_new_run_dir(folder)
        refused = False
        yield folder
    finally:
        os.close(fd)  # releases the lock
        if refused:  # leave no trace in a folder this run did not take
            if not had_lock:
                (folder / LOCK_FILE).unlink(missing_ok=True)
            for made in created:
                if made.is_dir() and not any(made.iterdir()):
                    made.rmdir()


def check_new_run_dir(folder: Path) -> None:
    if (folder / "checkpoints").exists():
        raise MacftError(f"Run directory {folder} already holds a run; choose another --name or resume it with --resume {folder}.")
    ours = RUN_FILES | {f".{name}." for name in RUN_FILES}  # hidden copies of a killed earlier attempt's writes
    foreign = sorted(p.name for p in folder.iterdir() if not any(p.name == n or n.endswith(".") and p.name.startswith(n) for n in ours))
    if foreign:
        raise MacftError(
            f"Run directory {folder} holds files `macft lora` did not write ('{foreign[0]}'); choose another --name or --out-dir."
        )
