"""`macft generate`: answer one prompt, for scripts and quick checks."""

from __future__ import annotations

import json
import sys

import click

from macft.engines import ENGINES


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "-m", "model_spec", default=None, help="Hub id, model folder, .gguf file or gemma3-270m (default: the adapter's base, else gemma3-270m).")
@click.option("--adapter", "-a", default=None, help="A run directory from `macft lora`, or a PEFT LoRA/DoRA adapter (folder or hub id).")
@click.option("--prompt", "-p", required=True, help="The prompt; '-' reads it from stdin.")
@click.option("--system", "-s", default=None, help="A system prompt (chat models).")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", "-t", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0), default=1.0, show_default=True)
@click.option("--engine", type=click.Choice(ENGINES), default="mlx", show_default=True, help="llama.cpp: generate with the model's cached Q8_0 GGUF export (needs llama-cpp-python; several times faster on a CPU).")
@click.option("--chat/--no-chat", default=None, help="Wrap the prompt in the chat template (default: when the tokenizer has one).")
@click.option("--json", "as_json", is_flag=True, help='Print {"prompt", "completion", "tokens", "tokens_per_second"}.')
def generate(model_spec, adapter, prompt, system, max_tokens, temperature, top_p, engine, chat, as_json):
    """Generate a completion for one prompt, streamed to the terminal.

    \b
    Examples:
      macft generate -p "Write a haiku about autumn."
      macft generate --adapter runs/quickstart -p "Sentence: Ann is 30 and lives in Oslo.\\nJSON:" --no-chat
      macft generate --adapter runs/quickstart --engine llama.cpp -p "Sentence: Ann is 30.\\nJSON:" --no-chat
      echo "What is MLX?" | macft generate -m Qwen/Qwen3-0.6B -p - --json
    """
    from macft.chat import EMPTY_ANSWER, Sampling, open_model
    from macft.chat import generate as answer

    if prompt == "-":
        prompt = sys.stdin.read()
    opened = open_model(model_spec, adapter, engine)
    for warning in opened.warnings:
        click.echo(f"Warning: {warning}", err=True)
    show = None if as_json else (lambda text: click.echo(text, nl=False))
    result = answer(opened.model, opened.tokenizer, prompt, Sampling(max_tokens, temperature, top_p), system=system, chat=chat, on_text=show)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        if not result.completion.strip():
            click.echo(EMPTY_ANSWER, nl=False)
        click.echo()
        click.echo(f"{result.tokens} tokens, {result.tokens_per_second:.1f} tokens/s", err=True)
