"""`macft generate` and `macft chat` on a tiny model, checked against mlx-lm's own greedy generation."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.generate import generate as mlx_generate

from macft.chat import ChatSession, Sampling, open_model, parse, set_adapter
from macft.cli import cli
from macft.config import MethodConfig, Recipe, save_recipe
from macft.errors import MacftError
from macft.adapters.files import load_adapter, save_adapter
from macft.methods import apply_method
from macft.models.load import load_model

PROMPT = "The quick brown fox"


def make_run(run_dir, model_dir, seed: int, method: MethodConfig):
    """A run directory as `macft lora` leaves it, with random (non-zero) adapter weights."""
    loaded = load_model(str(model_dir))
    model = apply_method(loaded.model, method)
    mx.random.seed(seed)
    trainable = tree_flatten(model.trainable_parameters())
    model.load_weights([(k, 0.5 * mx.random.normal(v.shape).astype(v.dtype)) for k, v in trainable], strict=False)
    recipe = Recipe().replace(model={"path": str(model_dir)}, method=method)
    save_adapter(model, run_dir, recipe.method, loaded.identity, recipe.model.recorded)
    save_recipe(recipe, run_dir / "recipe.yaml")
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("runs")
    first = make_run(root / "first", tiny_model_dir, 1, MethodConfig(name="lora", rank=4))
    second = make_run(root / "second", tiny_model_dir, 2, MethodConfig(name="lora", rank=2, target_modules=("v_proj", "down_proj")))
    return first, second


def reference(model_dir, adapter, prompt_ids, max_tokens=12) -> str:
    """Greedy text from a freshly loaded model (plus adapter) through mlx_lm.generate."""
    loaded = load_model(str(model_dir))
    model = load_adapter(loaded.model, adapter)[0] if adapter else loaded.model
    return mlx_generate(model, loaded.tokenizer, prompt_ids, max_tokens=max_tokens)


def chat_ids(tokenizer, text, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def test_generate_json_matches_mlx_lm(tiny_model_dir):
    runner = CliRunner()
    result = runner.invoke(cli, ["generate", "-m", str(tiny_model_dir), "-p", PROMPT, "-n", "12", "--no-chat", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert set(data) == {"prompt", "completion", "tokens", "tokens_per_second"}
    tokenizer = load_model(str(tiny_model_dir)).tokenizer
    assert data["completion"] == reference(tiny_model_dir, None, tokenizer.encode(PROMPT))
    assert data["prompt"] == PROMPT and 0 < data["tokens"] <= 12 and data["tokens_per_second"] > 0
    streamed = runner.invoke(cli, ["generate", "-m", str(tiny_model_dir), "-p", PROMPT, "-n", "12", "--no-chat"])
    assert streamed.exit_code == 0 and streamed.output.startswith(data["completion"])


def test_generate_with_adapter_finds_its_base(tiny_model_dir, runs):
    first, _ = runs
    runner = CliRunner()
    result = runner.invoke(cli, ["generate", "--adapter", str(first), "-p", PROMPT, "-n", "12", "--json"])
    assert result.exit_code == 0, result.output
    tokenizer = load_model(str(tiny_model_dir)).tokenizer
    tuned = reference(tiny_model_dir, first, chat_ids(tokenizer, PROMPT))
    assert json.loads(result.output.strip().splitlines()[-1])["completion"] == tuned
    assert tuned != reference(tiny_model_dir, None, chat_ids(tokenizer, PROMPT))  # the adapter changes the output


def test_adapter_swap_keeps_the_base_weights(tiny_model_dir, runs):
    first, second = runs
    opened = open_model(str(tiny_model_dir))
    base = opened.loaded.model
    weights_before = {k: id(v) for k, v in tree_flatten(base.parameters())}
    tokens = mx.array([chat_ids(opened.tokenizer, PROMPT)])

    def logits(model):
        return model(tokens)[0, -1]

    for adapter in (first, second, None, first):
        set_adapter(opened, adapter)
        fresh = load_model(str(tiny_model_dir)).model
        expected = logits(load_adapter(fresh, adapter)[0] if adapter else fresh)
        assert mx.allclose(logits(opened.model), expected, atol=1e-5).item()
    # The adapters were swapped on the same base arrays: nothing was reloaded.
    set_adapter(opened, None)
    assert {k: id(v) for k, v in tree_flatten(base.parameters())} == weights_before


def test_chat_repl_reset_compare_adapter_quit(tiny_model_dir, runs, tmp_path):
    first, second = runs
    tokenizer = load_model(str(tiny_model_dir)).tokenizer
    script = "\n".join([PROMPT, "/compare", "/help", "/reset", "/adapter " + str(second), "/adapter " + str(tmp_path / "missing"), PROMPT, "/adapter none", "/compare", "/bogus", "/quit", "never sent"]) + "\n"
    result = CliRunner().invoke(
        cli, ["chat", "--adapter", str(first), "--temperature", "0", "-n", "10", "--system", "Be brief."], input=script
    )
    assert result.exit_code == 0, result.output
    ids = chat_ids(tokenizer, PROMPT, system="Be brief.")
    tuned_first = reference(tiny_model_dir, first, ids, 10)
    tuned_second = reference(tiny_model_dir, second, ids, 10)
    base = reference(tiny_model_dir, None, ids, 10)
    out = result.output
    assert tuned_first in out and tuned_second in out
    assert f"--- base ---\n{base}\n--- tuned ---\n{tuned_first}" in out  # /compare, plain rendering off-terminal
    assert "/adapter PATH" in out and "(new conversation)" in out
    assert "No adapter is loaded" in out and "Unknown command /bogus" in out
    assert "No adapter weights at" in out  # a bad /adapter path keeps the adapter in use
    assert out.count(">>> ") == 11  # stopped at /quit


def test_chat_history_goes_through_the_template(tiny_model_dir):
    opened = open_model(str(tiny_model_dir))
    session = ChatSession(opened, sampling=Sampling(max_tokens=6))
    first = "".join(session.reply("Hello"))
    second = "".join(session.reply("Thank you"))
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "Thank you"},
    ]
    ids = opened.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert second == mlx_generate(opened.model, opened.tokenizer, ids, max_tokens=6)


def test_parse_commands():
    assert parse("  hi there ").argument == "hi there"
    assert (parse("/adapter runs/x").name, parse("/adapter runs/x").argument) == ("adapter", "runs/x")
    assert parse("/exit").name == "quit"
    with pytest.raises(MacftError):
        parse("/nope")


def test_a_changed_base_is_refused_by_chat_generate_eval_and_fuse(tiny_model_dir, tmp_path):
    """Every command that loads a run's base checks the weights' sha256 recorded with the adapter."""
    import shutil

    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    run = make_run(tmp_path / "run", base, 3, MethodConfig(name="lora", rank=2))
    assert open_model(None, run).adapter is not None  # the recorded base loads
    weights = mx.load(str(base / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2  # the same file name, other weights
    mx.save_safetensors(str(base / "model.safetensors"), weights, metadata={"format": "mlx"})
    runner = CliRunner()
    for args in (["generate", "-p", PROMPT, "-n", "2"], ["eval", "--data", str(base / "data.jsonl")], ["fuse"]):
        if args[0] == "eval":
            (base / "data.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
        result = runner.invoke(cli, [*args, "--adapter", str(run)])
        assert result.exit_code == 1 and "not the one the adapter" in result.output, (args, result.output)
    assert open_model(str(base), run).adapter is not None  # an explicit --model is the user's choice
