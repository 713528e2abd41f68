"""`macft fuse`: merge a trained LoRA/DoRA adapter into its base and save an MLX model directory."""

from __future__ import annotations

import json

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--adapter", "-a", "run_dir", required=True, help="Run directory from `macft lora`, or a PEFT LoRA/DoRA adapter (folder or hub id).")
@click.option("--model", "-m", "model_spec", default=None, help="The base for a PEFT adapter (default: its base_model_name_or_path); a run's base is the one it recorded.")
@click.option("--out", "-o", type=click.Path(), default=None, help="Output model directory (default: RUN/fused; NAME-fused here for a PEFT adapter).")
@click.option("--dequantize", is_flag=True, help="Write every layer in float, even where the base was quantized.")
@click.option("--quantize", "quantize_bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default=None, help="Quantize the merged model once to this many bits.")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True, help="Group size for --quantize.")
@click.option("--force", is_flag=True, help="Replace --out even when it is not an earlier `macft fuse` output.")
@click.option("--push-to-hub", "repo", default=None, metavar="REPO", help="Also upload the fused model to this Hugging Face model repo (owner/name), with a model card; needs `hf auth login` or HF_TOKEN.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def fuse(run_dir, model_spec, out, dequantize, quantize_bits, group_size, force, repo, as_json):
    """Merge the adapter in RUN into its base model (in float32) and save the result.

    The base recorded in the run's adapter_config.json is loaded as it was for training.
    The output opens with `mlx_lm.load`, `macft chat --model` and `macft export gguf --model`.

    \b
    Examples:
      macft fuse --adapter runs/quickstart
      macft fuse --adapter runs/qlora --quantize 4 --out fused/qlora-q4
      macft fuse --adapter org/peft-adapter --out fused/peft --push-to-hub me/merged
    """
    from macft.adapters.peft import adapter_run, is_peft_source, source_name
    from macft.export.fuse import FUSE_RECORD, fuse_adapter
    from macft.export.hub import folder_files, model_card, run_facts
    from macft.hub import hub_token, push_files

    token = hub_token(repo) if repo else None  # before any work
    if is_peft_source(run_dir):
        out = out or f"{source_name(run_dir)}-fused"
        run_dir = adapter_run(run_dir, model_spec)
    elif model_spec is not None:
        raise click.UsageError("--model is for PEFT adapters; a macft run fuses into the base it recorded.")
    result = fuse_adapter(
        run_dir,
        out,
        dequantize=dequantize,
        quantize_bits=int(quantize_bits) if quantize_bits else None,
        group_size=int(group_size),
        force=force,
    )
    url = None
    if repo:
        card = model_card(result.base_model, run_facts(run_dir), kind="fused", title=repo, location=repo)
        url = push_files(folder_files(result.path, skip=(FUSE_RECORD,)), card, repo, token, message=f"macft fuse ({result.method})")
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "hub_url": url}, indent=2))
        return
    click.echo(
        f"Fused {result.fused_layers} {result.method} layers into {result.base_model} "
        f"({result.quantization}) in {result.seconds:.1f}s → {result.path}"
    )
    if url:
        click.echo(f"Pushed to {url}")
    click.echo(f"Next: macft export gguf --model {result.path} --quant q4_k_m")
