"""`macft models`: the models found on this machine, ready to pass to --model."""

from __future__ import annotations

import json

import click

from macft import ui


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print the models as JSON.")
def models(as_json: bool) -> None:
    """List models found locally: the embedded default, the Hugging Face cache, macft's GGUF
    imports, Ollama and LM Studio. Under each name is what --model accepts (when it differs).

    \b
    Examples:
      macft models
      macft models --json | jq -r '.[] | select(.source == "ollama") | .spec'
      macft lora --model "$(macft models --json | jq -r '.[1].spec')"
    """
    from macft.discovery import find_models

    found = find_models()
    if as_json:
        click.echo(json.dumps([m.to_dict() for m in found], indent=2))
        return
    ui.show_models(found)
