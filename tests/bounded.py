"""Run macft (or a Python script) as a child process with its address space capped and its time
bounded, and report what it printed, how it ended, how long it took and its peak memory.

The cap (``ADDRESS_SPACE``) keeps a regression from taking the machine's memory: a child that
would grow to 10 GB fails at the cap instead, and the test sees that failure.

    outcome = run_bounded(["import", "huge.gguf"], cwd=tmp_path)
    outcome.returncode, outcome.lines, outcome.peak_rss, outcome.seconds
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
ADDRESS_SPACE = 4 << 30  # a macft command on a tiny model maps about 1.3 GB
GIB = 1 << 30


@dataclass
class Outcome:
    returncode: int
    output: str
    seconds: float  # from the start, or from the interrupt when one was sent
    peak_rss: int  # bytes: the child's own high-water mark, sampled every 20 ms
    timed_out: bool

    @property
    def lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.strip()]

    def one_line_error(self) -> str:
        """The command's only line of output, which must be its error."""
        assert self.returncode == 1 and not self.timed_out, self.summary()
        assert len(self.lines) == 1 and self.lines[0].startswith("Error: "), self.summary()
        return self.lines[0]

    def final_error(self) -> str:
        """The error a command ended with after notes of its own: one line, the last."""
        assert self.returncode == 1 and not self.timed_out and "Traceback" not in self.output, self.summary()
        errors = [line for line in self.lines if line.startswith("Error: ")]
        assert len(errors) == 1 and self.lines[-1] == errors[0], self.summary()
        return errors[0]

    def summary(self) -> str:
        tail = self.output[-3000:]
        return f"rc={self.returncode} timed_out={self.timed_out} {self.seconds:.1f} s peak {self.peak_rss / 2**20:.0f} MiB\n{tail}"


def macft_command(*args) -> list[str]:
    return [sys.executable, "-m", "macft.cli", *map(str, args)]


def run_bounded(
    command: list[str],
    cwd: Path,
    *,
    timeout: float = 120,
    address_space: int = ADDRESS_SPACE,
    interrupt_when: Callable[[], bool] | None = None,
    env: dict | None = None,
) -> Outcome:
    """Run ``command`` (see ``macft_command``) to its end or ``timeout``, with ``env`` added to this
    process's; with ``interrupt_when``, send SIGINT (Ctrl-C) as soon as it returns true and time the
    rest from there."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MACFT_OPENBLAS": "0", **(env or {})}
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=cap)
        start = time.monotonic()
        status, usage, timed_out, peak = None, None, False, 0
        while status is None:
            peak = max(peak, _high_water(process.pid))
            pid, waited, rusage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                status, usage = waited, rusage
                break
            if interrupt_when is not None and interrupt_when():
                process.send_signal(signal.SIGINT)
                start, interrupt_when = time.monotonic(), None
            if time.monotonic() - start > timeout:
                timed_out = True
                process.kill()
                _, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.02)
        seconds = time.monotonic() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read().decode(errors="replace")
    # wait4's ru_maxrss also counts the memory this process had when it forked the child (Linux carries
    # it across exec), so the child's own high-water mark is read while it runs where /proc has it
    return Outcome(process.returncode, output, seconds, peak or usage.ru_maxrss * 1024, timed_out)


def _high_water(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM, bytes), 0 where /proc does not say."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return 0
