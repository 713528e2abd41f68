"""Where a command may write its output: a new path, an empty folder, or a previous output of the
same command. Anything else (a user's folder, a file another tool wrote, the command's own input)
is refused before any work starts; ``--force`` lifts the refusal except for the command's input,
and the old content is still replaced only once the new one is complete (``macft.paths.atomic_path``).

    check_output(out, "fuse", made_by=is_fused_model, inputs=[run_dir, base_dir], force=force)

How each command recognises its own earlier output: ``fuse`` by the ``macft_fuse.json`` record in
the folder, ``import`` by ``macft_import.json``, ``export gguf`` by the ``macft.command`` key it
stores in every GGUF's metadata and by the comment line it ends each Modelfile with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from macft.errors import MacftError



def check_output(
    out: Path,
    command: str,
    *,
    made_by: Callable[[Path], bool],
    inputs: Iterable[Path | str | None] = (),
    force: bool = False,
    folder: bool = False,
    option: str = "--out",
) -> None:
    """Refuse (one ``MacftError``) to write ``out`` over anything ``macft <command>`` did not write."""
    out = Path(out).expanduser()
    where = out.resolve()
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue
        source = Path(source).expanduser().resolve()
        if where == source or where in source.parents:
            what = "is" if where == source else "holds"
            raise MacftError(f"{option} {out} {what} this command's input {source}; writing there would destroy it, so choose another {option}.")
    if not out.exists() and not out.is_symlink():
        return
    if folder and out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if out.is_dir() == folder and made_by(out):
        return
    if force:
        return
    kind = "folder" if out.is_dir() else "file"
    raise MacftError(
        f"{out} already exists and is not an earlier output of `macft {command}`; choose another {option}, "
        f"or pass --force to replace the {kind} (the old one stays until the new one is complete)."
    )


def has_record(record_name: str) -> Callable[[Path], bool]:
    """A recogniser for folders that hold macft's record file ``record_name``."""
    return lambda folder: (Path(folder) / record_name).is_file()
