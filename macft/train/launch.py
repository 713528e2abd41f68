"""``macft lora --hosts a,b`` / ``--hostfile F``: run this same ``macft`` command once per host under
``mlx.launch``, which starts the ranks (over ssh, or locally for 127.0.0.1), sets up the backend
and relays their output; it stops every rank when one fails. The hosts are checked first (two at
least), the launch ends soon after a rank fails even when stopping the others over ssh hangs, and
Ctrl-C or SIGTERM reaches the ranks (which save a checkpoint) without mlx.launch's tracebacks.

    code = launch_ranks("192.168.1.10,192.168.1.11", None)     # the exit status of the run
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
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


def check_hosts(hosts: str | None, hostfile: str | None) -> int:
    """The number of ranks the hosts give, after checking there are at least two: one host is one
    process (run without --hosts), and mlx.launch would start nothing for an empty list."""
    if hostfile is not None:
        from mlx._distributed_utils.common import Hostfile  # mlx.launch's own reader, so both agree

        if not Path(hostfile).is_file():
            raise MacftError(f"--hostfile {hostfile} does not exist; write one as the README shows (mlx.launch's JSON format).")
        try:
            count = len(Hostfile.from_file(hostfile).hosts)
        except ValueError as exc:
            cause = exc.__cause__
            reason = f"an entry lacks {cause}" if isinstance(cause, KeyError) else str(cause or exc).splitlines()[0]
            raise MacftError(f"--hostfile {hostfile} is not an mlx.launch hostfile ({reason}); the README shows the format.") from None
        where = f"--hostfile {hostfile} lists"
    else:
        names = [name.strip() for name in (hosts or "").split(",")]
        if any(not name for name in names):
            raise MacftError(f"--hosts '{hosts}' has an empty host name; give them comma-separated, e.g. --hosts 192.168.1.10,192.168.1.11.")
        count, where = len(names), f"--hosts '{hosts}' names"
    if count < 2:
        raise MacftError(
            f"{where} {count} host{'s' if count != 1 else ''}; data-parallel training needs at least two (one rank each). "
            "To train on this machine alone, leave out --hosts and --hostfile."
        )
    return count


def launch_ranks(hosts: str | None, hostfile: str | None, argv: list[str] | None = None) -> int:
    """Run ``argv`` (default: this process's arguments) as one rank per host; return the exit status."""
    check_hosts(hosts, hostfile)
    where = ["--hostfile", hostfile] if hostfile else ["--hosts", hosts]
    command = [launcher(), *where, "--starting-port", str(free_port()), "--", *rank_command(sys.argv[1:] if argv is None else argv)]
    # Its own session, so that the terminal's Ctrl-C reaches the ranks through ``relay_status`` alone, and
    # SIGINT and SIGTERM ignored, so that mlx.launch's threads print no tracebacks (each rank takes them back).
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True, preexec_fn=_ignore_stops)
    return relay_status(process)


def _ignore_stops() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


# mlx.launch exits with 0 whatever its ranks do, and reports a failed rank on its standard error.
RANK_FAILED = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Once a rank failed, the seconds mlx.launch gets to stop the others (over ssh, which may hang on a host
# that is down) before the whole launch is killed.
STOP_GRACE = 10.0


def relay_status(process: subprocess.Popen) -> int:
    """Pass the ranks' standard error through; return rank 0's status, else the first failing rank's (or 0).

    mlx.launch's own report of a failed rank is left out (the rank said why), and the launch is
    ended ``STOP_GRACE`` seconds after a failure. The first Ctrl-C (or SIGTERM) is passed to every
    rank, which saves a checkpoint after its step; a second one kills them all."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, process.stderr), lines.put(None)], daemon=True).start()
    failures: dict[int, int] = {}  # rank -> exit status, in the order mlx.launch reports them
    stop_by, signals, handled = None, [], 0
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: signals.append(signum))
    try:
        while True:
            try:
                line = lines.get(timeout=0.2)
                if line is None:  # mlx.launch is ending
                    process.wait(timeout=STOP_GRACE)
                    break
                failed = RANK_FAILED.search(ANSI.sub("", line))
                if failed:
                    code = int(failed.group(2) or 1)
                    failures[int(failed.group(1))] = code if code > 0 else 1
                    stop_by = stop_by or time.monotonic() + STOP_GRACE
                else:
                    sys.stderr.write(line)
                    sys.stderr.flush()
            except (queue.Empty, subprocess.TimeoutExpired):
                pass
            except KeyboardInterrupt:
                signals.append(signal.SIGINT)
            if len(signals) > handled:
                _signal_group(process, signals[0] if handled == 0 else signal.SIGKILL)
                if handled == 0:
                    sys.stderr.write("Stopping: each rank saves a checkpoint after its current step (press Ctrl-C again to stop at once).\n")
                handled = len(signals)
            if stop_by is not None and time.monotonic() > stop_by:
                _signal_group(process, signal.SIGKILL)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            _signal_group(process, signal.SIGKILL)
        process.wait()
        _signal_group(process, signal.SIGKILL)  # nothing of the launch outlives it (an ssh to a host that is down)
    if failures:  # rank 0's own status (130 after Ctrl-C) over the others', which mlx.launch then stops
        return failures.get(0) or next(iter(failures.values()))
    if signals:
        return 128 + signals[0]
    return process.returncode if process.returncode >= 0 else 1


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
