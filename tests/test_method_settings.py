"""The method registry and settings that fit the method, through the CLI on tiny models: the method's
learning rate when a flag switches the method, the range warning, ``--epochs auto``, the early
divergence stop, the planner's trainable-parameter counts and the fuse refusals."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from macft.cli import cli
from macft.config import MethodConfig, Recipe, save_recipe
from macft.memory import Plan, trainable_params
from macft.models.shape import loaded_shape
from macft.train.plan import memory_plan
from macft.methods import METHODS, method_spec
from macft.adapters.files import save_adapter
from macft.methods import apply_method, count_parameters
from macft.models.load import load_model
from macft.train.guard import LossGuard


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"prompt": f"Q: {i} plus one?", "completion": f" {i + 1}"} for i in range(30)]
    for name, part in (("train", rows[:20]), ("valid", rows[20:25])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


@pytest.fixture
def lora_recipe(tmp_path, tiny_model_dir, data_dir):
    """A recipe file written for LoRA, with LoRA's learning rate."""
    path = tmp_path / "mine.yaml"
    raw = {
        "model": {"path": str(tiny_model_dir)},
        "data": {"train": str(data_dir)},
        "method": {"name": "lora", "rank": 4},
        "train": {"learning_rate": 2e-4, "batch_size": 4, "report_every": 1, "eval_every": 0},
        "output": {"runs_dir": str(tmp_path / "runs")},
        "demo": {"count": 0},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def lora(*args):
    return CliRunner().invoke(cli, ["lora", *map(str, args)])


def said(result) -> str:
    """What the user read, with the terminal's line wrapping undone."""
    return " ".join(result.output.split())


def saved_recipe(tmp_path, name):
    return yaml.safe_load((tmp_path / "runs" / name / "recipe.yaml").read_text())


def test_registry_is_the_one_list_of_methods():
    assert all(callable(spec.apply) for spec in METHODS.values())
    assert Recipe.__dataclass_fields__["method"].default_factory().name in METHODS
    for spec in METHODS.values():
        low, high = spec.learning_rate_range
        assert low <= spec.learning_rate <= high, spec.name
        assert set(spec.option_names) <= set(MethodConfig.__dataclass_fields__), spec.name
        assert spec.fusable or spec.not_fusable_because, spec.name
    assert method_spec("qlora") is METHODS["lora"]
    unused = lora("--method", "prompt", "--rank", 16)  # a flag the chosen method never reads
    assert unused.exit_code == 1 and "sets method.rank, which prompt tuning does not use; it reads method.num_virtual_tokens" in said(unused)
    unused = lora("--set", "method.prefix_length=3")  # the quickstart recipe is LoRA
    assert unused.exit_code == 1 and "method.prefix_length, which LoRA does not use" in said(unused)
    help_text = CliRunner().invoke(cli, ["lora", "-h"]).output + CliRunner().invoke(cli, ["estimate", "-h"]).output
    assert all(help_text.count(name) >= 2 for name in ("ptuning", "prefix", "adapter", "qlora"))


@pytest.mark.parametrize(
    "method",
    [
        MethodConfig(name="lora", rank=4, target_modules=("q_proj", "v_proj", "down_proj")),
        MethodConfig(name="dora", rank=2, num_layers=1),
        MethodConfig(name="full", num_layers=1),
        MethodConfig(name="prompt", num_virtual_tokens=5),
        MethodConfig(name="ptuning", num_virtual_tokens=3, ptuning_hidden_size=16),
        MethodConfig(name="prefix", prefix_length=4),
        MethodConfig(name="adapter", adapter_size=8, adapter_placement="both"),
    ],
    ids=lambda m: m.name,
)
def test_planner_counts_what_the_method_trains(tiny_models, method):
    """The planner's count from config alone equals the parameters the applied method really trains."""
    for family in ("llama", "gemma3"):
        loaded = load_model(str(tiny_models[family]))
        recipe = Recipe().replace(method=dict(vars(method)))
        predicted = trainable_params(loaded_shape(loaded), memory_plan(recipe))
        trained, _ = count_parameters(apply_method(loaded.model, recipe.method, loaded.tokenizer))
        if method.name == "full" and family == "gemma3":
            # ModelShape counts two norms per layer; Gemma 3 has four more (q/k norms, pre/post MLP norms).
            assert 0 < trained - predicted < 0.01 * trained
        else:
            assert predicted == trained > 0, family


def test_estimate_cli_counts_peft_parameters(tiny_model_dir):
    out = CliRunner().invoke(cli, ["estimate", "--model", str(tiny_model_dir), "--method", "prefix", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output[out.output.index("{") :])
    assert result["parts"]["trainable"] == 4 * trainable_params(_shape(tiny_model_dir), Plan(method="prefix")) > 0


def _shape(model_dir):
    from macft.models.shape import read_model_shape

    return read_model_shape(str(model_dir))


@pytest.mark.parametrize("name", ["prompt", "prefix", "adapter"])
def test_fuse_refuses_with_the_methods_own_reason(tiny_model_dir, tmp_path, name):
    loaded = load_model(str(tiny_model_dir))
    recipe = Recipe().replace(model={"path": str(tiny_model_dir)}, method={"name": name, "num_virtual_tokens": 2, "prefix_length": 2})
    save_adapter(apply_method(loaded.model, recipe.method, loaded.tokenizer), tmp_path / "run", recipe.method, loaded.identity, recipe.model.recorded)
    save_recipe(recipe, tmp_path / "run" / "recipe.yaml")
    for command in (["fuse", "--adapter"], ["export", "gguf", "--adapter"]):
        out = CliRunner().invoke(cli, [*command, str(tmp_path / "run")])
        assert out.exit_code == 1
        assert out.output.strip().endswith(f"Error: {method_spec(name).not_fusable_because}"), out.output


def test_switching_method_uses_its_learning_rate_and_warns_outside_the_range(lora_recipe, tmp_path):
    switched = lora(lora_recipe, "--method", "full", "--iters", 1, "--name", "full")
    assert switched.exit_code == 0, switched.output
    assert "Learning rate 1e-05: the usual one for full fine-tuning (the recipe's 0.0002 was for LoRA)" in said(switched)
    assert saved_recipe(tmp_path, "full")["train"]["learning_rate"] == pytest.approx(1e-5)
    assert "Warning" not in said(switched)

    chosen = lora(lora_recipe, "--method", "full", "--lr", 3e-4, "--iters", 1, "--name", "chosen")
    assert chosen.exit_code == 0, chosen.output
    assert saved_recipe(tmp_path, "chosen")["train"]["learning_rate"] == pytest.approx(3e-4)
    assert "usual one" not in said(chosen)
    assert "Warning: learning rate 0.0003 is above the usual range for full fine-tuning (1e-06 to 5e-05" in said(chosen)

    kept = lora(lora_recipe, "--iters", 1, "--name", "kept")  # same method: the recipe's rate stands, silently
    assert kept.exit_code == 0, kept.output
    assert saved_recipe(tmp_path, "kept")["train"]["learning_rate"] == pytest.approx(2e-4)
    assert "Learning rate" not in said(kept) and "Warning" not in said(kept)


def test_epochs_auto_is_chosen_printed_and_saved(lora_recipe, tmp_path, data_dir):
    out = lora(lora_recipe, "--epochs", "auto", "--name", "auto", "--set", "train.report_every=100", "--set", "train.batch_size=10")
    assert out.exit_code == 0, out.output
    # 20 examples: LoRA's 1000 examples would take 50 passes, so the 5-epoch cap; 2 batches of 10 per epoch.
    assert "--epochs auto: 5 epochs over 20 examples for LoRA" in said(out)
    assert "validating every step and stopping after 3 without improvement" in said(out)
    train = saved_recipe(tmp_path, "auto")["train"]
    assert (train["epochs"], train["iters"], train["eval_every"], train["early_stopping_patience"]) == (5.0, 10, 1, 3)
    summary = json.loads((tmp_path / "runs" / "auto" / "summary.json").read_text())
    assert summary["stop_reason"] in ("finished", "early_stopping") and summary["steps"] <= 10

    (data_dir / "valid.jsonl").unlink()
    rows = [{"prompt": f"{i}?", "completion": f" {i}"} for i in range(300)]
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fewer = lora(lora_recipe, "--epochs", "auto", "--method", "full", "--name", "full-auto", "--set", "train.batch_size=150")
    assert fewer.exit_code == 0, fewer.output
    assert "--epochs auto: 2 epochs over 300 examples for full fine-tuning." in said(fewer)  # ceil(500 / 300)
    train = saved_recipe(tmp_path, "full-auto")["train"]
    assert (train["epochs"], train["iters"], train["early_stopping_patience"]) == (2.0, 4, 0)

    bad = lora(lora_recipe, "--epochs", "soon")
    assert bad.exit_code == 2 and "'soon' is not a positive number or 'auto'" in said(bad)


def test_divergence_stops_early_and_suggests_a_learning_rate(lora_recipe, tmp_path):
    out = lora(lora_recipe, "--method", "full", "--lr", 0.3, "--iters", 20, "--name", "wild")
    assert out.exit_code == 1
    line = out.output.strip().splitlines()[-1]
    assert line.startswith("Error: Training stopped at step ") and "so learning rate 0.3 is too high for full fine-tuning" in line
    assert line.endswith("try --lr 0.03, and full fine-tuning usually trains at 1e-05.")
    metrics = [json.loads(r) for r in (tmp_path / "runs" / "wild" / "metrics.jsonl").read_text().splitlines()]
    stopped = int(line.split("step ")[1].split(":")[0])
    assert len(metrics) == stopped - 1 < 20  # reported every step until the climbing one
    first, peak = metrics[0]["train_loss"], float(line.split(" to ")[1].split(",")[0])
    assert peak > 1.5 * first + 1.0
    assert not (tmp_path / "runs" / "wild" / "adapters.safetensors").exists()  # the wrecked weights are not kept


def test_early_rise_names_a_learning_rate():
    guard = LossGuard(learning_rate=2e-4, method="lora")
    losses = [2.0, 2.8, 3.9, 1.5]  # noisy but never above 2.0 × 1.5 + 1
    assert all(guard.check(step, loss) is None for step, loss in enumerate(losses, 1))
    stop = guard.check(5, 4.5)
    assert "try --lr 2e-05." in stop.advice and "usually trains at" not in stop.advice  # at LoRA's default
    high = LossGuard(learning_rate=1e-3, method="lora")
    high.check(1, 2.0)
    assert "try --lr 0.0001, and LoRA usually trains at 0.0002." in high.check(2, 9.0).advice
    late = LossGuard(learning_rate=1.0, method="prompt")
    late.check(1, 2.0)
    assert late.check(51, 50.0) is None  # after the first 50 steps a single rise is not the rate's doing
    assert LossGuard().check(2, 50.0) is None  # without a learning rate only the patient rules apply