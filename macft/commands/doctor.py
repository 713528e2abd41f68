"""`macft doctor`: what this machine gives macft, and the command that fixes each problem."""

from __future__ import annotations

import json

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(as_json: bool) -> None:
    """Check the platform, MLX and its device, the BLAS (with a measured matmul speed), memory,
    llama.cpp, Ollama and the caches; print the one command that fixes each problem found.

    \b
    Examples:
      macft doctor
      macft doctor --json
    """
    from macft import ui
    from macft.doctor import diagnose

    checks = diagnose()
    if as_json:
        click.echo(json.dumps([c.to_dict() for c in checks], indent=2))
    else:
        ui.show_doctor(checks)
