"""`macft models`: the models found on this machine, ready to pass to --model."""

from __future__ import annotations

import json

import click


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
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(found)} local models", title_justify="left")
    table.add_column("name · --model spec", overflow="fold", ratio=1)
    table.add_column("source", no_wrap=True)
    table.add_column("family", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("quant", no_wrap=True)
    for m in found:
        params = f"{m.params / 1e9:.2f}B" if m.params and m.params >= 1e9 else f"{m.params / 1e6:.0f}M" if m.params else "?"
        size = f"{m.size_bytes / 1024**3:.2f} GiB" if m.size_bytes >= 1024**3 else f"{m.size_bytes / 1024**2:.0f} MiB"
        label = m.name if m.spec == m.name else f"{m.name}\n[dim]{m.spec}[/dim]"
        table.add_row(label, m.source, m.family or "?", params, size, m.quantization or "?")
    Console(highlight=False).print(table)
