"""``--push-to-hub`` on ``export peft``, ``export gguf`` and ``fuse`` without a Hub: the refusals (no token,
offline, unreachable, a refused token), that an unreachable Hub costs one connection and no retries, that
no token lands in any file or output, and exactly what would be uploaded (huggingface_hub's ``HfApi``
calls are replaced by recorders only for that last check: the upload itself is not exercised here)."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import HfApi, constants

from macft.cli import cli

SECRET = "hf_macftTestTokenNeverWritten0123456789"


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory) -> Path:
    """A real two-step LoRA run with validation data (so its card has data and metrics)."""
    root = tmp_path_factory.mktemp("hub-run")
    data = root / "data"
    data.mkdir()
    rows = [{"prompt": f"Q: {i} plus one?", "completion": f" {i + 1}"} for i in range(24)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:18]))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[18:]))
    args = ("lora", "--model", tiny_model_dir, "--data", data, "--iters", 2, "--rank", 4, "--out-dir", root, "--name", "run", "--set", "demo.count=0", "--json")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.fixture
def online(monkeypatch, tmp_path):
    """The session runs with HF_HUB_OFFLINE=1 (conftest); these tests lift it, with a token and no token file."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


def one_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def test_without_a_token_each_command_says_how_to_log_in_before_any_work(run, online, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    for args, out in (
        (("export", "peft", "--adapter", run, "--out", tmp_path / "p"), tmp_path / "p"),
        (("export", "gguf", "--adapter", run, "--quant", "q8_0", "--out", tmp_path / "m.gguf"), tmp_path / "m.gguf"),
        (("fuse", "--adapter", run, "--out", tmp_path / "f"), tmp_path / "f"),
    ):
        line = one_line(invoke(*args, "--push-to-hub", "me/tiny"))
        assert "Not logged in" in line and "hf auth login" in line and not out.exists()


def test_offline_and_bad_repo_ids_are_one_line(run, online, monkeypatch, tmp_path):
    assert "not a Hugging Face repo id" in one_line(invoke("export", "peft", "--adapter", run, "--push-to-hub", "me/not/a/repo"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE is set" in one_line(invoke("fuse", "--adapter", run, "--out", tmp_path / "f", "--push-to-hub", "me/tiny"))
    assert not (tmp_path / "f").exists()


class Server:
    """A loopback HTTP server that records each request's first line and answers ``reply`` (or closes without answering)."""

    def __init__(self, reply: bytes | None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.reply, self.requests, self.stop = reply, [], threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    self.requests.append(conn.recv(65536).split(b"\r\n")[0].decode())
                    if self.reply is not None:
                        conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.mark.parametrize("reply, expected", [
    (None, "Could not reach the Hugging Face Hub"),
    (b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}", "refused the token"),
])  # fmt: skip
def test_an_unreachable_or_refusing_hub_costs_one_request_and_no_token_is_written(run, online, monkeypatch, tmp_path, isolated_home, reply, expected):
    server = Server(reply)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    try:
        result = invoke("export", "peft", "--adapter", run, "--out", tmp_path / "peft", "--push-to-hub", "me/tiny")
    finally:
        server.close()
    assert expected in one_line(result)
    # one request of macft's, no retry storm (huggingface_hub's own once-a-day registry fetch may precede it)
    # (the reachability probe before it is a bare TCP connection, which sends no request line)
    assert [r for r in server.requests if r and "agent-harnesses" not in r] == ["GET /api/whoami-v2 HTTP/1.1"]
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()  # what was exported stays
    assert SECRET not in result.output
    for folder in (run, tmp_path, isolated_home):
        for path in Path(folder).rglob("*"):
            assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_what_each_command_uploads(run, online, monkeypatch, tmp_path):
    uploads = []

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, **_):
        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        uploads.append({"repo": repo_id, "files": files, "token": self.token})

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    server = Server(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 14\r\nConnection: close\r\n\r\n{\"name\": \"me\"}")
    monkeypatch.setattr(constants, "ENDPOINT", server.url)  # the token check is a real request, answered on loopback
    try:
        peft = invoke("export", "peft", "--adapter", run, "--out", tmp_path / "peft", "--base", "someone/tiny-base", "--push-to-hub", "me/tiny-peft")
        fused = invoke("fuse", "--adapter", run, "--out", tmp_path / "fused", "--push-to-hub", "me/tiny-fused")
        gguf = invoke("export", "gguf", "--adapter", run, "--quant", "q8_0", "--out", tmp_path / "tiny.gguf", "--fidelity", 0, "--push-to-hub", "me/tiny-gguf")
    finally:
        server.close()
    for result in (peft, fused, gguf):
        assert result.exit_code == 0, result.output
    assert "Pushed to https://huggingface.co/me/tiny-peft" in peft.output

    by_repo = {u["repo"]: u for u in uploads}
    assert set(by_repo["me/tiny-peft"]["files"]) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert set(by_repo["me/tiny-gguf"]["files"]) == {"tiny.gguf", "README.md"}
    fused_files = set(by_repo["me/tiny-fused"]["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= fused_files
    assert not any(name.startswith("macft_") or name.startswith(".") for name in fused_files)  # records hold local paths
    assert all(u["token"] == SECRET for u in uploads)  # huggingface_hub's token, in memory
    for upload in uploads:
        for content in upload["files"].values():
            assert SECRET.encode() not in content

    card = by_repo["me/tiny-peft"]["files"]["README.md"].decode()
    assert card.startswith("---\nbase_model: someone/tiny-base\nlibrary_name: peft\n")
    config = json.loads((run / "adapter_config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert f"(lora, rank {config['rank']}, alpha {config['alpha']}" in card  # method
    assert "- train: train.jsonl" in card and "- valid: valid.jsonl" in card and "- 18 training examples" in card  # data
    assert f"| best val loss | {summary['best_val_loss']:.4g} |" in card and "| steps | 2 |" in card  # metrics
    assert 'PeftModel.from_pretrained(base, "me/tiny-peft")' in card
    gguf_card = by_repo["me/tiny-gguf"]["files"]["README.md"].decode()
    assert "library_name: gguf" in gguf_card and "llama-cli -hf me/tiny-gguf" in gguf_card and "| steps | 2 |" in gguf_card
