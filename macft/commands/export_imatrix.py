"""`macft export imatrix`: (re)compute a run's importance matrix, which quantized exports use."""

from __future__ import annotations

import json

import click


@click.command("imatrix", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--adapter", "-a", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Run directory from `macft lora`.")
@click.option("--tokens", type=click.IntRange(min=1), default=None, help="Training tokens to average over (default 8192).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def imatrix(run_dir, tokens, as_json):
    """Compute the importance matrix of a run into RUN/imatrix.safetensors.

    For every linear layer of the tuned model, the mean of x² of each input column over the run's
    training tokens. `macft export gguf --adapter RUN` computes it on first use; run this to
    recompute it, e.g. over more tokens.

    \b
    Examples:
      macft export imatrix --adapter runs/quickstart
      macft export imatrix --adapter runs/quickstart --tokens 32768
    """
    from pathlib import Path

    from macft.export.fuse import load_fused
    from macft.export.imatrix import DEFAULT_TOKENS, IMATRIX_FILE, run_imatrix

    loaded, _, _ = load_fused(run_dir, dequantize=True)
    result, _ = run_imatrix(run_dir, loaded, max_tokens=tokens or DEFAULT_TOKENS, recompute=True)
    path = Path(run_dir) / IMATRIX_FILE
    if as_json:
        click.echo(json.dumps({"path": str(path), "tokens": result.tokens, "examples": result.examples, "layers": len(result.columns)}, indent=2))
    else:
        click.echo(f"Importance matrix of {len(result.columns)} layers from {result.tokens} tokens ({result.examples} examples) → {path}")
