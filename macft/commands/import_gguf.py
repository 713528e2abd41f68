"""`macft import`: turn a GGUF file into an MLX model directory (exact quantized weights)."""

from __future__ import annotations

import json

import click


@click.command("import", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("gguf_file", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), default=None, help="Write the model directory here (default: macft's import cache).")
@click.option("--dequantize", is_flag=True, help="Store every weight as float instead of exact MLX quantized layers.")
@click.option("--force", is_flag=True, help="Replace --out even when it is not an earlier macft import.")
@click.option("--json", "as_json", is_flag=True, help="Print the import report as JSON.")
def import_gguf(gguf_file: str, out: str | None, dequantize: bool, force: bool, as_json: bool) -> None:
    """Import GGUF_FILE (llama.cpp / Ollama; also ollama:NAME[:TAG] or lmstudio:NAME) as an MLX model
    directory that mlx_lm.load opens.

    Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K and Q5_K weights become MLX quantized layers holding exactly
    the values llama.cpp uses; other types (Q6_K, F16, ...) become float. Imports are cached by
    the file's sha256, so importing again is instant.

    \b
    Examples:
      macft import gemma-3-270m-q4_k_m.gguf
      macft import model.gguf --out my-model --dequantize
      macft import ollama:qwen3:0.6b --out qwen3-mlx
      macft lora --model model.gguf        # imports on the fly
    """
    from macft.models.spec import resolve_app_model
    from macft.models.gguf_import import import_gguf_report

    report = import_gguf_report(resolve_app_model(gguf_file), dequantize=dequantize, out=out, force=force)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    state = "reused the cached import" if report.cached else f"imported in {report.seconds:.1f} s"
    click.echo(f"{report.source.name} ({report.architecture}): {state}")
    for kind, label in (("exact", "exact quantized"), ("float", "stored as float")):
        counts = report.summary.get(kind, {})
        if counts:
            detail = ", ".join(f"{n} {qtype}" for qtype, n in sorted(counts.items()))
            click.echo(f"  {label}: {sum(counts.values())} tensors ({detail})")
    click.echo(f"model directory: {report.path}")
