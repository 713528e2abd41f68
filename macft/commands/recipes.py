"""`macft recipes list|show`: the bundled recipes (``recipes/*.yaml``)."""

from __future__ import annotations

import json
from pathlib import Path

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
        rows.append({"name": path.stem, "model": recipe.model.path, "method": method_label(recipe), "description": recipe.description, "path": str(path)})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    ui.show_recipes(rows)


def method_label(recipe) -> str:
    """The method as `macft lora --method` names it (LoRA on a quantized base is QLoRA), with the base's quantization."""
    base = base_quantization(recipe.model)
    name = "qlora" if base and recipe.method.name == "lora" else recipe.method.name
    return f"{name} ({base})" if base else name


def base_quantization(model) -> str | None:
    """How a recipe's frozen base is quantized while training: by model.quantize_bits, or as a quantized GGUF file kept so."""
    from macft.models.spec import DEFAULT_MODEL
    from macft.discovery import describe_gguf
    from macft.models.gguf_import.reader import is_gguf_file

    if model.quantize_bits:
        return f"{model.quantize_bits}-bit base"
    if model.dequantize:
        return None
    if model.path == DEFAULT_MODEL:
        return "Q4_K_M GGUF base"  # the embedded model's package holds a Q4_K_M file (not assembled just to list)
    path = Path(model.path).expanduser()
    if not (is_gguf_file(path) and path.is_file()):
        return None
    kind = describe_gguf(path, path.name, "recipe").quantization
    return f"{kind} GGUF base" if kind and kind not in ("F32", "F16", "BF16") else None


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
