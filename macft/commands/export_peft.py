"""`macft export peft`: a run's LoRA/DoRA adapter as Hugging Face PEFT saves it."""

from __future__ import annotations

import json

import click

PUSH_HELP = "Also upload the result to this Hugging Face model repo (owner/name), with a model card; needs `hf auth login` or HF_TOKEN."


@click.command("peft", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--adapter", "-a", "run_dir", required=True, type=click.Path(exists=True, file_okay=False), help="Run directory from `macft lora` (LoRA or DoRA).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="Output folder (default: RUN/peft).")
@click.option("--base", default=None, help="base_model_name_or_path to record (default: the run's base, as a hub id or folder).")
@click.option("--push-to-hub", "repo", default=None, metavar="REPO", help=PUSH_HELP)
@click.option("--force", is_flag=True, help="Replace --out even when it is not an earlier `macft export peft` output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def peft(run_dir, out, base, repo, force, as_json):
    """Write RUN's adapter as adapter_config.json + adapter_model.safetensors, the files Hugging Face
    PEFT saves, so transformers, vLLM, TGI and other PEFT readers load it on the same base.

    \b
    Examples:
      macft export peft --adapter runs/quickstart
      macft export peft --adapter runs/qwen-dora --out peft/qwen-dora --push-to-hub me/qwen-dora

    \b
    In Python:
      model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "runs/quickstart/peft")
    """
    from macft.adapters.peft import PEFT_CONFIG, PEFT_WEIGHTS, peft_method
    from macft.export.fuse import read_adapter_config
    from macft.hub import hub_token, push_files
    from macft.export.peft import CARD_FILE, export_peft

    token = None
    if repo:
        peft_method(read_adapter_config(run_dir))  # a method PEFT cannot carry is refused before the login is checked
        token = hub_token(repo)
    result = export_peft(run_dir, out, base=base, force=force, repo=repo)
    url = None
    if repo:
        card = (result.path / CARD_FILE).read_text()
        files = {name: result.path / name for name in (PEFT_CONFIG, PEFT_WEIGHTS)}
        url = push_files(files, card, repo, token, message=f"macft export peft ({result.method})")
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "hub_url": url}, indent=2))
        return
    click.echo(f"Wrote PEFT {result.method} adapter ({result.modules} layers, r {result.rank}, alpha {result.alpha:g}) for {result.base_model} → {result.path}")
    for note in result.notes:
        click.echo(f"Note: {note}")
    if url:
        click.echo(f"Pushed to {url}")
