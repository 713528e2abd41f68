"""The recipe loader: strict keys, typed coercion, overrides, one-line errors, round trip."""

from __future__ import annotations

import pytest

from macft.config import Recipe, apply_overrides, from_dict, load_recipe, save_recipe, to_dict
from macft.errors import MacftError
from macft.paths import RECIPES_DIR


def test_values_are_coerced_to_declared_types():
    recipe = from_dict({"train": {"learning_rate": "1e-5", "iters": "10", "compile": "false"}, "method": {"target_modules": "q_proj"}})
    assert recipe.train.learning_rate == pytest.approx(1e-5) and isinstance(recipe.train.learning_rate, float)
    assert recipe.train.iters == 10 and isinstance(recipe.train.iters, int)
    assert recipe.train.compile is False
    assert recipe.method.target_modules == ("q_proj",)


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"trian": {}}, "unknown recipe key 'trian'"),
        ({"train": {"lr": 1}}, "unknown recipe key 'train.lr'"),
        ({"train": {"iters": "ten"}}, "'train.iters' must be an integer"),
        ({"train": {"iters": 2.5}}, "'train.iters' must be an integer"),
        ({"method": {"name": "magic"}}, "'method.name' must be one of"),
        ({"data": {"packing": "maybe"}}, "'data.packing' must be true or false"),
        ({"model": []}, "'model' must be a mapping"),
    ],
)
def test_bad_keys_and_values_name_the_key(raw, fragment):
    with pytest.raises(MacftError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        from_dict(raw)


def test_overrides_apply_and_validate():
    recipe = apply_overrides(Recipe(), ["train.batch_size=2", "data.packing=true", "method.alpha=32"])
    assert (recipe.train.batch_size, recipe.data.packing, recipe.method.alpha / recipe.method.rank) == (2, True, 4.0)
    with pytest.raises(MacftError, match="section.key=value"):
        apply_overrides(Recipe(), ["train.batch_size"])
    with pytest.raises(MacftError, match="unknown recipe section 'trian'"):
        apply_overrides(Recipe(), ["trian.batch_size=2"])
    with pytest.raises(MacftError, match="train.batch_size must be at least 1"):
        load_recipe(overrides=["train.batch_size=0"])


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  iters: 3\n   batch_size: [\n")
    with pytest.raises(MacftError, match=r"bad.yaml line \d+"):
        load_recipe(bad)
    with pytest.raises(MacftError, match="No recipe named 'nope'"):
        load_recipe("nope")


def test_save_and_reload_round_trip(tmp_path):
    recipe = load_recipe("quickstart", overrides=["train.iters=3"])
    save_recipe(recipe, tmp_path / "recipe.yaml")
    again = load_recipe(tmp_path / "recipe.yaml")
    assert to_dict(again) == to_dict(recipe)


def test_bundled_data_paths_resolve_next_to_the_recipe():
    recipe = load_recipe("quickstart")
    assert recipe.data.train == str((RECIPES_DIR / "data" / "quickstart").resolve())
