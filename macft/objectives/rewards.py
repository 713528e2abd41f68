"""GRPO reward functions: built-ins and the user's own, named in ``align.rewards``.

Every reward is ``reward(completion: str, example: dict) -> float``, where ``example`` is the
prompt line's JSON object (so its ``answer`` or any other field is there). The recipe lists them
and their scores are summed:

    exact_match            1 if the stripped completion equals example["answer"] (exact_match=FIELD for another field)
    json_valid             1 if the completion is one JSON value
    json_keys=name,age     1 if it is a JSON object holding these keys (0.5 if valid JSON without them)
    regex=^\\d+$           1 if the pattern matches the stripped completion (re.search)
    length_penalty=200     −0.01 per character of the completion beyond 200
    my_rewards:score       score(completion, example) from an importable module
    rewards.py:score       ... or from a Python file (relative to where macft runs)

    rewards = load_rewards(["exact_match", "json_keys=name,age"], timeout=5.0)
    scores = score(rewards, completions, examples, sources)    # [n] float

A reward is code the user wrote, so it runs in a child process of its own (``RewardProcess``): each
call has ``align.reward_timeout`` seconds, and one that raises, exits, kills its process or runs
past its time is a one-line error naming it and the prompt's line, never a hang or an exit of
macft. While macft waits for a reward, Ctrl-C interrupts at once (nothing of the step has changed
yet, so the run keeps a checkpoint of the step before). What a reward prints is not shown.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from macft.errors import MacftError

IMPORT_SECONDS = 60.0  # for the child to start and import the rewards' modules

RewardFn = Callable[[str, dict], float]


@dataclass(frozen=True)
class Reward:
    name: str  # as written in the recipe
    fn: RewardFn


def exact_match(field: str = "answer") -> RewardFn:
    def reward(completion: str, example: dict) -> float:
        if field not in example:
            raise KeyError(f"the line has no '{field}' field")
        return float(completion.strip() == str(example[field]).strip())

    return reward


def _json(text: str) -> Any:
    return json.loads(text.strip())


def json_valid(_: str = "") -> RewardFn:
    def reward(completion: str, example: dict) -> float:
        try:
            _json(completion)
        except ValueError:
            return 0.0
        return 1.0

    return reward


def json_keys(keys: str) -> RewardFn:
    wanted = [k.strip() for k in keys.split(",") if k.strip()]

    def reward(completion: str, example: dict) -> float:
        try:
            value = _json(completion)
        except ValueError:
            return 0.0
        return 1.0 if isinstance(value, dict) and all(k in value for k in wanted) else 0.5

    return reward


def regex(pattern: str) -> RewardFn:
    compiled = re.compile(pattern)
    return lambda completion, example: float(compiled.search(completion.strip()) is not None)


def length_penalty(limit: str = "64") -> RewardFn:
    characters = int(limit)
    return lambda completion, example: -0.01 * max(0, len(completion) - characters)


BUILT_INS: dict[str, Callable[..., RewardFn]] = {
    "exact_match": exact_match,
    "json_valid": json_valid,
    "json_keys": json_keys,
    "regex": regex,
    "length_penalty": length_penalty,
}


def load_reward(spec: str) -> Reward:
    """One reward from its recipe entry; a bad entry is a one-line error naming it."""
    name, sep, argument = spec.partition("=")
    if name in BUILT_INS:
        try:
            fn = BUILT_INS[name](argument) if sep else BUILT_INS[name]()
        except (TypeError, ValueError, re.error) as exc:
            raise MacftError(f"align.rewards entry '{spec}': bad argument ({exc}).") from None
        return Reward(spec, fn)
    target, colon, function = spec.rpartition(":")
    if not colon or not target or not function:
        known = ", ".join(BUILT_INS)
        raise MacftError(f"align.rewards entry '{spec}' is neither a built-in ({known}) nor 'module:function'.")
    module = _import(target, spec)
    fn = getattr(module, function, None)
    if not callable(fn):
        raise MacftError(f"align.rewards entry '{spec}': {target} has no function '{function}'.")
    return Reward(spec, fn)


def _import(target: str, spec: str) -> Any:
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise MacftError(f"align.rewards entry '{spec}': file {path} does not exist.")
            module_spec = importlib.util.spec_from_file_location(f"macft_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
        if "" not in sys.path:  # `python -m` and the console script differ; the working directory counts
            sys.path.insert(0, "")
        return importlib.import_module(target)
    except MacftError:
        raise
    except Exception as exc:
        raise MacftError(f"align.rewards entry '{spec}': importing {target} failed ({type(exc).__name__}: {exc}).") from None


def beside_recipe(specs: Any, recipe_dir: Path) -> Any:
    """A reward in a file next to the recipe ("rewards.py:score") resolves like the recipe's data."""
    if not isinstance(specs, list):
        return specs
    resolved = []
    for spec in specs:
        target, colon, function = str(spec).rpartition(":")
        if colon and target.endswith(".py") and not Path(target).is_absolute() and (recipe_dir / target).is_file():
            spec = f"{(recipe_dir / target).resolve()}:{function}"
        resolved.append(spec)
    return resolved


def load_rewards(specs: tuple[str, ...] | list[str], timeout: float = 5.0) -> RewardProcess:
    """The rewards of ``specs``, loaded in a child process; every call of one gets ``timeout`` seconds."""
    if not specs:
        raise MacftError("GRPO needs at least one reward: set align.rewards (e.g. [exact_match]).")
    return RewardProcess(list(specs), timeout)


def score(rewards: RewardProcess, completions: list[str], examples: list[dict], sources: list[str]) -> np.ndarray:
    """The summed reward of each completion; a failing, slow or non-numeric reward is a one-line error
    naming the function and the example's line."""
    totals = np.zeros(len(completions), np.float64)
    replies = rewards.run(completions, examples, sources)
    for i, source in enumerate(sources):
        for name in rewards.specs:
            reply = next(replies)
            if "error" in reply:
                rewards.close()  # it may still be answering the rest of the batch
                raise MacftError(f"Reward '{name}' failed on {source} ({reply['error']}).")
            value = reply["value"]
            if not math.isfinite(value):
                raise MacftError(f"Reward '{name}' returned {value} on {source}; return a finite number.")
            totals[i] += value
    return totals


class RewardProcess:
    """The rewards of ``specs``, run by a child Python process that reads requests (one JSON line
    each) from one pipe and answers on another, so nothing a reward prints can garble them."""

    def __init__(self, specs: list[str], timeout: float):
        self.specs, self.timeout = specs, timeout
        to_child, self._requests = os.pipe()
        self._replies, from_child = os.pipe()
        # Run this file itself, not ``-m``: importing macft.objectives would load MLX into the child.
        command = [sys.executable, "-c", _START_WORKER, __file__, str(to_child), str(from_child)]
        self._process = subprocess.Popen(
            command, pass_fds=(to_child, from_child), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._finalizer = weakref.finalize(self, _stop, self._process, self._requests, self._replies)
        self._send({"load": specs})
        reply = self._reply(max(timeout, IMPORT_SECONDS), lambda: f"loading {', '.join(specs)}")
        if "error" in reply:
            self.close()
            raise MacftError(reply["error"])

    def run(self, completions: list[str], examples: list[dict], sources: list[str]) -> Iterator[dict]:
        """Each completion's replies, one per reward in order: {"value": float} or {"error": "..."}."""
        self._send({"completions": completions, "examples": examples})
        for source in sources:
            for name in self.specs:
                yield self._reply(self.timeout, lambda: f"Reward '{name}' on {source}")

    def close(self) -> None:
        self._finalizer()

    def _send(self, request: dict) -> None:
        if self._process.poll() is not None:
            raise MacftError(f"The rewards' process has ended ({self._exit()}); run the command again.")
        try:
            os.write(self._requests, (json.dumps(request) + "\n").encode())
        except OSError:
            raise MacftError(f"The rewards' process has ended ({self._exit()}); run the command again.") from None

    def _reply(self, seconds: float, what: Callable[[], str]) -> dict:
        deadline = time.monotonic() + seconds
        with interrupted_at_once():
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.close()
                    raise MacftError(f"{what()} did not return within {seconds:g} s; make it faster or raise align.reward_timeout.")
                if select.select([self._replies], [], [], min(left, 0.25))[0]:
                    chunk = os.read(self._replies, 1 << 20)
                    if not chunk:
                        self._process.wait()
                        self.close()
                        raise MacftError(f"{what()} ended its process ({self._exit()}); a reward must return a number, not exit.")
                    self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def _exit(self) -> str:
        code = self._process.poll()
        if code is None:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


def _stop(process: subprocess.Popen, *fds: int) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@contextmanager
def interrupted_at_once() -> Iterator[None]:
    """Ctrl-C (or SIGTERM) raises KeyboardInterrupt at once while macft waits for user code, even
    inside a training step whose loop would otherwise wait for the step to end."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------------------- the child process

_START_WORKER = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='macft_reward_worker')"


def _serve(requests: int, replies: int) -> None:
    """The child's loop: load the rewards, then answer each batch with one reply per call."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; macft decides
    _end_with_parent()
    out = os.fdopen(replies, "w", buffering=1)
    rewards: list[Reward] = []

    def answer(reply: dict) -> None:
        out.write(json.dumps(reply) + "\n")

    for line in os.fdopen(requests):
        request = json.loads(line)
        if "load" in request:
            try:
                rewards = [load_reward(spec) for spec in request["load"]]
            except MacftError as exc:
                answer({"error": str(exc)})
                continue
            except BaseException as exc:  # noqa: BLE001  (a module that exits or raises while importing)
                answer({"error": f"align.rewards: importing the rewards failed ({_described(exc)})."})
                continue
            answer({"ok": True})
            continue
        for completion, example in zip(request["completions"], request["examples"]):
            for reward in rewards:
                try:
                    answer({"value": float(reward.fn(completion, example))})
                except BaseException as exc:  # noqa: BLE001  (sys.exit() included: a reward cannot end macft)
                    answer({"error": _described(exc)})


def _described(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r}); a reward must return a number"
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def _end_with_parent() -> None:
    """Exit when macft does, even if it was killed and a reward is still running."""
    parent = os.getppid()
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "macft_reward_worker":
    _serve(int(sys.argv[2]), int(sys.argv[3]))
