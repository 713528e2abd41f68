"""The cache of tokenized data files: a rerun on the same files gets exactly the examples the tokenizer
gives, without loading the tokenizer; a change to the data, the tokenizer, its template or the encoding
options tokenizes again, and a damaged entry is encoded again."""

from __future__ import annotations

import json
import shutil

import pytest
from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

import macft.models.tokenizer_cache as tokenizer_cache
from macft.config import DataConfig, Recipe
from macft.data import load_splits
from macft.errors import MacftError
from macft.models.load import model_tokenizer
from macft.paths import cache_dir
from macft.train.run import run_training

ROWS = [
    {"text": "SELECT name FROM t WHERE id = 3"},
    {"text": "  spaces\tand\nnewlines ünïcödé 漢字"},
    {"prompt": "Q: what is 2 plus 2?", "completion": " 4"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
    {"instruction": "Add one.", "input": "41", "output": "42"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def loads(tmp_path, monkeypatch):
    """A fresh macft home, and the model folders whose tokenizer was loaded (from files or macft's cache)."""
    monkeypatch.setenv("MACFT_HOME", str(tmp_path / "home"))
    calls = []
    original = tokenizer_cache.load_tokenizer

    def counting(model_dir, *args, **kwargs):
        calls.append(model_dir)
        return original(model_dir, *args, **kwargs)

    monkeypatch.setattr(tokenizer_cache, "load_tokenizer", counting)
    return calls


@pytest.fixture
def model(tiny_model_dir, tmp_path):
    """A copy of the tiny model, whose tokenizer files a test may change."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS * 2)
    write_jsonl(folder / "valid.jsonl", ROWS[:3])
    write_jsonl(folder / "test.jsonl", ROWS[3:])
    return folder


def lazy(model):
    return model_tokenizer(model, json.loads((model / "config.json").read_text()))


def uncached(cfg, model):
    """The splits straight from mlx-lm's tokenizer, no macft cache on the way."""
    eos = json.loads((model / "config.json").read_text()).get("eos_token_id")
    return load_splits(cfg, mlx_lm_load_tokenizer(model, eos_token_ids=eos))


def assert_same(a, b):
    for name in ("train", "valid", "test"):
        assert getattr(a, name) == getattr(b, name)  # tokens, mask, source and format of every example
    assert (a.truncated, a.dropped, a.files) == (b.truncated, b.dropped, b.files)


def test_a_rerun_gets_the_same_examples_without_loading_the_tokenizer(model, data, loads):
    cfg = DataConfig(train=str(data), max_seq_length=64)
    first = load_splits(cfg, lazy(model))
    assert len(loads) == 1
    again = load_splits(cfg, lazy(model))
    assert len(loads) == 1  # every file came from the cache
    reference = uncached(cfg, model)
    assert_same(first, reference)
    assert_same(again, reference)
    tokenizer = mlx_lm_load_tokenizer(model)
    assert again.train[0].tokens == tokenizer.encode(ROWS[0]["text"]) + [tokenizer.eos_token_id]
    assert again.counts == {"train": 10, "valid": 3, "test": 2}

    # Truncation and hold-out run after the cache: other lengths and splits need no new tokens.
    for other in (DataConfig(train=str(data), max_seq_length=6), DataConfig(train=str(data / "train.jsonl"), split_valid=0.3)):
        assert_same(load_splits(other, lazy(model)), uncached(other, model))
    assert len(loads) == 1
    assert load_splits(DataConfig(train=str(data), max_seq_length=6), lazy(model)).truncated["train"] > 0


def edit_data(model, data, cfg):
    rows = ROWS * 2
    rows[1] = {"text": "  spaces\tand\nnewlines ünïcödé 漢"}  # one character less
    write_jsonl(data / "train.jsonl", rows)
    return cfg


def rename_data(model, data, cfg):
    (data / "train.jsonl").rename(data / "other.jsonl")  # the same bytes under another name
    return DataConfig(train=str(data / "other.jsonl"), valid=str(data / "valid.jsonl"), max_seq_length=64)


def edit_template(model, data, cfg):
    (model / "chat_template.jinja").write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    return cfg


def edit_eos(model, data, cfg):
    config = json.loads((model / "config.json").read_text())
    config["eos_token_id"] = 5
    (model / "config.json").write_text(json.dumps(config))
    return cfg


def no_template(model, data, cfg):
    return DataConfig(train=str(data), max_seq_length=64, use_chat_template=False)


def unmasked(model, data, cfg):
    return DataConfig(train=str(data), max_seq_length=64, mask_prompt=False)


@pytest.mark.parametrize("change", [edit_data, rename_data, edit_template, edit_eos, no_template, unmasked])
def test_any_change_that_can_change_tokens_tokenizes_again(model, data, loads, change):
    cfg = DataConfig(train=str(data), max_seq_length=64)
    before = load_splits(cfg, lazy(model))
    cfg = change(model, data, cfg)
    if change is no_template:  # chat rows need a template: keep the rows that do not
        write_jsonl(data / "train.jsonl", [r for r in ROWS if "messages" not in r])
        (data / "valid.jsonl").unlink()
        (data / "test.jsonl").unlink()
    after = load_splits(cfg, lazy(model))
    assert len(loads) == 2
    assert_same(after, uncached(cfg, model))
    if change is not edit_eos:  # the EOS ids generation stops at; training ends examples with the tokenizer's own
        assert after.train != before.train or after.files != before.files


def test_a_damaged_entry_is_encoded_again(model, data, loads, tmp_path):
    cfg = DataConfig(train=str(data), max_seq_length=64)
    first = load_splits(cfg, lazy(model))
    entries = sorted((tmp_path / "home" / "tokenized").glob("*.npz"))
    assert len(entries) == 3  # train, valid, test
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:20])
    assert_same(load_splits(cfg, lazy(model)), first)
    assert len(loads) == 2
    assert_same(load_splits(cfg, lazy(model)), first)  # rewritten
    assert len(loads) == 2


def test_a_rerun_trains_the_same_steps_and_never_loads_the_tokenizer(tiny_model_dir, tmp_path, loads):
    folder = tmp_path / "qa"
    folder.mkdir()
    rows = [{"prompt": f"Q: {i} plus one?", "completion": f" {i + 1}"} for i in range(24)]
    write_jsonl(folder / "train.jsonl", rows[:20])
    write_jsonl(folder / "valid.jsonl", rows[20:])
    recipe = Recipe(name="t").replace(
        model={"path": str(tiny_model_dir)},
        data={"train": str(folder), "max_seq_length": 64},
        method={"rank": 4, "dropout": 0.0},
        train={"iters": 3, "batch_size": 4, "learning_rate": 1e-2, "report_every": 1, "eval_every": 3, "save_every": 3},
        output={"runs_dir": str(tmp_path / "runs")},
    )
    first = run_training(recipe.replace(output={"name": "first"}))
    assert len(loads) == 1
    again = run_training(recipe.replace(output={"name": "again"}))
    assert len(loads) == 1  # neither training nor saving needed it

    def losses(run_dir):
        return [(r["kind"], r.get("train_loss"), r.get("val_loss")) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]

    assert losses(again.run_dir) == losses(first.run_dir)
    assert again.tokenizer.encode("Q: 1 plus one?") == mlx_lm_load_tokenizer(tiny_model_dir).encode("Q: 1 plus one?")
    assert len(loads) == 2  # asked for, it loads


def test_tokenizer_files_changed_before_the_tokenizer_loads_are_refused(model, data, loads):
    tokenizer = lazy(model)  # its key is taken now
    (model / "chat_template.jinja").write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    with pytest.raises(MacftError, match="changed while macft was running"):
        load_splits(DataConfig(train=str(data)), tokenizer)
    assert list(cache_dir("tokenized").glob("*.npz")) == []


def test_caches_keep_the_most_recently_used_entries_within_their_budget(tmp_path, monkeypatch):
    """Writing an entry deletes the least recently used ones (a read counts as a use) until the folder
    fits its budget; the new entry and writes in progress stay."""
    import os

    import macft.data.token_cache as token_cache
    from macft.data.templates import Example
    from macft.paths import prune_cache

    folder = tmp_path / "cache"
    folder.mkdir()
    for name, when in (("old", 1000), ("older", 500), ("recent", 3000), (".writing.tmp", 10)):
        (folder / name).write_bytes(b"x" * 100)
        os.utime(folder / name, (when, when))
    (folder / "new").write_bytes(b"x" * 100)
    prune_cache(folder, 250, keep=folder / "new")
    assert sorted(p.name for p in folder.iterdir()) == [".writing.tmp", "new", "recent"]

    monkeypatch.setenv("MACFT_HOME", str(tmp_path / "home"))
    files = [write_jsonl(tmp_path / f"{i}.jsonl", [{"text": "t" * 50 * (3 - i)}]) for i in range(3)]  # shrinking entries

    def encode(path):
        return [Example(list(range(len(path.read_text()))), [True] * len(path.read_text()), f"{path.name}:1", "text")]

    entries = cache_dir("tokenized")
    token_cache.cached_examples(files[0], "k", {}, encode)
    token_cache.cached_examples(files[1], "k", {}, encode)
    first, second = (entries / f"{token_cache.entry_key(f, 'k', {})}.npz" for f in files[:2])
    os.utime(first, (1000, 1000))
    os.utime(second, (2000, 2000))
    token_cache.cached_examples(files[0], "k", {}, encode)  # a read: the first entry is now the recent one
    monkeypatch.setattr(token_cache, "CACHE_BYTES", first.stat().st_size + second.stat().st_size + 10)
    token_cache.cached_examples(files[2], "k", {}, encode)
    assert first.exists() and not second.exists() and len(list(entries.iterdir())) == 2
