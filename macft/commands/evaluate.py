"""`macft eval`: loss, perplexity and task metrics on a JSONL file, base vs tuned."""

from __future__ import annotations

import json
from pathlib import Path

import click

from macft import ui


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "-m", "model_spec", default=None, help="Hub id, model folder, .gguf file or gemma3-270m (default: the adapter's base, else gemma3-270m).")
@click.option("--adapter", "-a", default=None, help="A run directory from `macft lora`, or a PEFT LoRA/DoRA adapter (folder or hub id); scores base and tuned side by side.")
@click.option("--data", "-d", "data", required=True, type=click.Path(exists=True), help="A .jsonl file, or a folder with test.jsonl (else valid.jsonl).")
@click.option("--max-examples", "-n", type=click.IntRange(min=0), default=0, show_default=True, help="Evaluate the first N examples (0 = all).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=128, show_default=True, help="Generation limit per answer.")
@click.option("--no-generate", is_flag=True, help="Loss and perplexity only (no answers, no task metrics).")
@click.option("--completion-after", default=None, help='Split {"text"} records after the last occurrence of this marker, e.g. "A:".')
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write per-example prompts, references, outputs and scores as JSONL.")
@click.option("--force", is_flag=True, help="Replace --report even when it is not an earlier `macft eval` report.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def evaluate(model_spec, adapter, data, max_examples, max_tokens, no_generate, completion_after, report, force, as_json):
    """Evaluate a model (and adapter) on held-out data: masked loss and perplexity over the
    completions, and exact match / similarity / token F1 of greedy answers.

    \b
    Examples:
      macft eval --adapter runs/quickstart --data recipes/data/quickstart/test.jsonl
      macft eval --adapter runs/wikisql --data data/wikisql --completion-after "A:" -n 100 --report eval.jsonl
      macft eval -m Qwen/Qwen3-0.6B --data test.jsonl --no-generate --json
    """
    from macft.chat import open_model
    from macft.evaluate import EvalOptions, eval_records, write_report
    from macft.evaluate import evaluate as run_eval
    from macft.evaluate import is_eval_report
    from macft.outputs import check_output

    if report:
        inputs = [data, adapter, model_spec, *Path(data).glob("*.jsonl")]  # a data folder's files too
        report = check_output(report, "eval", made_by=is_eval_report, inputs=inputs, force=force, option="--report")
    records = eval_records(data)
    opened = open_model(model_spec, adapter)
    for warning in opened.warnings:
        click.echo(f"Warning: {warning}", err=True)
    options = EvalOptions(max_examples=max_examples, max_tokens=max_tokens, generate=not no_generate, completion_after=completion_after)
    result = run_eval(opened.model, opened.tokenizer, records, options, tuned=opened.adapter is not None)
    if report:
        write_report(result, report)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    ui.show_eval_scores(result, report)
