"""`macft fuse`: merge a trained LoRA/DoRA adapter into its base and save an MLX model directory."""

from __future__ import annotations

import json

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--adapter", "-a", "run_dir", required=True, type=click.Path(exists=True), help="Run directory from `macft lora`.")
@click.option("--out", "-o", type=click.Path(), default=None, help="Output model directory (default: RUN/fused).")
@click.option("--dequantize", is_flag=True, help="Write every layer in float, even where the base was quantized.")
@click.option("--quantize", "quantize_bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None, help="Quantize the merged model once to this many bits.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True, help="Group size for --quantize.")
@click.option("--force", is_flag=True, help="Replace --out even when it is not an earlier `macft fuse` output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def fuse(run_dir, out, dequantize, quantize_bits, group_size, force, as_json):
    """Merge the adapter in RUN into its base model (in float32) and save the result.

    The base recorded in the run's adapter_config.json is loaded as it was for training.
    The output opens with `mlx_lm.load`, `macft chat --model` and `macft export gguf --model`.

    \b
    Examples:
      macft fuse --adapter runs/quickstart
      macft fuse --adapter runs/qlora --quantize 4 --out fused/qlora-q4
    """
    from macft.export.fuse import fuse_adapter

    result = fuse_adapter(
        run_dir,
        out,
        dequantize=dequantize,
        quantize_bits=int(quantize_bits) if quantize_bits else None,
        group_size=int(group_size),
        force=force,
    )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(
        f"Fused {result.fused_layers} {result.method} layers into {result.base_model} "
        f"({result.quantization}) in {result.seconds:.1f}s → {result.path}"
    )
    click.echo(f"Next: macft export gguf --model {result.path} --quant q4_k_m")
