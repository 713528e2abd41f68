"""An OpenAI-compatible HTTP server for one base model and many adapters, on the standard library.

    served = open_served("gemma3-270m", ["json=runs/json", "runs/dates"])     # base + adapters, checked
    server = make_server(served, "127.0.0.1", 8000)                           # port 0: a free port
    server.serve_forever()

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` and
``POST /v1/completions``, each streamed as server-sent events when the request asks (``stream``).
The request's ``model`` names an adapter or the base (by its spec, as ``/v1/models`` lists it); the
adapter is swapped on the one loaded base (``macft.chat.set_adapter``, or llama.cpp's runtime LoRA
with ``--engine llama.cpp``). Chat messages go through ``macft.chat.prompt_tokens`` and generation
through ``macft.chat.stream``, as in ``macft chat``/``generate``: same template, same end-of-sequence
tokens, and greedy answers equal to ``macft generate``'s; a completion prompt is continued as plain
text (``macft generate --no-chat``).

One worker thread owns the model and answers requests one at a time in arrival order, so concurrent
requests queue instead of interleaving on the shared weights. Every bad request gets OpenAI's error
shape ``{"error": {"message", "type", "param", "code"}}`` with its HTTP status (400, 404, 405, 411,
413); anything unexpected is a 500 of the same shape, never a traceback to the client.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

from macft.errors import MacftError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY = 16 << 20  # bytes; a request body above it is refused with 413
MAX_STOPS = 4  # as OpenAI allows
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------- engines


class MlxEngine:
    """The MLX model of ``macft chat``: one opened base whose adapter ``use`` swaps in place."""

    name = "mlx"

    def __init__(self, opened, adapters: dict[str, Path]):
        self.opened = opened
        self.adapters = adapters
        self.current: str | None = None

    @property
    def tokenizer(self):
        return self.opened.tokenizer

    def use(self, adapter: str | None) -> None:
        from macft.chat import set_adapter

        if adapter != self.current:
            self.current = None  # a failed swap leaves the bare base (set_adapter's contract)
            set_adapter(self.opened, None if adapter is None else self.adapters[adapter])
            self.current = adapter

    def seed(self, value: int) -> None:
        import mlx.core as mx

        mx.random.seed(value)

    def stream(self, tokens: list[int], sampling) -> Iterator[Any]:
        from macft.chat import stream

        return stream(self.opened.model, self.opened.tokenizer, tokens, sampling)


@dataclass
class Served:
    """What the server answers for: the engine, the base's id and the adapters' ids (in listing order)."""

    engine: Any  # MlxEngine or macft.engines.llamacpp.LlamaCppAdapters
    base: str
    adapters: dict[str, Path]
    created: int = field(default_factory=lambda: int(time.time()))

    def ids(self) -> list[str]:
        return [self.base, *self.adapters]

    def adapter_of(self, model: str) -> str | None:
        """The adapter a request's ``model`` names (None for the base), or a 404."""
        if model == self.base:
            return None
        if model in self.adapters:
            return model
        raise ApiError(404, f"The model '{model}' is not served here; GET /v1/models lists {', '.join(self.ids())}.", "model", "model_not_found")


def adapter_specs(specs: list[str], model_spec: str | None = None) -> dict[str, Path]:
    """name -> run directory from ``--adapter`` values: ``name=RUN``, ``RUN`` (named after its folder), a
    folder of runs (each named after its subfolder), or a PEFT adapter folder or hub id (converted for
    ``model_spec``, else its own base, as every ``--adapter`` takes one)."""
    from macft.adapters.files import ADAPTER_FILE, CONFIG_FILE, adapter_files
    from macft.adapters.peft import adapter_run, is_peft_source, source_name

    found: dict[str, Path] = {}

    def add(name: str, path: Path) -> None:
        if not name or name.strip() != name:
            raise MacftError(f"--adapter {path}: an adapter name must be non-empty, without surrounding spaces (use NAME=RUN).")
        if name in found:
            raise MacftError(f"Two adapters are named '{name}' ({found[name]} and {path}); name them with NAME=RUN.")
        adapter_files(path)  # a one-line error when the run has no adapter
        found[name] = path

    for spec in specs:
        name, sep, value = spec.partition("=")
        source = value if sep else spec
        path = Path(source).expanduser()
        if is_peft_source(source):
            add(name if sep else source_name(source), adapter_run(source, model_spec))
        elif sep:
            add(name, path)
        elif (path / ADAPTER_FILE).is_file():
            add(path.resolve().name, path)
        elif path.is_dir() and (runs := sorted(p for p in path.iterdir() if (p / ADAPTER_FILE).is_file() and (p / CONFIG_FILE).is_file())):
            for run in runs:
                add(run.name, run)
        else:
            raise MacftError(f"--adapter {spec}: no run directory there (adapters.safetensors + adapter_config.json), nor a folder of them, nor a PEFT adapter.")
    return found


def open_served(model_spec: str | None, specs: list[str], engine: str = "mlx") -> Served:
    """Load the base once (``model_spec``, else the first adapter's recorded base) and check that every
    adapter was trained on it; a mismatch is one line naming both."""
    from macft.models.spec import DEFAULT_MODEL
    from macft.run_base import recorded_base

    adapters = adapter_specs(specs, model_spec)
    first = next(iter(adapters.values()), None)
    base_id = model_spec or (recorded_base(first).spec if first is not None else DEFAULT_MODEL)
    if base_id in adapters:
        raise MacftError(f"An adapter is named '{base_id}', the base model's id; give it another NAME=RUN.")
    if engine == "llama.cpp":
        from macft.engines.llamacpp import LlamaCppAdapters

        served_engine = LlamaCppAdapters(model_spec, adapters)
        sha = served_engine.base_sha256
    else:
        from macft.chat import open_model, set_adapter

        opened = open_model(model_spec, first)  # the base loaded as the first adapter was trained on
        set_adapter(opened, None)
        served_engine = MlxEngine(opened, adapters)
        sha = opened.loaded.identity.get("sha256")
    for name, path in adapters.items():
        recorded = recorded_base(path)
        if recorded.sha256 and sha and recorded.sha256 != sha:
            raise MacftError(f"Adapter '{name}' ({path}) was trained on {recorded.spec}, not on the served base {base_id} (other weights); serve it with its own base.")
        served_engine.use(name)  # applies every adapter once: a broken one stops the start, not a request
    served_engine.use(None)
    return Served(served_engine, base_id, adapters)


# ---------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    """A validated completion request, ready for the engine."""

    kind: str  # "chat" or "text"
    model: str
    adapter: str | None
    tokens: list[int]
    sampling: Any  # macft.chat.Sampling
    seed: int | None
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, default, low: float, high: float | None = None, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(400, f"'{key}' must be {kind}, not {json.dumps(value)}.", key)
    if value < low or (high is not None and value > high):
        limits = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"'{key}' must be {limits} (got {value}).", key)
    return value


def _refuse_unsupported(body: dict) -> None:
    """Options whose OpenAI meaning this server cannot honour: refused, never silently ignored."""
    if body.get("n") not in (None, 1):
        raise ApiError(400, "'n' must be 1: this server returns one choice per request.", "n")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "'best_of' must be 1.", "best_of")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise ApiError(400, f"'{key}' is not supported (only 0).", key)
    for key in ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions"):
        if body.get(key) not in (None, False, {}, [], 0, ""):
            raise ApiError(400, f"'{key}' is not supported by this server.", key)
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise ApiError(400, "'response_format' other than {\"type\": \"text\"} is not supported.", "response_format")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects.", "messages")
    result = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'.", where)
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)} (got {json.dumps(role)}).", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"{where}.content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported.", f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string.", f"{where}.content")
        result.append({"role": ROLES[role], "content": content})
    return result


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings.", "stop")
    return tuple(s for s in stops if s)


def parse_request(body: Any, kind: str, served: Served, defaults) -> Request:
    """Validate a /v1/chat/completions (``kind="chat"``) or /v1/completions (``"text"``) body."""
    from macft.chat import Sampling, prompt_tokens

    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, f"'model' is required: one of {', '.join(served.ids())}.", "model")
    adapter = served.adapter_of(model)
    _refuse_unsupported(body)
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    sampling = Sampling(
        max_tokens=_number(body, limit, defaults.max_tokens, 1, integer=True),
        temperature=float(_number(body, "temperature", defaults.temperature, 0, 2)),
        top_p=float(_number(body, "top_p", defaults.top_p, 0, 1)),
    )
    if sampling.top_p == 0:
        raise ApiError(400, "'top_p' must be above 0 (use temperature 0 for greedy answers).", "top_p")
    seed = _number(body, "seed", None, 0, 2**63 - 1, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object.", "stream_options")
    tokenizer = served.engine.tokenizer
    try:
        if kind == "chat":
            tokens = prompt_tokens(tokenizer, _messages(body))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ApiError(400, "'prompt' must be a string (one prompt per request).", "prompt")
            tokens = prompt_tokens(tokenizer, [{"role": "user", "content": prompt}], use_chat_template=False)
    except MacftError as exc:  # e.g. a chat template that refuses the roles' order
        raise ApiError(400, str(exc), "messages" if kind == "chat" else "prompt") from None
    return Request(kind, model, adapter, tokens, sampling, seed, _stops(body), stream, bool(options.get("include_usage")))


# ---------------------------------------------------------------------------- generation


class StopText:
    """Cuts streamed text at the first stop string, holding back a tail that may begin one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was reached)."""
        self.pending += text
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            ready, self.pending = self.pending[: min(hits)], ""
            return ready, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        ready = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(ready) :]
        return ready, False

    def flush(self) -> str:
        ready, self.pending = self.pending, ""
        return ready


@dataclass
class Job:
    """One request in the queue; the worker puts ("text", str), then ("done", finish_reason, prompt
    tokens, completion tokens) or ("error", ApiError) on ``events``."""

    served: Served
    request: Request
    log: Callable[[str], None]
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker(threading.Thread):
    """The only thread that touches the models: answers jobs one at a time, first come first served.

    There is one per process, alive until the process ends: mlx-lm generates on a thread-local MLX
    stream, and a thread that used one aborts the process when it exits (mlx 0.32)."""

    _instance: "Worker | None" = None
    _lock = threading.Lock()

    def __init__(self):
        super().__init__(name="macft-serve-worker", daemon=True)
        self.jobs: queue.Queue = queue.Queue()

    @classmethod
    def shared(cls) -> "Worker":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
                cls._instance.start()
            return cls._instance

    def submit(self, served: Served, request: Request, log: Callable[[str], None]) -> Job:
        job = Job(served, request, log)
        self.jobs.put(job)
        return job

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            if not job.cancelled.is_set():
                self.answer(job)

    def answer(self, job: Job) -> None:
        request, engine, log = job.request, job.served.engine, job.log
        try:
            engine.use(request.adapter)
        except Exception as exc:  # noqa: BLE001 — e.g. the run directory was deleted while serving
            log(f"error loading '{request.model}': {exc}")
            job.events.put(("error", ApiError(500, f"The server could not load '{request.model}': {exc}", kind="server_error")))
            return
        try:
            if request.seed is not None:
                engine.seed(request.seed)
            cutter, last, finish = StopText(request.stops), None, None
            for last in engine.stream(request.tokens, request.sampling):
                text, stopped = cutter.feed(last.text)
                if text:
                    job.events.put(("text", text))
                if stopped:
                    finish = "stop"
                    break
                if job.cancelled.is_set():  # the client went away
                    return
            if finish is None:
                if rest := cutter.flush():
                    job.events.put(("text", rest))
                finish = getattr(last, "finish_reason", None) or ("length" if last is not None and last.generation_tokens >= request.sampling.max_tokens else "stop")
            produced = last.generation_tokens if last is not None else 0
            job.events.put(("done", finish, len(request.tokens), produced))
        except MacftError as exc:  # e.g. a prompt longer than llama.cpp's context
            job.events.put(("error", ApiError(400, str(exc))))
        except Exception as exc:  # noqa: BLE001 — the server answers 500 and keeps serving
            log(f"error while generating for '{request.model}': {type(exc).__name__}: {exc}")
            job.events.put(("error", ApiError(500, f"The server failed while generating: {type(exc).__name__}: {exc}", kind="server_error")))


# ---------------------------------------------------------------------------- responses


def _completion_object(request: Request, ident: str, created: int, text: str | None, finish: str | None, chunk: bool, role: bool = False) -> dict:
    if request.kind == "chat":
        if chunk:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    return {"id": ident, "object": kind, "created": created, "model": request.model, "choices": [choice]}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Handler(BaseHTTPRequestHandler):
    server: "ModelServer"
    protocol_version = "HTTP/1.1"
    server_version = "macft"
    timeout = 120  # seconds a kept-alive connection may idle (or a body take to arrive) before it is closed

    def log_message(self, format: str, *args) -> None:  # noqa: A002 — the server's own log line replaces http.server's
        pass

    # ------------------------------------------------------------------ plumbing

    def send_json(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, error: ApiError) -> None:
        self.close_connection = True  # the body may be unread: start the next request on a fresh connection
        self.send_json(error.status, error.body(), {"Connection": "close"})
        self.server.log(f"{self.command or '-'} {getattr(self, 'path', '-')} {error.status} {error.message}")  # no path on a malformed request line

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, an unknown method) in OpenAI's shape."""
        from http import HTTPStatus

        self.send_error_json(ApiError(code, message or HTTPStatus(code).phrase))

    def read_body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "A Content-Length header is required.")
        try:
            size = int(length)
        except ValueError:
            raise ApiError(400, f"Content-Length '{length}' is not a number.") from None
        if size > MAX_BODY:
            raise ApiError(413, f"The request body ({size} bytes) is above the limit of {MAX_BODY} bytes.")
        raw = self.rfile.read(size)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"The request body is not valid JSON ({exc}).") from None

    def routed(self, action: Callable[[], None]) -> None:
        try:
            action()
        except ApiError as exc:
            self.send_error_json(exc)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away
        except Exception as exc:  # noqa: BLE001 — never a traceback to the client or the terminal
            self.server.log(f"error answering {self.command} {self.path}: {type(exc).__name__}: {exc}")
            self.close_connection = True
            try:
                self.send_json(500, ApiError(500, f"Internal error: {type(exc).__name__}: {exc}", kind="server_error").body())
            except OSError:
                pass

    # ------------------------------------------------------------------ routes

    POST_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "text"}

    def do_GET(self) -> None:
        self.routed(self.get)

    def do_POST(self) -> None:
        self.routed(self.post)

    def do_PUT(self) -> None:
        self.routed(self.wrong_method)

    do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_PUT

    def wrong_method(self) -> None:
        raise ApiError(405 if self.route() else 404, f"{self.command} {self.route() or self.path} is not supported here.", code="method_not_allowed" if self.route() else "not_found")

    def route(self) -> str | None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in self.POST_ROUTES or path == "/v1/models" or path.startswith("/v1/models/"):
            return path
        return None

    def get(self) -> None:
        path, served = self.route(), self.server.served
        if path in self.POST_ROUTES:
            raise ApiError(405, f"{path} takes POST.", code="method_not_allowed")
        if path == "/v1/models":
            self.send_json(200, {"object": "list", "data": [self.model_object(m) for m in served.ids()]})
        elif path is not None:
            model = path.removeprefix("/v1/models/")
            served.adapter_of(model)
            self.send_json(200, self.model_object(model))
        else:
            raise ApiError(404, f"No route {self.path}; this server answers /v1/models, /v1/chat/completions and /v1/completions.", code="not_found")

    def model_object(self, model: str) -> dict:
        served = self.server.served
        parent = None if model == served.base else served.base
        return {"id": model, "object": "model", "created": served.created, "owned_by": "macft", "parent": parent}

    def post(self) -> None:
        path = self.route()
        if path not in self.POST_ROUTES:
            raise ApiError(405 if path else 404, f"POST {self.path} is not supported; POST /v1/chat/completions or /v1/completions.", code="method_not_allowed" if path else "not_found")
        request = parse_request(self.read_body(), self.POST_ROUTES[path], self.server.served, self.server.defaults)
        start = time.time()
        job = Worker.shared().submit(self.server.served, request, self.server.log)
        try:
            produced = self.stream(job) if request.stream else self.whole(job)
        finally:
            job.cancelled.set()  # a no-op after "done"; stops the worker if this handler failed
        if produced is not None:
            self.server.log(f"POST {path} 200 model={request.model} {produced} tokens {time.time() - start:.1f}s")

    def whole(self, job: Job) -> int:
        pieces = []
        while True:
            event = job.events.get()
            if event[0] == "text":
                pieces.append(event[1])
            elif event[0] == "error":
                raise event[1]
            else:
                _, finish, prompt, produced = event
                break
        request = job.request
        ident = ("chatcmpl-" if request.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        body = _completion_object(request, ident, int(time.time()), "".join(pieces), finish, chunk=False)
        self.send_json(200, body | {"usage": _usage(prompt, produced)})
        return produced

    def stream(self, job: Job) -> int | None:
        request = job.request
        event = job.events.get()  # the first event decides: an error before any text is a plain JSON error
        if event[0] == "error":
            raise event[1]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        ident, created = ("chatcmpl-" if request.kind == "chat" else "cmpl-") + uuid.uuid4().hex, int(time.time())

        def send(body: dict) -> None:
            self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
            self.wfile.flush()

        if request.kind == "chat":
            send(_completion_object(request, ident, created, "", None, chunk=True, role=True))
        while True:
            if event[0] == "text":
                send(_completion_object(request, ident, created, event[1], None, chunk=True))
            elif event[0] == "error":
                send(event[1].body())  # mid-stream: the error as the last event
                self.server.log(f"POST {self.path} stream ended by an error: {event[1].message}")
                return None
            else:
                _, finish, prompt, produced = event
                final = _completion_object(request, ident, created, None if request.kind == "chat" else "", finish, chunk=True)
                send(final | ({"usage": None} if request.include_usage else {}))
                if request.include_usage:
                    send({"id": ident, "object": final["object"], "created": created, "model": request.model, "choices": [], "usage": _usage(prompt, produced)})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                return produced
            event = job.events.get()


@dataclass(frozen=True)
class Defaults:
    """Sampling for requests that leave it out (those of ``macft chat``)."""

    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95


class ModelServer(ThreadingHTTPServer):
    """The HTTP server; its handler threads hand requests to the shared ``Worker``."""

    daemon_threads = True

    def __init__(self, served: Served, host: str, port: int, defaults: Defaults, log: Callable[[str], None]):
        super().__init__((host, port), Handler)
        self.served, self.defaults, self.log = served, defaults, log

    def handle_error(self, request, client_address) -> None:  # an error outside a route: one line, no traceback
        import sys

        self.log(f"error serving {client_address[0]}: {sys.exc_info()[1]}")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def make_server(served: Served, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, defaults: Defaults = Defaults(), log: Callable[[str], None] = lambda line: None) -> ModelServer:
    """A server bound to ``host:port`` (port 0: a free one), not yet serving (call ``serve_forever``)."""
    try:
        return ModelServer(served, host, port, defaults, log)
    except OSError as exc:
        raise MacftError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host.") from None
