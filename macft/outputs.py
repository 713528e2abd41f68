"""Where a command may write its output: a new path, an empty folder, or a previous output of the
same command that holds nothing but what the command wrote there. Anything else (a user's folder,
a file another tool wrote) is refused before any work starts, and ``--force`` lifts that refusal;
the old content is still replaced only once the new one is complete (``macft.paths.atomic_path``).

Some paths are refused even with ``--force``, because writing there would break something macft
or the user still needs: the command's own inputs, a run directory's state (its checkpoints,
adapter, recipe, metrics), a model that a run records as its base (``record_run_base`` keeps that
list in the macft home), a folder holding any of those, and the home, working and macft folders.

    out = check_output(out, "fuse", record="macft_fuse.json", inputs=[run_dir, base_dir], force=force)
    out = check_output(out, "export gguf", made_by=is_exported_gguf, inputs=[run_dir, base_gguf], force=force)

``check_output`` returns the path to write: ``~`` expanded and a symbolic link replaced by what it
points to, so the output lands where it was checked. How each command recognises its own earlier
output: ``fuse`` by the ``macft_fuse.json`` record in the folder, ``import`` by
``macft_import.json``, ``merge`` by ``macft_merge.json``, ``export peft`` by ``macft_peft.json`` (each
listing the files it wrote: ``manifest``), ``export gguf`` by the
``macft.command`` key it stores in every GGUF's metadata and by the comment line it ends each
Modelfile with.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable

from macft.errors import MacftError

# What a `macft lora` run keeps at its top level; another command's output must never land on these.
RUN_STATE = ("checkpoints", "adapters.safetensors", "adapter_config.json", "recipe.yaml", "metrics.jsonl",
             "summary.json", "loss.png", "imatrix.safetensors", ".macft-lock")  # fmt: skip
IMPORT_RECORD = "macft_import.json"  # what `macft import` writes into a model folder (its GGUF "source")
BASES_FILE = "run-bases.json"  # in the macft home: {model file or folder: [run directories trained on it]}
# Files a macft output folder may gain after it was written without the user adding anything:
# load_model's weights hash and macOS Finder's folder settings.
INCIDENTAL = {".macft-hash.json", ".DS_Store"}
SEARCH_LIMIT = 2000  # entries looked at when checking whether a folder --force would replace holds a run


def check_output(
    out: Path | str,
    command: str,
    *,
    made_by: Callable[[Path], bool] | None = None,
    record: str | None = None,
    inputs: Iterable[Path | str | None] = (),
    force: bool = False,
    option: str = "--out",
) -> Path:
    """Refuse (one ``MacftError``) to write ``out`` over anything ``macft <command>`` did not write,
    or over anything listed in the module docstring even with ``force``; return the path to write.

    A file output names ``made_by`` (is this file an earlier output?); a folder output names the
    ``record`` file its command writes into it with the ``manifest`` of what it wrote."""
    given = Path(out)
    path = Path(os.path.realpath(given.expanduser())) if given.expanduser().is_symlink() else given.expanduser()
    where = path.resolve()
    check_parent(path, option)
    # A folder holding this command's own record is its earlier output (a merged run is also a run
    # directory), so only the other protections apply to it.
    refuse_protected(given, where, inputs, option, own_output=record is not None and (path / record).is_file())
    if not path.exists():
        return path
    folder = record is not None
    if path.is_dir() != folder:
        want = "a folder" if folder else "a file"
        if not force:
            raise MacftError(f"{option} {given} is {'a folder' if path.is_dir() else 'a file'}, and `macft {command}` writes {want} there; choose another {option}, or pass --force to replace it.")
        if path.is_dir():
            refuse_holding_state(given, where, option)
    elif folder:
        foreign = foreign_entries(path, record)
        if not foreign:
            return path
        if not force:
            entries = list(path.iterdir())
            if (path / record).is_file():
                name, changed = foreign[0]
                what = f"holds '{name}', " + ("changed since" if changed else "which was not written by") + f" `macft {command}`"
                raise MacftError(f"{option} {given} {what}; move it out or choose another {option} (--force would delete it).")
            raise MacftError(
                f"{given} already exists ({len(entries)} entries, e.g. '{entries[0].name}') and is not an earlier output of "
                f"`macft {command}`; choose another {option}, or pass --force to replace the folder (the old one stays until the new one is complete)."
            )
        refuse_holding_state(given, where, option)
    elif made_by is not None and made_by(path):
        return path
    elif not force:
        raise MacftError(
            f"{given} already exists and is not an earlier output of `macft {command}`; choose another {option}, "
            "or pass --force to replace the file (the old one stays until the new one is complete)."
        )
    return path


def check_parent(path: Path, option: str) -> None:
    """A file where the output's folder should be, or a folder macft may not write, is one line before any work."""
    for ancestor in path.absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise MacftError(f"{option} {path}: {ancestor} is a file, not a folder; choose another {option}.")
            if not os.access(ancestor, os.W_OK):  # found now, not after the work (a read-only disk, another user's folder)
                raise MacftError(f"{option} {path}: {ancestor} is not writable (a read-only disk or folder); choose another {option}.")
            return


def refuse_protected(given: Path, where: Path, inputs: Iterable[Path | str | None], option: str, own_output: bool = False) -> None:
    """Paths no command writes onto or replaces, ``--force`` or not."""
    never = "; --force does not change that, so choose another " + option + "."
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue
        source = Path(source).expanduser().resolve()
        if where == source or where in source.parents:
            what = "is" if where == source else "holds"
            raise MacftError(f"{option} {given} {what} this command's input {source}; writing there would destroy it{never}")
    if (run := run_holding(where)) is not None and not (own_output and run == where):
        part = "is the run directory" if where == run else "is part of the state of the run in"
        raise MacftError(f"{option} {given} {part} {run}; replacing it would break that run's resume, chat and export{never}")
    for base, runs in recorded_bases().items():
        if where == base or where in base.parents:
            what = "is" if where == base else "holds"
            raise MacftError(f"{option} {given} {what} the base model of the run {runs[0]}; every run on it depends on that file{never}")
    if where in keep_folders():
        raise MacftError(f"{option} {given} is {where}, a folder macft never replaces{never}")


def keep_folders() -> set[Path]:
    """The filesystem root, the home folder, the working folder and the macft home, with every folder above them."""
    from macft.paths import macft_home

    keep = set()
    for folder in (Path.home(), Path.cwd(), macft_home()):
        folder = folder.expanduser().resolve()
        keep |= {folder, *folder.parents}
    return keep


def is_run_dir(folder: Path) -> bool:
    """A folder `macft lora` trains in: it holds a checkpoint folder, macft's adapter weights or the run
    lock (a PEFT export's adapter_config.json sits beside adapter_model.safetensors instead)."""
    return (folder / "checkpoints").is_dir() or (folder / "adapters.safetensors").is_file() or (folder / ".macft-lock").is_file()


def run_holding(where: Path) -> Path | None:
    """The run directory that ``where`` is, or whose state ``where`` is part of."""
    for run in where.parents:
        if is_run_dir(run) and where.relative_to(run).parts[0] in RUN_STATE:
            return run
    return where if is_run_dir(where) else None


def refuse_holding_state(given: Path, where: Path, option: str) -> None:
    """A folder --force would replace must not hold a run or a run's base (looked for a few levels deep)."""
    bases = recorded_bases()
    seen = 0
    for folder, dirs, _ in os.walk(where):
        folder = Path(folder)
        if is_run_dir(folder) or folder in bases:
            raise MacftError(f"{option} {given} holds {folder}, which macft still needs (a run or a run's base); --force does not replace it.")
        seen += len(dirs) + 1
        if seen > SEARCH_LIMIT or len(folder.relative_to(where).parts) >= 3:
            dirs.clear()


def manifest(folder: Path) -> dict[str, int]:
    """What a command wrote into an output folder: {file name: size}, stored in its record."""
    return {p.name: p.stat().st_size for p in sorted(Path(folder).iterdir()) if p.is_file()}


LEGACY_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model", ".tiktoken")


def foreign_entries(folder: Path, record: str) -> list[tuple[str, bool]]:
    """(name, changed) of each entry of ``folder`` that the command writing ``record`` did not put
    there, or that changed since (all entries when there is no record). A record without a manifest
    (older macft) vouches for the model files such folders hold."""
    try:
        saved = json.loads((folder / record).read_text())
        written = saved.get("files") if isinstance(saved, dict) else None
    except (OSError, ValueError):
        saved, written = None, None
    foreign = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if saved is None:
            foreign.append((name, False))
        elif name == record or name in INCIDENTAL:
            continue
        elif isinstance(written, dict):
            if not entry.is_file() or entry.is_symlink() or written.get(name) != entry.stat().st_size:
                foreign.append((name, name in written))
        elif not (entry.is_file() and name.endswith(LEGACY_SUFFIXES)):
            foreign.append((name, False))
    return foreign


def check_run_name(name: str, option: str = "--name / output.name") -> str:
    """A run's name is one folder name inside the runs folder, never a path out of it."""
    if not name or name in (".", "..") or re.search(r"[/\\\0]", name):
        raise MacftError(f"{option} '{name}' must be one folder name (no '/', '\\' or '..'); --out-dir / output.runs_dir chooses where runs go.")
    return name


# ---------------------------------------------------------------------------- the bases runs depend on


def record_run_base(run_dir: Path, identity: dict) -> None:
    """Remember that the run in ``run_dir`` was trained on the base ``identity`` names (a
    ``LoadedModel.identity``): its spec when that is a path, its model folder, and the GGUF file
    that folder was imported from."""
    from macft.paths import atomic_path, macft_home

    files = [identity.get("source"), identity.get("path")]
    try:
        files.append(json.loads((Path(identity["path"]) / IMPORT_RECORD).read_text()).get("source"))
    except (KeyError, TypeError, OSError, ValueError, AttributeError):
        pass
    paths = {str(Path(f).expanduser().resolve()) for f in files if isinstance(f, str) and Path(f).expanduser().exists()}
    run = str(Path(run_dir).resolve())
    home = macft_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        with open(home / f".{BASES_FILE}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one read-modify-write at a time
            bases = {b: [r for r in runs if is_run_dir(Path(r))] for b, runs in _read_bases(home / BASES_FILE).items()}
            for path in paths:
                bases[path] = sorted({*bases.get(path, []), run})
            with atomic_path(home / BASES_FILE) as tmp:
                tmp.write_text(json.dumps({b: runs for b, runs in bases.items() if runs}, indent=1))
    except (OSError, MacftError):
        pass  # a read-only or full home: the run's own base is still protected as an input of its commands


def recorded_bases() -> dict[Path, list[str]]:
    """{base file or folder: runs still on disk that were trained on it}."""
    from macft.paths import macft_home

    bases = {}
    for base, runs in _read_bases(macft_home() / BASES_FILE).items():
        alive = [r for r in runs if is_run_dir(Path(r))]
        if alive:
            bases[Path(base)] = alive
    return bases


def _read_bases(path: Path) -> dict[str, list[str]]:
    try:
        bases = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(bases, dict):
        return {}
    return {str(b): [str(r) for r in runs] for b, runs in bases.items() if isinstance(runs, list)}
