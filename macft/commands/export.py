"""`macft export gguf`: write a model, or a base with its adapter, as GGUF for llama.cpp and Ollama."""

from __future__ import annotations

import json

import click

from macft.export.quant_plan import SCHEMES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def export():
    """Export a model or adapter (GGUF, Ollama Modelfile, Hugging Face PEFT)."""


@export.command("gguf")
@click.option("--model", "-m", "model_spec", default=None, help="Model folder (e.g. from `macft fuse`), .gguf file, hub id or gemma3-270m; with a PEFT --adapter, its base.")
@click.option("--adapter", "-a", "run_dir", default=None, help="Run directory, or a PEFT LoRA/DoRA adapter (folder or hub id): export its base with the adapter fused in.")
@click.option("--quant", "-q", type=click.Choice(list(SCHEMES)), default="f16", show_default=True, help="GGUF weight type (K-quant mixtures as llama-quantize makes them); adapters are always float32.")
@click.option("--out", "-o", type=click.Path(), default=None, help="Output .gguf file.")
@click.option("--adapter-only", is_flag=True, help="Write only the LoRA adapter, for llama.cpp --lora / Ollama ADAPTER.")
@click.option("--ollama", "ollama", is_flag=False, flag_value="", default=None, metavar="NAME", help="Also write an Ollama Modelfile; with NAME, run `ollama create NAME` too (when Ollama is installed).")
@click.option("--lm-studio", is_flag=True, help="Write the GGUF into LM Studio's models folder (under macft/), where LM Studio lists it.")
@click.option("--name", default=None, help="general.name stored in the file (default: the file name).")
@click.option("--force", is_flag=True, help="Replace --out even when it is not an earlier macft export.")
@click.option("--plain/--guided", "plain", default=None, help="--plain: quantize as llama-quantize does; --guided: use the run's importance matrix and delta-aware types. Default: guided for q4_k_m, q5_k_m and q4_0, plain for the rest.")
@click.option("--fidelity", "fidelity_examples", type=click.IntRange(min=0), default=16, show_default=True, help="Validation examples the fidelity report scores the file on; 0 skips the report, often most of a run's export time.")
@click.option("--push-to-hub", "repo", default=None, metavar="REPO", help="Also upload the GGUF to this Hugging Face model repo (owner/name), with a model card; needs `hf auth login` or HF_TOKEN.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def gguf(model_spec, run_dir, quant, out, adapter_only, ollama, lm_studio, name, force, plain, fidelity_examples, repo, as_json):
    """Write a GGUF file that llama.cpp and Ollama run, without needing llama.cpp.

    \b
    Examples:
      macft export gguf --model fused/quickstart --quant q4_k_m
      macft export gguf --adapter runs/quickstart --quant q8_0 --ollama
      macft export gguf --adapter runs/quickstart --quant q4_k_m --ollama my-model
      macft export gguf --adapter runs/quickstart --quant q4_k_m --lm-studio
      macft export gguf --adapter runs/quickstart --adapter-only --ollama
      macft export gguf --adapter org/peft-adapter --quant q8_0 --push-to-hub me/model-gguf

    Exporting a run (--adapter) to q4_k_m, q5_k_m or q4_0 rounds every weight by the importance its training
    data gives it and raises the tensors the fine-tune changed most within 15% more bytes (--guided
    does this for the other types too, --plain turns it off). Every export of a run ends with a fidelity
    report: the file against the fused float model on the run's validation examples.
    """
    from macft.adapters.peft import adapter_run, is_peft_source, source_name
    from macft.hub import hub_token
    from macft.export.pipeline import export_gguf

    token = hub_token(repo) if repo else None  # before any work
    if run_dir is not None and is_peft_source(run_dir):
        if out is None and not lm_studio:
            out = f"{source_name(run_dir)}-{'lora' if adapter_only else quant}.gguf"
        run_dir, model_spec = adapter_run(run_dir, model_spec), None  # converted for its base: --model named that base
        fidelity_examples = 0  # a PEFT adapter brings no validation data to score the file on
    report = export_gguf(
        model=model_spec,
        adapter=run_dir,
        quant=quant,
        out=out,
        adapter_only=adapter_only,
        ollama=True if ollama == "" else ollama or False,
        lm_studio=lm_studio,
        name=name,
        force=force,
        plain=plain,
        fidelity_examples=fidelity_examples,
    )
    url = None
    if repo:
        from pathlib import Path

        from macft.export.fuse import read_adapter_config
        from macft.export.hub import model_card, run_facts
        from macft.hub import push_files

        path = Path(report.gguf["path"])
        base = (read_adapter_config(Path(run_dir)).get("base_model") or {}).get("source") if run_dir else model_spec
        card = model_card(base, run_facts(run_dir), kind="gguf", title=repo, location=repo)
        url = push_files({path.name: path}, card, repo, token, message=f"macft export gguf ({'adapter' if adapter_only else quant})")
    if as_json:
        click.echo(json.dumps({**report.to_dict(), "hub_url": url}, indent=2))
        return
    info = report.gguf
    size = info["size_bytes"] / 2**20
    if adapter_only:
        click.echo(f"Wrote LoRA adapter GGUF ({info['pairs']} tensors, rank {info['rank']}, alpha {info['alpha']:g}, {size:.1f} MiB) → {info['path']}")
    else:
        types = ", ".join(f"{k} {v}" for k, v in sorted(info["types"].items()))
        click.echo(f"Wrote {info['quant']} GGUF ({types}; {size:.1f} MiB) in {info['seconds']:.1f}s → {info['path']}")
    for note in report.notes:
        click.echo(f"Note: {note}")
    if report.fidelity:
        from macft.export.fidelity import Fidelity

        fidelity = Fidelity(**report.fidelity)
        for line in fidelity.lines():
            click.echo(line)
        if fidelity.warning:
            click.echo(f"Warning: {fidelity.warning}", err=True)
    if report.modelfile:
        click.echo(f"Modelfile → {report.modelfile}")
        if report.ollama_created:
            click.echo(f"Ran: {report.ollama_command} (now `ollama run {ollama.lower()}`)")
        else:
            click.echo(f"Run: {report.ollama_command}")
    if url:
        click.echo(f"Pushed to {url}")


from macft.commands.export_imatrix import imatrix  # noqa: E402  (its own module: one command, one job)
from macft.commands.export_peft import peft  # noqa: E402

export.add_command(imatrix)
export.add_command(peft)
