"""`macft recipes list|show`: the bundled recipes (``recipes/*.yaml``)."""

from __future__ import annotations

import json

import click

from macft import ui
from macft.paths import RECIPES_DIR


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def recipes() -> None:
    """List and show the bundled recipes.

    \b
    Examples:
      macft recipes list
      macft recipes show qwen3-0.6b-lora-16gb
      macft lora qwen3-0.6b-lora-16gb --set data.train=path/to/data
    """


@recipes.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the recipes as JSON.")
def list_recipes(as_json: bool) -> None:
    """List the bundled recipes with their model, method and description.

    \b
    Example:
      macft recipes list --json
    """
    from macft.config import load_recipe

    rows = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        recipe = load_recipe(path)
        method = recipe.method.name + (f" ({recipe.model.quantize_bits}-bit base)" if recipe.model.quantize_bits else "")
        rows.append({"name": path.stem, "model": recipe.model.path, "method": method, "description": recipe.description, "path": str(path)})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    ui.show_recipes(rows)


@recipes.command("show")
@click.argument("name")
def show_recipe(name: str) -> None:
    """Print a recipe file as written (comments included).

    \b
    Example:
      macft recipes show gemma3-270m-qlora-wikisql
    """
    from macft.config import load_recipe, recipe_path

    path = recipe_path(name)
    load_recipe(path)  # a broken recipe is reported, not shown as if it worked
    click.echo(path.read_text(), nl=False)
