"""Read a JSONL dataset and validate every line into a ``Record`` of one of three kinds.

The format is detected per line, so one file may mix shapes:

    {"text": "..."}                                              -> kind "text"
    {"prompt": "...", "completion": "..."}                       -> kind "completion"
    {"instruction": "...", "input": "...", "output": "..."}      -> kind "completion" (Alpaca)
    {"messages": [{"role": "user", "content": "..."}, ...],
     "tools": [...]}                                             -> kind "chat"
       (an assistant message with "weight": 0 is kept as context but not trained on)
    {"conversations": [{"from": "human", "value": "..."}, ...]}  -> kind "chat" (ShareGPT)

A bad line raises ``MacftError("train.jsonl line 7: <problem>; <what to do>")``. A line is read
only up to ``MAX_LINE_BYTES`` and nested at most ``MAX_DEPTH`` levels deep, so a huge or deeply
nested line is one such error, in time and memory bounded by the limits, not by the line.

    records = read_records(Path("data/train.jsonl"))
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from macft.errors import MacftError

# Examples are cut at data.max_seq_length tokens; 2 MiB is about half a million tokens of text.
MAX_LINE_BYTES = 2 << 20
MAX_DEPTH = 64  # real lines nest a dozen levels (messages, tool calls, their arguments)
CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SHAPES = (
    '{"text"}, {"prompt","completion"}, {"messages":[...]}, '
    '{"instruction","input","output"} or {"conversations":[...]}'
)


@dataclass(frozen=True)
class Record:
    """One validated line. ``format`` names the shape it came in; ``kind`` how it is tokenized."""

    kind: str  # "text" | "completion" | "chat"
    format: str  # "text" | "prompt_completion" | "alpaca" | "chat" | "sharegpt"
    source: str  # "file:line", for error messages
    text: str = ""
    prompt: str = ""
    completion: str = ""
    # Without a chat template the prompt is followed directly by the completion; Alpaca's
    # instruction has no separator of its own, so it gets a blank line before the answer.
    prompt_suffix: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[Any] | None = None

    def as_messages(self) -> list[dict[str, Any]]:
        """The record as a conversation (a completion becomes one user and one assistant turn)."""
        if self.kind == "chat":
            return self.messages
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.completion}]


class LineError(ValueError):
    """A problem with one line; ``read_records`` adds the file name and line number."""


def read_records(path: Path, parse: Callable[[str, str], Any] | None = None) -> list[Any]:
    """Parse and validate every non-blank line of a JSONL file (with ``parse(line, source)``,
    ``parse_line`` by default: preference pairs and prompt sets bring their own)."""
    parse = parse or parse_line
    path = Path(path)
    if not path.is_file():
        raise MacftError(f"Data file {path} does not exist.")
    records = []
    with path.open("rb") as fh:
        for number, raw in enumerate(iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise MacftError(
                    f"{path.name} line {number} is longer than {MAX_LINE_BYTES >> 20} MiB, the most macft reads in one line "
                    "(an example is cut at data.max_seq_length tokens anyway); shorten it or split it into several examples."
                )
            if not raw.strip():
                continue
            source = f"{path.name}:{number}"
            try:
                records.append(parse(_decode(raw), source))
            except LineError as exc:
                raise MacftError(f"{path.name} line {number}: {exc}") from None
    if not records:
        raise MacftError(f"{path} is empty; it needs one JSON object per line, e.g. {{\"text\": \"...\"}}.")
    return records


def first_object(path: Path) -> dict | None:
    """The first line of a JSONL file as a JSON object, or None when it is not one (the readers
    report such a line) or the file is empty."""
    with open(path, "rb") as fh:
        for raw in iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b""):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw) if len(raw) <= MAX_LINE_BYTES else None
            except (ValueError, UnicodeDecodeError, RecursionError):
                return None
            return obj if isinstance(obj, dict) else None
    return None


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")  # tolerate a byte-order mark at the start of the file
    except UnicodeDecodeError as exc:
        raise LineError(f"not UTF-8 text (byte {exc.start + 1}); save the file as UTF-8") from None


def json_object(line: str, shapes: str) -> dict:
    """The line's JSON object; ``shapes`` names what a line may look like, for the error."""
    line = line.rstrip("\r\n")  # json counts a trailing newline as a second line, which would throw the column off
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        where = "at the end of the line" if exc.pos >= len(line.rstrip()) else f"at column {exc.pos + 1}"
        raise LineError(f"not valid JSON ({exc.msg} {where}); write one JSON object per line") from None
    except RecursionError:  # deeper than Python's parser goes
        obj = _TOO_DEEP
    if obj is _TOO_DEEP or _deeper_than(obj, MAX_DEPTH):
        raise LineError(f"nested more than {MAX_DEPTH} levels deep; each line must be {shapes}")
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {_kind(obj)}; each line must be {shapes}")
    return obj


def parse_line(line: str, source: str) -> Record:
    obj = json_object(line, f"one of {SHAPES}")
    if "chosen" in obj or "rejected" in obj:
        raise LineError("this is a preference pair (prompt/chosen/rejected); train it with a preference objective (train.objective)")
    if "messages" in obj:
        return _chat(obj, source)
    if "conversations" in obj:
        return _sharegpt(obj, source)
    if "prompt" in obj or "completion" in obj:
        prompt = _string(obj, "prompt", allow_empty=True)
        completion = _string(obj, "completion")
        return Record("completion", "prompt_completion", source, prompt=prompt, completion=completion)
    if "instruction" in obj or "output" in obj:
        return _alpaca(obj, source)
    if "text" in obj:
        return Record("text", "text", source, text=_string(obj, "text"))
    keys = ", ".join(sorted(obj)) or "none"
    raise LineError(f"unrecognised fields ({keys}); each line must be one of {SHAPES}")


def _alpaca(obj: dict, source: str) -> Record:
    instruction = _string(obj, "instruction")
    output = _string(obj, "output")
    extra = _string(obj, "input", allow_empty=True) if obj.get("input") is not None else ""
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return Record("completion", "alpaca", source, prompt=prompt, completion=output, prompt_suffix="\n\n")


def _chat(obj: dict, source: str) -> Record:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise LineError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise LineError(f"message {i} is {_kind(message)}, not an object with 'role' and 'content'")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise LineError(f"message {i} has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        content = message.get("content")
        calls = message.get("tool_calls")
        if message.get("weight", 1) not in (0, 1) or (role != "assistant" and "weight" in message):
            raise LineError(f"message {i}: 'weight' may only be 0 or 1, on an assistant message (0 = not trained on)")
        if calls is not None and (role != "assistant" or not isinstance(calls, list)):
            raise LineError(f"message {i}: 'tool_calls' must be a list on an assistant message")
        if content is None and calls:
            continue
        if not isinstance(content, str):
            raise LineError(f"message {i} ({role}) 'content' must be a string, got {_kind(content)}")
        if role == "assistant" and not content.strip() and not calls:
            raise LineError(f"message {i} (assistant) is empty; give every assistant turn some content")
    _check_order(messages)
    _require_assistant(messages)
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise LineError(f"'tools' must be a list of tool definitions, got {_kind(tools)}")
    return Record("chat", "chat", source, messages=messages, tools=tools or None)


def _sharegpt(obj: dict, source: str) -> Record:
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise LineError("'conversations' must be a non-empty list of {\"from\", \"value\"} objects")
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise LineError(f"conversation turn {i} is {_kind(turn)}, not an object with 'from' and 'value'")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise LineError(f"conversation turn {i} is from {speaker!r}; use human, gpt or system")
        value = turn.get("value")
        if not isinstance(value, str):
            raise LineError(f"conversation turn {i} 'value' must be a string, got {_kind(value)}")
        role = SHAREGPT_ROLES[speaker]
        if role == "assistant" and not value.strip():
            raise LineError(f"conversation turn {i} (gpt) is empty; give every gpt turn some text")
        messages.append({"role": role, "content": value})
    _check_order(messages)
    _require_assistant(messages)
    return Record("chat", "sharegpt", source, messages=messages)


def _check_order(messages: list[dict]) -> None:
    """Turns in an order chat templates accept: an optional system message first, then a user turn,
    then assistant replies and user turns alternating (tool results only after an assistant turn)."""
    previous = None
    for i, message in enumerate(messages, start=1):
        role = message["role"]
        if role == "system" and i > 1:
            problem = "a system message may only come first"
        elif role == "assistant" and previous not in ("user", "tool"):
            problem = "an assistant turn must follow a user turn (or a tool result)"
        elif role == "user" and previous == "user":
            problem = "two user turns in a row; merge them or put the assistant's reply between them"
        elif role == "tool" and previous not in ("assistant", "tool"):
            problem = "a tool result must follow the assistant turn that called the tool"
        else:
            previous = role
            continue
        raise LineError(f"message {i} ({role}) is out of order: {problem}")


def _require_assistant(messages: list[dict]) -> None:
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in messages):
        raise LineError("the conversation has no assistant turn to train on (weight 0 excludes one); add one")


def _string(obj: dict, key: str, allow_empty: bool = False) -> str:
    if key not in obj:
        present = ", ".join(sorted(obj))
        raise LineError(f"missing '{key}' (fields present: {present}); each line must be one of {SHAPES}")
    value = obj[key]
    if not isinstance(value, str):
        raise LineError(f"'{key}' must be a string, got {_kind(value)}")
    if not allow_empty and not value.strip():
        raise LineError(f"'{key}' is empty; remove the line or fill it in")
    return value


_TOO_DEEP = object()


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether lists and objects nest more than ``limit`` levels in ``value`` (walked without recursion)."""
    level = [value]
    for _ in range(limit + 1):
        level = [child for item in level if isinstance(item, (list, dict)) for child in (item.values() if isinstance(item, dict) else item)]
        if not level:
            return False
    return True


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
