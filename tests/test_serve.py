"""`macft serve`: the official openai client against the server on loopback, with answers equal to
`macft generate`'s for the same adapter and prompt, adapter switching, queued concurrent requests,
OpenAI-style errors, and the command itself in a subprocess."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from test_chat import PROMPT, make_run

from macft.cli import cli
from macft.config import MethodConfig
from macft.errors import MacftError
from macft.serve import StopText, make_server, open_served

openai = pytest.importorskip("openai")

TOKENS = 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("serve-runs")
    return {
        "first": make_run(root / "first", tiny_model_dir, 1, MethodConfig(name="lora", rank=4)),
        "second": make_run(root / "second", tiny_model_dir, 2, MethodConfig(name="dora", rank=2, target_modules=("v_proj", "down_proj"))),
    }


@contextmanager
def running(served):
    """The server on a free loopback port, serving from a thread; shut down and joined on exit."""
    server = make_server(served, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(runs, tiny_model_dir):
    served = open_served(str(tiny_model_dir), [f"first={runs['first']}", f"second={runs['second']}"])
    with running(served) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def generated(model_args: list[str], *extra: str, tokens: int = TOKENS) -> str:
    """`macft generate`'s greedy completion of PROMPT (the reference every answer must equal)."""
    result = CliRunner().invoke(cli, ["generate", *model_args, "-p", PROMPT, "-n", str(tokens), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])["completion"]


@pytest.fixture(scope="module")
def references(runs, tiny_model_dir):
    """model id -> (chat answer, plain-text continuation), from `macft generate`."""
    args = {str(tiny_model_dir): ["-m", str(tiny_model_dir)], "first": ["--adapter", str(runs["first"])], "second": ["--adapter", str(runs["second"])]}
    return {name: (generated(a), generated(a, "--no-chat")) for name, a in args.items()}


def chat(client, model: str, tokens: int = TOKENS, **options):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=tokens, **options)


def streamed_chat(client, model: str, **options) -> tuple[str, list]:
    chunks = list(chat(client, model, stream=True, **options))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_lists_the_base_and_adapters(client, tiny_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [str(tiny_model_dir), "first", "second"]
    assert client.models.retrieve("first").id == "first"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("third")


def test_answers_equal_generate_with_switching_between_requests(client, server, references):
    """Chat (streamed and not) and completions for each model, in an order that switches the adapter
    on every request, equal `macft generate`; the base's weights are never reloaded."""
    base = server.served.engine.opened.loaded.model
    arrays = {k: id(v) for k, v in tree_flatten(base.parameters())}
    for model in ["first", "second", next(iter(references)), "first", "second", next(iter(references))]:
        answer, continuation = references[model]
        response = chat(client, model)
        assert response.choices[0].message.content == answer
        assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == TOKENS
        assert response.model == model and response.object == "chat.completion"
        text, chunks = streamed_chat(client, model)
        assert text == answer
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"
        completion = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=TOKENS)
        assert completion.choices[0].text == continuation
        streamed = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=TOKENS, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == continuation
    assert {k: id(v) for k, v in tree_flatten(base.parameters())} == arrays
    assert len(set(a for a, _ in references.values())) == 3  # the three models really answer differently


def test_usage_stop_strings_and_seeded_sampling(client, references):
    answer = references["first"][0]
    _, chunks = streamed_chat(client, "first", stream_options={"include_usage": True})
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == TOKENS and chunks[-1].usage.prompt_tokens > 0
    stop = answer[3:6]
    response = chat(client, "first", stop=[stop, "never there"])
    assert response.choices[0].message.content == answer[: answer.index(stop)] and response.choices[0].finish_reason == "stop"
    text, chunks = streamed_chat(client, "first", stop=stop)
    assert text == answer[: answer.index(stop)] and chunks[-1].choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model="first", messages=[{"role": "user", "content": PROMPT}], temperature=1.0, seed=7, max_tokens=TOKENS) for _ in range(2)]
    assert sampled[0].choices[0].message.content == sampled[1].choices[0].message.content


def test_stop_text_holds_back_a_possible_stop():
    cutter = StopText(("END", "xy"))
    assert cutter.feed("abcE") == ("abc", False)  # "E" may begin "END"
    assert cutter.feed("N") == ("", False)
    assert cutter.feed("x") == ("EN", False)  # not "END" after all; "x" may begin "xy"
    assert cutter.feed("yz") == ("", True)
    cutter = StopText(("END",))
    assert cutter.feed("abE") == ("ab", False) and cutter.feed("f") == ("Ef", False) and cutter.flush() == ""


def test_concurrent_requests_are_queued_not_interleaved(client, server, references):
    """Eight clients at once, on three models: each gets its own model's answer, and the model only
    ever generates for one request at a time."""
    engine = server.served.engine
    original, active, overlaps = engine.stream, [], []

    def recording(tokens, sampling):
        active.append(1)
        overlaps.append(len(active))
        try:
            yield from original(tokens, sampling)
        finally:
            active.pop()

    engine.stream = recording
    models = ["first", "second", next(iter(references))] * 3
    results: dict[int, str] = {}

    def ask(i: int, model: str) -> None:
        if i % 2:
            results[i] = chat(client, model).choices[0].message.content
        else:
            results[i] = streamed_chat(client, model)[0]

    try:
        threads = [threading.Thread(target=ask, args=(i, m)) for i, m in enumerate(models[:8])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        engine.stream = original
    assert len(results) == 8
    assert all(results[i] == references[m][0] for i, m in enumerate(models[:8]))
    assert overlaps and max(overlaps) == 1


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_bad_requests_get_openai_errors(client, server, tiny_model_dir):
    messages = [{"role": "user", "content": PROMPT}]
    cases = [
        ({"model": "nope", "messages": messages}, openai.NotFoundError, "not served here"),
        ({"model": "first", "messages": []}, openai.BadRequestError, "'messages' must be a non-empty list"),
        ({"model": "first", "messages": [{"role": "robot", "content": "x"}]}, openai.BadRequestError, "messages[0].role"),
        ({"model": "first", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, openai.BadRequestError, "only text parts"),
        ({"model": "first", "messages": messages, "temperature": "hot"}, openai.BadRequestError, "'temperature' must be a number"),
        ({"model": "first", "messages": messages, "max_tokens": 0}, openai.BadRequestError, "'max_tokens' must be at least 1"),
        ({"model": "first", "messages": messages, "n": 2}, openai.BadRequestError, "'n' must be 1"),
        ({"model": "first", "messages": messages, "stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "'stop' must be"),
        ({"model": "first", "messages": messages, "tools": [{"type": "function", "function": {"name": "f"}}]}, openai.BadRequestError, "'tools' is not supported"),
    ]
    for body, error, message in cases:
        with pytest.raises(error) as caught:
            client.chat.completions.create(**body)
        assert message in caught.value.message and caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="'prompt' must be a string"):
        client.completions.create(model="first", prompt=[1, 2, 3])
    for args, status, fragment in [
        (("POST", "/v1/chat/completions", b"{not json", {"Content-Length": "9"}), 400, "not valid JSON"),
        (("POST", "/v1/chat/completions", b"[1]", {"Content-Length": "3"}), 400, "must be a JSON object"),
        (("POST", "/v1/chat/completions", b"{}", {"Content-Length": str(1 << 30)}), 413, "above the limit"),
        (("GET", "/v1/chat/completions"), 405, "takes POST"),
        (("DELETE", "/v1/models"), 405, "not supported"),
        (("GET", "/v2/nothing"), 404, "No route"),
        (("BREW", "/v1/models"), 501, "Unsupported method"),
    ]:
        got, body = raw(server, *args)
        assert got == status and fragment in body["error"]["message"], (args, got, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
    with socket.create_connection(server.server_address[:2], timeout=30) as sock:
        sock.sendall(b"NOT AN HTTP REQUEST LINE\r\n\r\n")
        reply = sock.recv(65536)
    assert json.loads(reply.split(b"\r\n\r\n")[-1])["error"]["message"].startswith("Bad request")  # an HTTP/0.9 reply: the body alone
    assert chat(client, "first").choices[0].message.content  # still serving


def test_startup_refusals(runs, tiny_model_dir, tmp_path):
    from macft.models.random_init import build_random_model

    other = build_random_model("llama", tmp_path / "other", seed=5)
    foreign = make_run(tmp_path / "foreign", other, 3, MethodConfig(name="lora", rank=4))
    with pytest.raises(MacftError, match="was trained on .* not on the served base"):
        open_served(str(tiny_model_dir), [f"x={runs['first']}", f"y={foreign}"])
    with pytest.raises(MacftError, match="Two adapters are named 'first'"):
        open_served(str(tiny_model_dir), [str(runs["first"]), f"first={runs['second']}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(MacftError, match="no run directory there"):
        open_served(str(tiny_model_dir), [str(tmp_path / "empty")])


def test_a_peft_adapter_is_served_as_the_run_it_came_from(runs, tiny_model_dir, tmp_path, references):
    """A run exported to Hugging Face PEFT's format and served from that folder answers as the run does."""
    from macft.export.peft import export_peft

    export_peft(runs["first"], tmp_path / "peft", base=str(tiny_model_dir))
    served = open_served(str(tiny_model_dir), [f"travelled={tmp_path / 'peft'}"])
    assert served.adapters["travelled"].parent.name == "peft"  # converted once into macft's cache
    with running(served) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        assert chat(client, "travelled").choices[0].message.content == references["first"][0]


def test_serve_command_in_a_subprocess(runs, tiny_model_dir, tmp_path, references):
    """`macft serve` with a folder of runs on a free port: answers, then stops cleanly on SIGTERM;
    a taken port is one line."""
    folder = tmp_path / "runs"
    folder.mkdir()
    for name in ("first", "second"):
        (folder / name).symlink_to(runs[name], target_is_directory=True)
    env = dict(os.environ)
    command = [sys.executable, "-m", "macft.cli", "serve", "-m", str(tiny_model_dir), "--adapter", str(folder), "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        line = ""
        while "Serving" not in line and time.time() < deadline and process.poll() is None:
            line = process.stdout.readline()
        assert "Serving" in line and "127.0.0.1" in line, process.stderr.read() if process.poll() is not None else line
        url = line.split(" on ")[1].split()[0]
        served = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in served.models.list().data] == [str(tiny_model_dir), "first", "second"]
        assert chat(served, "second").choices[0].message.content == references["second"][0]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        taken = subprocess.run([*command[:-1], str(port)], capture_output=True, text=True, timeout=120, env=env)
        assert taken.returncode == 1 and f"Cannot listen on 127.0.0.1:{port}" in taken.stderr and "Traceback" not in taken.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_llama_cpp_engine_switches_lora_adapters_at_runtime(runs, tiny_model_dir, references):
    """--engine llama.cpp: one context over the base's Q8_0 GGUF, the LoRA applied at runtime; every
    greedy token is MLX's argmax within Q8_0 rounding, switching back and forth gives the same answers,
    and a DoRA adapter is refused at start."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    import mlx.core as mx
    import numpy as np

    from macft.chat import Sampling, open_model, prompt_tokens

    with pytest.raises(MacftError, match="'dora' adapter; llama.cpp switches LoRA adapters only"):
        open_served(str(tiny_model_dir), [f"second={runs['second']}"], engine="llama.cpp")
    served = open_served(str(tiny_model_dir), [f"first={runs['first']}"], engine="llama.cpp")
    base = str(tiny_model_dir)
    for model, adapter in ((base, None), ("first", runs["first"])):
        served.engine.use(served.adapter_of(model))
        ids = prompt_tokens(served.engine.tokenizer, [{"role": "user", "content": PROMPT}])
        pieces = list(served.engine.stream(ids, Sampling(max_tokens=TOKENS, temperature=0.0)))
        ours = [p.token for p in pieces][: pieces[-1].generation_tokens]
        reference = open_model(base, None) if adapter is None else open_model(None, adapter)
        logits = np.array(reference.model(mx.array(ids + ours)[None])[0, len(ids) - 1 : -1].astype(mx.float32))
        chosen = logits[np.arange(len(ours)), ours]
        assert np.all(logits.max(axis=-1) - chosen <= 0.02 * (logits.max(axis=-1) - logits.min(axis=-1)))
    with running(served) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        answers = [chat(client, model, tokens=3).choices[0].message.content for model in ("first", base, "first", base)]
    assert answers[0] == answers[2] and answers[1] == answers[3] and answers[0] != answers[1]
    assert answers[0] == generated(["--adapter", str(runs["first"])], tokens=3) and answers[1] == generated(["-m", base], tokens=3)


def test_a_client_that_leaves_stops_its_generation(client, server):
    """Closing a streamed request's connection cancels its generation; the server keeps serving."""
    engine = server.served.engine
    original, calls = engine.stream, []

    def counting(tokens, sampling):
        calls.append(0)
        for response in original(tokens, sampling):
            calls[-1] += 1
            yield response

    host, port = server.server_address[:2]
    body = json.dumps({"model": "first", "prompt": PROMPT, "max_tokens": 3000, "temperature": 0, "stream": True}).encode()
    engine.stream = counting
    try:
        connection = http.client.HTTPConnection(host, port, timeout=30)
        connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        response.close()
        connection.close()
        assert chat(client, "second").choices[0].message.content  # answered after the abandoned request stopped
    finally:
        engine.stream = original
    assert len(calls) == 2 and 0 < calls[0] < 3000
