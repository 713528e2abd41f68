"""The tokenizer cache: the cached tokenizer is mlx-lm's, built once per tokenizer, and a changed file or a
damaged cache entry never serves a stale one."""

from __future__ import annotations

import shutil

import mlx_lm.utils
import pytest

from macft.models.tokenizer_cache import cache_key, load_tokenizer

TEXTS = ["Hello, world!", "SELECT name FROM t WHERE id = 3", "  spaces\tand\nnewlines ünïcödé 漢字", ""]


@pytest.fixture
def counted(monkeypatch):
    """How many times mlx-lm built a tokenizer (parsing its files)."""
    calls = []
    original = mlx_lm.utils.load_tokenizer

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(mlx_lm.utils, "load_tokenizer", counting)
    return calls, original


def same_behaviour(a, b) -> None:
    for text in TEXTS:
        assert a.encode(text) == b.encode(text)
        assert a.decode(a.encode(text)) == b.decode(b.encode(text))
    assert a.eos_token_ids == b.eos_token_ids
    assert a.bos_token == b.bos_token and a.vocab_size == b.vocab_size
    assert type(a.detokenizer) is type(b.detokenizer)
    messages = [{"role": "user", "content": "hi"}]
    assert a.apply_chat_template(messages, tokenize=False) == b.apply_chat_template(messages, tokenize=False)


def test_second_load_comes_from_the_cache_and_behaves_like_mlx_lm(tiny_model_dir, tmp_path, monkeypatch, counted):
    monkeypatch.setenv("MACFT_HOME", str(tmp_path / "home"))
    counted, mlx_lm_load = counted
    first = load_tokenizer(tiny_model_dir, eos_token_ids=[2])
    second = load_tokenizer(tiny_model_dir, eos_token_ids=[2])
    assert len(counted) == 1  # the files were parsed once
    assert len(list((tmp_path / "home" / "tokenizers").glob("*.npz"))) == 1
    same_behaviour(second, mlx_lm_load(tiny_model_dir, eos_token_ids=[2]))
    same_behaviour(first, second)
    load_tokenizer(tiny_model_dir, eos_token_ids=[1])  # other EOS ids: another entry
    assert len(counted) == 2


def test_a_changed_tokenizer_file_is_not_served_from_the_cache(tiny_model_dir, tmp_path, monkeypatch, counted):
    monkeypatch.setenv("MACFT_HOME", str(tmp_path / "home"))
    counted, _ = counted
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    before = load_tokenizer(model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    after = load_tokenizer(model)
    assert len(counted) == 2
    messages = [{"role": "user", "content": "hi"}]
    assert after.apply_chat_template(messages, tokenize=False) == "<<hi>>"
    assert before.apply_chat_template(messages, tokenize=False) != "<<hi>>"


def test_a_damaged_cache_entry_is_rebuilt(tiny_model_dir, tmp_path, monkeypatch, counted):
    monkeypatch.setenv("MACFT_HOME", str(tmp_path / "home"))
    counted, _ = counted
    load_tokenizer(tiny_model_dir)
    entry = tmp_path / "home" / "tokenizers" / f"{cache_key(tiny_model_dir, None)}.npz"
    entry.write_bytes(entry.read_bytes()[:100])  # a truncated file
    rebuilt = load_tokenizer(tiny_model_dir)
    assert len(counted) == 2
    same_behaviour(rebuilt, load_tokenizer(tiny_model_dir))
    assert len(counted) == 2  # and the rewritten entry serves the next load
