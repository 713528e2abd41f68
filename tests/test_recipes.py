"""Every bundled recipe loads strictly, fits the memory its name promises, and `macft recipes` lists it."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from macft.cli import cli
from macft.config import load_recipe
from macft.memory import MAC_SETTINGS, estimate, mac_working_set
from macft.models.shape import read_model_shape, shape_from_config
from macft.train.plan import memory_plan
from macft.units import GIB
from macft.paths import RECIPES_DIR

RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))

# The published config.json values of the hub models the recipes name (no network in tests).
HUB_CONFIGS = {
    "Qwen/Qwen2.5-0.5B-Instruct": {
        "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
    },
    "Qwen/Qwen3-0.6B": {
        "model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28, "intermediate_size": 3072,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "meta-llama/Llama-3.2-1B-Instruct": {
        "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "mistralai/Mistral-7B-Instruct-v0.3": {
        "model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768,
        "tie_word_embeddings": False,
    },
}
# Parameter counts the model cards state, to check the planner reads the configs right.
HUB_PARAMS = {
    "Qwen/Qwen2.5-0.5B-Instruct": 0.49e9,
    "Qwen/Qwen3-0.6B": 0.6e9,
    "meta-llama/Llama-3.2-1B-Instruct": 1.24e9,
    "mistralai/Mistral-7B-Instruct-v0.3": 7.25e9,
}


def shape_of(model_path: str):
    if model_path in HUB_CONFIGS:
        return shape_from_config(HUB_CONFIGS[model_path], name=model_path)
    return read_model_shape(model_path)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_documents_its_command(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem and recipe.description
    header = path.read_text().splitlines()
    assert header[0].startswith("#")
    comments = "\n".join(line for line in header if line.startswith("#"))
    assert "macft lora" in comments, "the header shows the command that runs the recipe"
    assert "--set" in comments or "--iters" in comments, "the header shows an example override"


@pytest.mark.parametrize("path", [p for p in RECIPES if re.search(r"-(\d+)gb$", p.stem)], ids=lambda p: p.stem)
def test_recipe_fits_the_mac_it_names(path):
    recipe = load_recipe(path)
    memory_gb = int(re.search(r"-(\d+)gb$", path.stem).group(1))
    result = estimate(shape_of(recipe.model.path), memory_plan(recipe, MAC_SETTINGS), mac_working_set(memory_gb * GIB))
    assert result.fits, f"{path.stem}: {result.total_bytes / GIB:.1f} GiB > {result.available_bytes / GIB:.1f} GiB"
    # ...and uses the memory it asks for: at least a quarter of the working set.
    assert result.total_bytes > 0.25 * result.available_bytes


@pytest.mark.parametrize("model_path", sorted(HUB_PARAMS))
def test_hub_shapes_match_published_sizes(model_path):
    assert abs(shape_of(model_path).params - HUB_PARAMS[model_path]) / HUB_PARAMS[model_path] < 0.03


def test_wikisql_recipe_asks_for_its_data_then_fits_a_16gb_mac(tmp_path):
    asked = CliRunner().invoke(cli, ["lora", "gemma3-270m-qlora-wikisql"])
    assert asked.exit_code == 1 and len(asked.output.strip().splitlines()) == 1
    assert "'gemma3-270m-qlora-wikisql' needs training data: pass --data PATH" in asked.output
    record = {"text": "table: t\ncolumns: a, b\nQ: What is b when a is 1?\nA: SELECT b FROM t WHERE a = 1"}
    (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")
    recipe = load_recipe("gemma3-270m-qlora-wikisql", overrides=[f"data.train={tmp_path}"])
    assert recipe.data.train == str(tmp_path)
    result = estimate(read_model_shape(recipe.model.path), memory_plan(recipe, MAC_SETTINGS), mac_working_set(16 * GIB))
    assert result.fits


def test_recipes_cli_list_and_show():
    runner = CliRunner()
    listed = runner.invoke(cli, ["recipes", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    names = {row["name"] for row in json.loads(listed.output)}
    assert names == {p.stem for p in RECIPES}
    table = runner.invoke(cli, ["recipes", "list"])
    assert table.exit_code == 0 and "mistral-7b-qlora-16gb" in table.output
    shown = runner.invoke(cli, ["recipes", "show", "qwen3-0.6b-lora-16gb"])
    assert shown.exit_code == 0 and shown.output == (RECIPES_DIR / "qwen3-0.6b-lora-16gb.yaml").read_text()
    missing = runner.invoke(cli, ["recipes", "show", "no-such-recipe"])
    assert missing.exit_code == 1 and "known recipes" in missing.output
