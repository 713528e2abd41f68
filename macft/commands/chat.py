"""`macft chat`: a streaming chat in the terminal, with adapter swapping and base-vs-tuned compare."""

from __future__ import annotations

import click

from macft import ui
from macft.engines import ENGINES


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "-m", "model_spec", default=None, help="Hub id, model folder, .gguf file or gemma3-270m (default: the adapter's base, else gemma3-270m).")
@click.option("--adapter", "-a", default=None, help="A run directory from `macft lora`, or a PEFT LoRA/DoRA adapter (folder or hub id).")
@click.option("--system", "-s", default=None, help="A system prompt.")
@click.option("--max-tokens", "-n", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--temperature", "-t", type=click.FloatRange(min=0.0), default=0.7, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0), default=0.95, show_default=True)
@click.option("--engine", type=click.Choice(ENGINES), default="mlx", show_default=True, help="llama.cpp: generate with the model's cached Q8_0 GGUF export (needs llama-cpp-python; several times faster on a CPU).")
def chat(model_spec, adapter, system, max_tokens, temperature, top_p, engine):
    """Chat with a model (and a trained adapter) in the terminal; answers stream as they are generated.

    Type a message and press Enter. /help lists the commands: /reset, /adapter PATH (switch adapters
    without reloading the base), /compare (base vs tuned on the last prompt), /quit.

    \b
    Examples:
      macft chat --adapter runs/quickstart
      macft chat --adapter runs/quickstart --engine llama.cpp
      macft chat -m Qwen/Qwen3-0.6B --system "Answer in one sentence." --temperature 0
    """
    from macft.chat import EMPTY_ANSWER, HELP, ChatSession, Sampling, open_model, parse, shown
    from macft.errors import MacftError

    opened = open_model(model_spec, adapter, engine)
    session = ChatSession(opened, system=system, sampling=Sampling(max_tokens, temperature, top_p))
    for warning in opened.warnings:
        click.echo(f"Warning: {warning}", err=True)
    name = opened.loaded.identity.get("source", "model")
    click.echo(f"Chatting with {name}" + (f" + {opened.adapter}" if opened.adapter else "") + ". /help for commands, /quit to leave.")
    import sys

    while True:
        click.echo(">>> ", nl=False)
        line = sys.stdin.readline()
        if not line:  # end of input
            click.echo()
            return
        try:
            command = parse(line)
            if command.name == "say":
                if command.argument:
                    answer = ""
                    for piece in session.reply(command.argument):
                        answer += piece
                        click.echo(piece, nl=False)
                    if not answer.strip():
                        click.echo(EMPTY_ANSWER, nl=False)
                    click.echo()
            elif command.name in ("adapter", "compare") and engine != "mlx":
                raise MacftError(f"/{command.name} needs the MLX engine; restart without --engine {engine}.")
            elif command.name == "quit":
                return
            elif command.name == "help":
                click.echo(HELP)
            elif command.name == "reset":
                session.reset()
                click.echo("(new conversation)")
            elif command.name == "adapter":
                session.set_adapter(command.argument or None)
                for warning in opened.warnings:
                    click.echo(f"Warning: {warning}", err=True)
                click.echo(f"(adapter: {opened.adapter or 'none'})")
            elif command.name == "compare":
                base, tuned = session.compare()
                ui.show_side_by_side(shown(base), shown(tuned))
        except MacftError as exc:
            click.echo(f"Error: {exc}")
