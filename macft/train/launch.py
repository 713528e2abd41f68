"""``macft lora --hosts a,b`` / ``--hostfile F``: run this same ``macft`` command once per host under
``mlx.launch``, which starts the ranks (over ssh, or locally for 127.0.0.1), sets up the backend
and relays their output; it stops every rank when one fails.

    code = launch_ranks("192.168.1.10,192.168.1.11", None)     # the exit status of the run
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from macft.errors import MacftError

LAUNCH_OPTIONS = ("--hosts", "--hostfile")


def rank_command(argv: list[str]) -> list[str]:
    """The command each rank runs: ``argv`` without the options that asked for the launch."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(option + "=" for option in LAUNCH_OPTIONS)):
            kept.append(arg)
    return [sys.executable, "-m", "macft.cli", *kept]


def launcher() -> str:
    """mlx.launch from this environment (MLX installs it beside the interpreter)."""
    beside = Path(sys.executable).parent / "mlx.launch"
    found = str(beside) if beside.exists() else shutil.which("mlx.launch")
    if found is None:
        raise MacftError("mlx.launch was not found; it comes with MLX (pip install mlx) in the same environment as macft.")
    return found


def free_port() -> int:
    """A port free on this machine for the ring to start from (mlx.launch counts up from it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_ranks(hosts: str | None, hostfile: str | None, argv: list[str] | None = None) -> int:
    """Run ``argv`` (default: this process's arguments) as one rank per host; return the exit status."""
    if hostfile is not None and not Path(hostfile).is_file():
        raise MacftError(f"--hostfile {hostfile} does not exist; write one as the README shows (mlx.launch's JSON format).")
    where = ["--hostfile", hostfile] if hostfile else ["--hosts", hosts]
    command = [launcher(), *where, "--starting-port", str(free_port()), "--", *rank_command(sys.argv[1:] if argv is None else argv)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1)
    return relay_status(process)


# mlx.launch exits with 0 whatever its ranks do, and reports a failed rank on its standard error.
RANK_FAILED = re.compile(r"Node with rank \d+ (?:exited with code (-?\d+)|was killed)")


def relay_status(process: subprocess.Popen) -> int:
    """Pass mlx.launch's standard error through; return the first failing rank's status (or 0)."""
    status = 0
    while True:
        try:
            line = process.stderr.readline()
        except KeyboardInterrupt:  # Ctrl-C reached the ranks too; they save a checkpoint and stop
            continue
        if not line:
            break
        sys.stderr.write(line)
        sys.stderr.flush()
        failed = RANK_FAILED.search(line)
        if failed and not status:
            code = int(failed.group(1) or 1)
            status = code if code > 0 else 1
    process.wait()
    return status or process.returncode
