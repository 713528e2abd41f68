"""Data-parallel training over several processes (ranks) with MLX's own engine, ``mx.distributed``.

Every rank runs the same ``macft lora`` command, started by ``mlx.launch`` (ring over TCP, MPI, or
JACCL over Thunderbolt on macOS); outside a launcher there is one rank and nothing here costs anything.

    world = connect()                              # a one-rank World outside mlx.launch
    check_same(world, {"recipe": recipe_digest(recipe), ...})   # one-line error on a mismatch
    batch = world.share(batch)                     # this rank's rows of the global batch
    grads = world.average_gradients(grads)         # inside the compiled step

The recipe's ``train.batch_size`` is the global batch: each rank takes every ``size``-th row of
every planned batch, the step sums trained tokens and losses over ranks and averages gradients,
so a step of N ranks is the step of one rank on the whole batch (up to float rounding). Rank 0
owns the run directory and the live view; it sends its weights, optimizer state and progress
to the others at start (``share_state``), so a resume needs the run folder on rank 0 only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from macft.data.batching import PAD_MULTIPLE, Batch, padded_width, row_arrays, unit_rows, units
from macft.errors import MacftError
from macft.train.checkpoint import Progress

CONNECT_TIMEOUT = 30.0  # seconds the ranks wait for each other at start (MACFT_CONNECT_TIMEOUT)
FACTS_BYTES = 4096  # room for one rank's start-up facts, as JSON


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one training run."""

    rank: int = 0
    size: int = 1
    group: Any = None  # mx.distributed.Group when size > 1
    backend: str = "single process"
    watch: "Watchdog | None" = None  # the step deadline, when size > 1 (see ``peer_errors``)

    @property
    def main(self) -> bool:
        """Rank 0 writes the run directory and draws the live view."""
        return self.rank == 0

    def all_sum(self, x: mx.array) -> mx.array:
        return x if self.size == 1 else mx.distributed.all_sum(x, group=self.group)

    def average_gradients(self, grads: dict) -> dict:
        """Mean of every rank's gradients (MLX packs small arrays into large messages)."""
        return grads if self.size == 1 else nn.average_gradients(grads, group=self.group)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any (Ctrl-C may reach one rank only).
        The loop asks once per step, so each call also tells the step deadline that a step ended."""
        if self.size == 1:
            return flag
        if self.watch is not None:
            self.watch.beat()
        return self.all_sum(mx.array(int(flag), mx.int32)).item() > 0

    def broadcast(self, tree: Any) -> Any:
        """Rank 0's arrays on every rank (the others pass arrays of the same shapes)."""
        if self.size == 1:
            return tree
        flat = []
        # In key order: the same tree restored from a file and built in memory list keys differently.
        for key, value in sorted(tree_flatten(tree), key=lambda item: item[0]):
            # A sum in which only rank 0 contributes is a copy of rank 0's value, bit for bit.
            value = mx.distributed.all_sum(value if self.main else mx.zeros_like(value), group=self.group)
            mx.eval(value)
            flat.append((key, value))
        return tree_unflatten(flat)

    def broadcast_json(self, value: Any) -> Any:
        """Rank 0's JSON-serialisable ``value`` on every rank."""
        if self.size == 1:
            return value
        data = json.dumps(value).encode() if self.main else b""
        length = self.broadcast(mx.array([len(data)], mx.int32)).item()
        payload = np.frombuffer(data, np.uint8) if self.main else np.zeros(length, np.uint8)
        return json.loads(bytes(np.asarray(self.broadcast(mx.array(payload)))))

    def share(self, batch: Batch) -> Batch:
        """This rank's part of a global batch: every ``size``-th row (or pair of rows) from ``rank``.

        Columns after the share's last trained position are cut off: a causal model's outputs at
        earlier positions do not depend on them. A rank left without rows (a batch smaller than
        the world) computes on one row (or pair) with nothing trained, contributing zero to the sums."""
        if self.size == 1:
            return batch
        chosen = list(range(self.rank, units(batch), self.size))
        rows = unit_rows(batch, chosen or [0])
        mask = np.asarray(batch.loss_mask)[rows]
        if not chosen:
            mask = np.zeros_like(mask)
        trained = np.flatnonzero(mask.any(axis=0))
        width = min(padded_width(int(trained[-1]) + 1), mask.shape[1]) if len(trained) else min(PAD_MULTIPLE, mask.shape[1])
        take = mx.array(np.array(rows))
        shared = {name: value[take][:, :width] if value.ndim == 2 else value[take] for name, value in row_arrays(batch).items()}
        return dataclasses.replace(batch, **(shared | {"loss_mask": mx.array(mask[:, :width])}), num_tokens=int(mask.sum()))


def launched() -> bool:
    """Whether a distributed launcher (mlx.launch, mpirun) started this process."""
    return any(name in os.environ for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))


def launcher_backend() -> str:
    """The backend mlx.launch set this process up for (its environment says which)."""
    if "MLX_JACCL_COORDINATOR" in os.environ or "MLX_IBV_DEVICES" in os.environ:
        return "jaccl"
    if "NCCL_HOST_IP" in os.environ:
        return "nccl"
    if "MLX_HOSTFILE" in os.environ:
        return "ring"
    if "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
        return "mpi"
    return "any"


def peer_addresses() -> str:
    """The ring's addresses, for messages (``MLX_HOSTFILE`` holds them as JSON)."""
    try:
        with open(os.environ["MLX_HOSTFILE"]) as fh:
            return ", ".join(address for node in json.load(fh) for address in node)
    except (KeyError, OSError, ValueError, TypeError):
        return "the hosts given to mlx.launch"


def connect(timeout: float | None = None) -> World:
    """Join the other ranks, or return a one-rank World when no launcher started this process.

    MLX waits for its peers for as long as it takes, holding the interpreter, so a host that is
    down or unreachable would hang every rank: a watchdog process ends this one with a one-line
    error if the ranks have not met within ``timeout`` seconds."""
    if not launched():
        return World()
    # `macft lora --hosts` starts mlx.launch ignoring Ctrl-C and SIGTERM (it passes them on itself);
    # a rank takes them back, so that they stop it while it starts and save a checkpoint once it trains.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    backend = launcher_backend()
    if not mx.distributed.is_available(backend):
        raise MacftError(f"mlx.launch asked for the {backend} backend, which this MLX build lacks; launch with --backend ring.")
    timeout = timeout if timeout is not None else float(os.environ.get("MACFT_CONNECT_TIMEOUT", CONNECT_TIMEOUT))
    message = (
        f"Error: Could not reach the other ranks within {timeout:g} s ({peer_addresses()}); check that every host is up, "
        "reachable on those addresses and running the same command (MACFT_CONNECT_TIMEOUT sets the wait)."
    )
    watchdog = Watchdog()
    watchdog.arm(timeout, message)
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except Exception as exc:  # noqa: BLE001 - any failure to start is the user's to fix
        raise MacftError(f"Could not start distributed training ({backend}): {str(exc).splitlines()[0]}.") from None
    finally:
        watchdog.disarm()
    return World(rank=group.rank(), size=group.size(), group=group, backend=backend, watch=Watchdog())


# Waits for its input to end, each read restarting the clock; when argv[1] seconds pass without
# one, prints argv[2] (if any) and kills argv[3] (a process blocked inside MLX runs no Python to stop itself).
# Ctrl-C and SIGTERM, which reach it with its rank, are for the rank: it ends when the rank closes its input.
WATCHDOG = """import os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
while select.select([sys.stdin], [], [], float(sys.argv[1]))[0]:
    if not os.read(sys.stdin.fileno(), 4096):
        sys.exit()
if sys.argv[2]:
    sys.stderr.write(sys.argv[2] + "\\n")
    sys.stderr.flush()
os.kill(int(sys.argv[3]), signal.SIGKILL)
"""


class Watchdog:
    """A deadline for a wait inside MLX: ``arm`` starts a process that ends this one with a message
    when ``seconds`` pass without a ``beat``; ``disarm`` stops it. It bounds the ranks' first meeting
    (``connect``) and each training step: a rank that freezes (stopped, swapping, a stalled link)
    without dying would leave the others blocked in their next collective forever; instead each
    rank's watchdog ends its own rank, and the last complete checkpoint stays resumable."""

    def __init__(self):
        self.process: subprocess.Popen | None = None

    def arm(self, seconds: float, message: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(seconds), message, str(os.getpid())], stdin=subprocess.PIPE)

    def beat(self) -> None:
        if self.process is not None:
            try:
                self.process.stdin.write(b".")
                self.process.stdin.flush()
            except OSError:  # the watchdog is gone: nothing left to tell
                pass

    def disarm(self) -> None:
        if self.process is not None:
            try:
                self.process.stdin.close()  # the watchdog exits on end of input
            except OSError:  # it is gone already (killed with the rank's process group)
                pass
            self.process.wait()
            self.process = None


def digest(value: Any) -> str:
    """A short sha256 of a JSON-serialisable value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_digest(recipe: Any) -> str:
    """The settings that decide what a step computes. Local file paths are left out (they may
    differ between Macs; the data and base model are compared by content), and so are the
    run directory and the demo, which only rank 0 uses."""
    settings = dataclasses.asdict(recipe)
    for section in ("output", "demo"):
        settings.pop(section)
    settings["model"].pop("path")
    for key in ("train", "valid", "test"):
        settings["data"].pop(key)
    return digest(settings)


def items_digest(*splits: list) -> str:
    """The token ids, loss masks and other fields of every training item (example, pair...), in order."""
    sha = hashlib.sha256()

    def feed(value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                feed(getattr(value, f.name))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (bool, int, float)) for v in value):
            sha.update(np.asarray(value, np.float64).tobytes())
        else:
            sha.update(json.dumps(value, sort_keys=True, default=str).encode())

    for items in splits:
        sha.update(str(len(items)).encode())
        for item in items:
            feed(item)
    return sha.hexdigest()[:16]


def check_same(world: World, facts: dict[str, str]) -> None:
    """Stop unless every rank reports the same ``facts`` (version, recipe, data, base model, ...).

    Rank 0 names what differs and where; the other ranks exit quietly (their launcher shows rank
    0's line)."""
    if world.size == 1:
        return
    mine = json.dumps({"host": socket.gethostname(), "facts": facts}).encode()
    if len(mine) > FACTS_BYTES:
        raise MacftError("Start-up facts are too long to compare across ranks.")
    buffer = np.zeros(FACTS_BYTES, np.uint8)
    buffer[: len(mine)] = np.frombuffer(mine, np.uint8)
    gathered = np.asarray(mx.distributed.all_gather(mx.array(buffer), group=world.group)).reshape(world.size, FACTS_BYTES)
    reports = [json.loads(bytes(row).rstrip(b"\0")) for row in gathered]
    for rank, report in enumerate(reports[1:], start=1):
        differ = [key for key in facts if report["facts"].get(key) != reports[0]["facts"].get(key)]
        if not differ:
            continue
        if not world.main:
            raise SystemExit(1)
        key = differ[0]
        raise MacftError(
            f"Rank {rank} ({report['host']}) differs from rank 0 ({reports[0]['host']}) in its {key}: "
            f"{report['facts'].get(key)} vs {reports[0]['facts'].get(key)}; every rank needs the same macft, MLX, recipe, data and base model."
        )


def share_state(world: World, model: nn.Module, optimizer: Any, progress: Progress | None) -> Progress | None:
    """Rank 0's trainable weights, optimizer state and progress on every rank; returns the progress.

    Rank 0 holds them from its own initialisation or from the checkpoint it resumed, so every
    rank starts each run from identical state whatever the others' random initialisation or
    files."""
    if world.size == 1:
        return progress
    model.update(world.broadcast(model.trainable_parameters()))
    optimizer.init(model.trainable_parameters())
    optimizer.state = world.broadcast(optimizer.state)
    state = world.broadcast_json(dataclasses.asdict(progress) if progress is not None else None)
    return Progress(**state) if state is not None else None


@contextmanager
def peer_errors(world: World, where: str, step_timeout: float = 0) -> Iterator[None]:
    """Turn a lost connection to another rank into a one-line error naming what is kept; with
    ``step_timeout`` seconds, so is a step that never ends because another rank froze (``Watchdog``)."""
    watching = world.size > 1 and world.watch is not None and 0 < step_timeout < math.inf
    if watching:  # rank 0 says why; the others end quietly, as for any failure of a peer
        world.watch.arm(step_timeout, (
            f"Error: No training step finished within train.step_timeout={step_timeout:g} s: a rank stopped responding "
            f"(frozen, or the network stalled). {where}"
        ) if world.main else "")  # fmt: skip
    try:
        yield
    except RuntimeError as exc:
        if world.size == 1 or "[" not in str(exc):
            raise
        raise MacftError(
            f"Rank {world.rank} lost the connection to another rank ({str(exc).splitlines()[0]}): a rank exited or the "
            f"network failed. {where}"
        ) from None
    finally:
        if watching:
            world.watch.disarm()
