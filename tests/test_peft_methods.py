"""Prompt tuning, P-tuning, prefix tuning and bottleneck adapters on tiny models of every family.

The references are independent of the code under test: the frozen base model itself (a soft
prompt or prefix initialised from text must behave exactly like the base model reading that
text first; zero-initialised adapters must not change a single logit), mlx-lm's own cached and
batched generation against full forward passes, plain against checkpointed gradients, and the
parameters before and after training, saving, resuming and switching the method off.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.generate import batch_generate, generate, generate_step
from mlx_lm.models.cache import KVCache, make_prompt_cache

from macft.config import MethodConfig, Recipe, TrainConfig, load_recipe
from macft.data import Example, iterate_batches, packing_cache
from macft.errors import MacftError
from macft.families import lookup
from macft.adapters.files import load_adapter, save_adapter
from macft.methods import adapters_disabled, apply_method, fuse_model
from macft.methods.prompt import virtual_token_ids
from macft.models.load import load_model
from macft.models.random_init import CORPUS
from macft.train.loop import enable_grad_checkpoint, evaluate, train
from macft.objectives.sft import SupervisedLoss

TEXT = "The quick brown fox jumps over the lazy dog."
INIT_TEXT = "SELECT name FROM users"
PEFT = ("prompt", "ptuning", "prefix", "adapter")
LEARNING_RATES = {"prompt": 3e-2, "ptuning": 1e-2, "prefix": 3e-2, "adapter": 1e-2}


def method(name: str, **options) -> MethodConfig:
    defaults = {"num_virtual_tokens": 5, "prefix_length": 5, "adapter_size": 8, "adapter_placement": "both"}
    return MethodConfig(name=name, **{**defaults, **options})


def skip_refused(loaded, name: str) -> None:
    """Families whose blocks these methods cannot wrap refuse them (test_family_gemma4.py, test_qwen3_5.py check how)."""
    if name in lookup(loaded.config["model_type"]).refused_methods:
        pytest.skip(f"{loaded.family} refuses {name}")


def tokens(loaded, text: str = TEXT) -> mx.array:
    return mx.array([loaded.tokenizer.encode(text)])


def perturbed(model, seed: int = 0):
    """Move every trainable parameter away from its (base-equivalent) initial value."""
    key = mx.random.key(seed)
    model.update(tree_map(lambda p: p + 0.2 * mx.random.normal(p.shape, key=key).astype(p.dtype), model.trainable_parameters()))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("name", ["prompt", "ptuning"])
def test_soft_prompt_from_text_reads_like_the_text(family_model_dir, name):
    loaded = load_model(str(family_model_dir))
    skip_refused(loaded, name)
    x = tokens(loaded)
    ids = loaded.tokenizer.encode(INIT_TEXT, add_special_tokens=False)[:5]
    reference = loaded.model(mx.concatenate([mx.array([ids]), x], axis=1))[:, len(ids) :]
    model = apply_method(loaded.model, method(name, num_virtual_tokens=len(ids), init_text=INIT_TEXT), loaded.tokenizer)
    assert mx.allclose(model(x), reference, atol=1e-5).item()


def test_prefix_from_text_reads_like_the_text(family_model_dir):
    loaded = load_model(str(family_model_dir))
    skip_refused(loaded, "prefix")
    x = mx.concatenate([tokens(loaded)] * 2)  # batch of 2: the prefix is broadcast
    ids = loaded.tokenizer.encode(INIT_TEXT, add_special_tokens=False)[:5]
    reference = loaded.model(mx.concatenate([mx.array([ids] * 2), x], axis=1))[:, len(ids) :]
    model = apply_method(loaded.model, method("prefix", prefix_length=len(ids), init_text=INIT_TEXT), loaded.tokenizer)
    assert mx.allclose(model(x), reference, atol=1e-5).item()


def test_virtual_tokens_repeat_the_init_text(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    ids = loaded.tokenizer.encode("SELECT name", add_special_tokens=False)
    count = 2 * len(ids) + 1
    assert virtual_token_ids(loaded.tokenizer, "SELECT name", count, 100) == (ids * 3)[:count]


@pytest.mark.parametrize(
    "config",
    [method("prompt", num_virtual_tokens=0), method("ptuning", num_virtual_tokens=0)]
    + [method("adapter", adapter_placement=p) for p in ("mlp", "attention", "both")],
    ids=["prompt-0", "ptuning-0", "adapter-mlp", "adapter-attention", "adapter-both"],
)
def test_identity_initialisations_leave_logits_unchanged(family_model_dir, config):
    loaded = load_model(str(family_model_dir))
    skip_refused(loaded, config.name)
    x = tokens(loaded)
    reference = loaded.model(x)
    model = apply_method(loaded.model, config, loaded.tokenizer)
    assert mx.array_equal(model(x), reference).item()


@pytest.mark.parametrize("name", PEFT)
def test_cached_generation_matches_full_forward(family_model_dir, name):
    """mlx-lm's generation (KV cache, prefill then one token at a time) sees the same model as a
    forward pass without a cache, at every generated position."""
    loaded = load_model(str(family_model_dir))
    skip_refused(loaded, name)
    model = perturbed(apply_method(loaded.model, method(name), loaded.tokenizer))
    prompt = tokens(loaded)[0]
    steps = list(zip(range(6), generate_step(prompt, model, sampler=lambda lp: mx.argmax(lp, axis=-1))))
    generated = [int(token) for _, (token, _) in steps]
    full = model(mx.concatenate([prompt, mx.array(generated)])[None])[0]
    for i, (_, (_, logprobs)) in enumerate(steps):
        expected = full[len(prompt) - 1 + i]
        assert mx.allclose(logprobs, expected - mx.logsumexp(expected), atol=1e-4).item(), f"step {i}"


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: batched rotating caches
@pytest.mark.parametrize("name", ["prompt", "ptuning", "prefix"])
def test_batched_generation_matches_greedy_forward(tiny_models, family, name):
    """mlx-lm's batch_generate (right-padded prompts of different lengths) continues each prompt
    exactly as greedy decoding with full forward passes does."""
    loaded = load_model(str(tiny_models[family]))
    model = perturbed(apply_method(loaded.model, method(name), loaded.tokenizer))
    prompts = [loaded.tokenizer.encode(t) for t in ("The quick brown fox", "Q: What is 2 plus 2? A:", "SELECT name")]
    texts = batch_generate(model, loaded.tokenizer, prompts, max_tokens=6).texts
    for prompt, text in zip(prompts, texts):
        sequence = list(prompt)
        for _ in range(6):
            sequence.append(int(mx.argmax(model(mx.array([sequence]))[0, -1])))
        assert text == loaded.tokenizer.decode(sequence[len(prompt) :])


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_an_empty_hand_made_cache_gets_the_virtual_tokens(tiny_model_dir, name):
    loaded = load_model(str(tiny_model_dir))
    model = perturbed(apply_method(loaded.model, method(name), loaded.tokenizer))
    x = tokens(loaded)
    cache = [KVCache() for _ in model.layers]
    model(x[:, :-1], cache=cache)
    assert mx.allclose(model(x[:, -1:], cache=cache)[0, -1], model(x)[0, -1], atol=1e-5).item()


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_cache_across_gemma_sliding_window(tiny_models, name):
    """Past the sliding window (32 positions in the tiny Gemma) the rotating cache drops old
    positions, virtual ones included, exactly as the full forward's window mask does."""
    loaded = load_model(str(tiny_models["gemma3"]))
    model = perturbed(apply_method(loaded.model, method(name), loaded.tokenizer))
    x = tokens(loaded, TEXT * 4)
    assert x.shape[1] > 40
    full = model(x)
    cache = make_prompt_cache(model)
    model(x[:, :20], cache=cache)
    for i in range(20, x.shape[1]):
        step = model(x[:, i : i + 1], cache=cache)
        assert mx.allclose(step[0, -1], full[0, i], atol=1e-4).item(), f"position {i}"


@pytest.mark.parametrize("name", PEFT)
def test_save_load_roundtrip_and_fuse_refusal(tiny_models, tmp_path, name):
    loaded = load_model(str(tiny_models["qwen2"]))  # tied embeddings: the head is the base table
    recipe = Recipe().replace(method=dict(vars(method(name, init_text=INIT_TEXT))))
    model = perturbed(apply_method(loaded.model, recipe.method, loaded.tokenizer))
    x = tokens(loaded)
    before = model(x)
    save_adapter(model, tmp_path, recipe.method, loaded.identity, recipe.model.recorded)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == name

    reloaded, config = load_adapter(load_model(str(tiny_models["qwen2"])).model, tmp_path)
    assert mx.array_equal(reloaded(x), before).item()
    with pytest.raises(MacftError, match="cannot be merged|nothing to merge"):
        fuse_model(reloaded)


@pytest.mark.parametrize("name", PEFT)
def test_adapters_disabled_is_the_base_model(tiny_model_dir, name):
    """The run's base-vs-tuned demo switches the method off and generates in batches."""
    loaded = load_model(str(tiny_model_dir))
    x = tokens(loaded)
    reference = loaded.model(x)
    prompts = [loaded.tokenizer.encode(t) for t in ("The quick brown fox", "SELECT name")]
    base_texts = batch_generate(loaded.model, loaded.tokenizer, prompts, max_tokens=5).texts
    model = perturbed(apply_method(loaded.model, method(name), loaded.tokenizer))
    assert not mx.allclose(model(x), reference).item()
    with adapters_disabled(model):
        assert mx.array_equal(model(x), reference).item()
        assert batch_generate(model, loaded.tokenizer, prompts, max_tokens=5).texts == base_texts


@pytest.mark.parametrize("name", PEFT)
def test_only_the_method_parameters_are_new_and_trainable(tiny_model_dir, name):
    loaded = load_model(str(tiny_model_dir))
    base_names = {k for k, _ in tree_flatten(loaded.model.parameters())}
    model = apply_method(loaded.model, method(name), loaded.tokenizer)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable and not trainable & base_names
    if name != "adapter":  # prompt/prefix leave every base weight under its own name
        assert base_names <= {k for k, _ in tree_flatten(model.parameters())}


def test_packing_is_refused_for_virtual_tokens(tiny_model_dir):
    with pytest.raises(MacftError, match="data.packing"):
        load_recipe(None, overrides=["method.name=prefix", "data.packing=true"])
    loaded = load_model(str(tiny_model_dir))
    model = apply_method(loaded.model, method("prompt"), loaded.tokenizer)
    x = tokens(loaded)
    with pytest.raises(MacftError, match="data.packing"):
        model(x, cache=packing_cache(model, mx.ones(x.shape, mx.int32)))


def test_prefix_longer_than_the_sliding_window_is_refused(tiny_models):
    loaded = load_model(str(tiny_models["gemma3"]))
    with pytest.raises(MacftError, match="sliding window"):
        apply_method(loaded.model, method("prefix", prefix_length=32), loaded.tokenizer)


def corpus_examples(tokenizer) -> list[Example]:
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    return [Example(tokens=ids, mask=[True] * len(ids)) for ids in (tokenizer.encode(line) for line in lines)]


def frozen_parameters(model) -> dict[str, mx.array]:
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    return {k: mx.array(v) for k, v in tree_flatten(model.parameters()) if k not in trainable}


@pytest.mark.parametrize("name", PEFT)
def test_training_lowers_the_loss_and_leaves_the_base_alone(family_model_dir, name):
    """A few steps of the real training loop (compiled step, chunked loss)."""
    loaded = load_model(str(family_model_dir))
    skip_refused(loaded, name)
    model = apply_method(loaded.model, method(name, init_text=INIT_TEXT), loaded.tokenizer)
    examples = corpus_examples(loaded.tokenizer)
    loss_fn = SupervisedLoss(64)
    def batches(epoch: int, start: int):
        return iterate_batches(examples, 4, 64, seed=0, epoch=epoch, start=start, loop=True)

    def every():
        return iterate_batches(examples, 4, 64, seed=0)

    frozen = frozen_parameters(model)
    initial = evaluate(model, every(), loss_fn)

    config = TrainConfig(
        iters=8, batch_size=4, learning_rate=LEARNING_RATES[name], lr_schedule="constant", eval_every=0, save_every=0
    )
    result = train(model, optim.Adam(learning_rate=config.learning_rate), batches, None, loss_fn, config)

    assert result.stop_reason == "finished" and result.compiled, result.compile_note
    assert evaluate(model, every(), loss_fn) < initial - 0.05
    after = dict(tree_flatten(model.parameters()))
    assert all(mx.array_equal(after[k], v).item() for k, v in frozen.items())


@pytest.mark.parametrize("name", PEFT)
def test_gradient_checkpointing_keeps_the_gradients(tiny_model_dir, name):
    """Checkpointed layers re-run with their own parameters; the prefix lives in the layer so it
    still gets its gradient."""
    loaded = load_model(str(tiny_model_dir))
    x = tokens(loaded)

    def gradients(checkpointed: bool) -> dict[str, mx.array]:
        mx.random.seed(0)
        model = perturbed(apply_method(load_model(str(tiny_model_dir)).model, method(name), loaded.tokenizer))
        if checkpointed:
            enable_grad_checkpoint(model)
        _, grads = nn.value_and_grad(model, lambda: model(x).astype(mx.float32).square().mean())()
        return dict(tree_flatten(grads))

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for key, grad in plain.items():
        assert mx.abs(grad).max().item() > 0, key
        assert mx.allclose(grad, checkpointed[key], atol=1e-6).item(), key


def write_corpus(path) -> None:
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines * 2))


def test_resume_continues_a_prefix_run_exactly(tiny_model_dir, tmp_path):
    """Checkpoints hold the prefix and its optimizer state: 2 + 2 resumed steps equal 4 steps."""
    from macft.train.run import run_training

    write_corpus(tmp_path / "train.jsonl")

    def recipe(name: str, iters: int, resume: str | None = None) -> Recipe:
        return Recipe(name=name).replace(
            model={"path": str(tiny_model_dir)},
            data={"train": str(tmp_path / "train.jsonl"), "max_seq_length": 64},
            method={"name": "prefix", "prefix_length": 4},
            # A constant rate, so the 2-step run's schedule is the first half of the 4-step one.
            train={
                "iters": iters, "batch_size": 2, "learning_rate": 1e-2, "lr_schedule": "constant",
                "save_every": 2, "eval_every": 0,
            },
            output={"runs_dir": str(tmp_path / "runs"), "name": name, "resume": resume},
        )

    straight = run_training(recipe("straight", 4)).run_dir
    first = run_training(recipe("split", 2)).run_dir
    resumed = run_training(recipe("split", 4, resume=str(first))).run_dir
    a, b = mx.load(str(straight / "adapters.safetensors")), mx.load(str(resumed / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(k.startswith("model.layers.") and ".prefix." in k for k in a)
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)


def test_compare_script_reports_every_method(tiny_models, tmp_path, capsys):
    """scripts/compare_methods.py on a tiny model: one row per method, with the trainable count
    each method's shape implies (2 layers, 2 KV heads of 16, hidden 64)."""
    import importlib.util

    from macft.paths import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location("compare_methods", PROJECT_ROOT / "scripts" / "compare_methods.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    write_corpus(tmp_path / "train.jsonl")
    (tmp_path / "valid.jsonl").write_text((tmp_path / "train.jsonl").read_text())
    out = tmp_path / "results.json"
    argv = ["--model", str(tiny_models["gemma3"]), "--data", str(tmp_path), "--methods", "prefix,adapter"]
    argv += ["--steps", "2", "--seq", "64", "--runs-dir", str(tmp_path / "runs"), "--json", str(out)]
    assert script.main(argv) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    # layers · (K, V) · prefix length · kv heads · head dim
    assert rows["prefix"]["trainable_parameters"] == 2 * 2 * 16 * 2 * 16
    assert rows["adapter"]["trainable_parameters"] == 2 * (64 * 64 + 64 + 64 * 64 + 64)  # layers · (down + up)
    assert all(r["peak_memory_bytes"] > 0 and r["tokens_per_second"] > 0 and r["val_loss"] > 0 for r in rows.values())
    assert "trainable params" in capsys.readouterr().out

    # Re-running some rows into the same file keeps the others; the base row is the untrained model.
    argv[argv.index("--methods") + 1] = "base,prefix"
    argv[argv.index("--runs-dir") + 1] = str(tmp_path / "rerun")  # run names carry only the second
    assert script.main(argv) == 0
    again = json.loads(out.read_text())
    assert [r["method"] for r in again] == ["base", "prefix", "adapter"]
    assert again[2] == rows["adapter"] and again[1]["run_dir"] != rows["prefix"]["run_dir"]
    assert again[0]["trainable_parameters"] == 0 and again[0]["val_loss"] > 0 and again[0]["tokens_per_second"] is None


@pytest.mark.parametrize("name", PEFT)
def test_chat_can_take_the_method_off_and_put_it_back(tiny_models, tmp_path, name):
    """``macft chat`` switches adapters on one loaded base by putting the swapped modules back;
    afterwards the base must compute, and generate, exactly as before."""
    from macft.chat import open_model, set_adapter

    directory = str(tiny_models["gemma3"])
    loaded = load_model(directory)
    x = tokens(loaded)
    base_logits = loaded.model(x)
    base_text = generate(loaded.model, loaded.tokenizer, x[0], max_tokens=5)
    recipe = Recipe().replace(model={"path": directory}, method=dict(vars(method(name))))
    model = perturbed(apply_method(loaded.model, recipe.method, loaded.tokenizer))
    tuned_logits = model(x)
    save_adapter(model, tmp_path, recipe.method, loaded.identity, recipe.model.recorded)

    opened = open_model(directory, tmp_path)
    assert mx.array_equal(opened.model(x), tuned_logits).item()
    set_adapter(opened, None)
    assert mx.array_equal(opened.model(x), base_logits).item()
    assert generate(opened.model, opened.tokenizer, x[0], max_tokens=5) == base_text
    set_adapter(opened, tmp_path)
    assert mx.array_equal(opened.model(x), tuned_logits).item()
