"""The ``macft`` command: a click group whose subcommands are imported only when they run,
so ``macft --help`` never imports MLX."""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from macft.errors import MacftError
from macft.paths import UNWRITABLE_ERRNOS, disk_full_message, is_disk_full

# name -> (module, attribute, one-line summary shown by `macft --help`)
COMMANDS = {
    "lora": ("macft.commands.lora", "lora", "Fine-tune a model (LoRA, DoRA, QLoRA, full, prompt/prefix/P-tuning, adapters)."),
    "data": ("macft.commands.data", "data", "Check and preview a dataset."),
    "import": ("macft.commands.import_gguf", "import_gguf", "Import a GGUF file as an MLX model directory."),
    "fuse": ("macft.commands.fuse", "fuse", "Merge a trained adapter into its base model."),
    "export": ("macft.commands.export", "export", "Export a model or adapter (GGUF, Ollama Modelfile, Hugging Face PEFT)."),
    "merge": ("macft.commands.merge", "merge", "Merge LoRA adapters trained on the same base into one (PEFT's methods)."),
    "serve": ("macft.commands.serve", "serve", "Serve a base and its adapters over an OpenAI-compatible HTTP API."),
    "generate": ("macft.commands.generate", "generate", "Generate text once from a prompt."),
    "chat": ("macft.commands.chat", "chat", "Chat with a model and adapter in the terminal."),
    "eval": ("macft.commands.evaluate", "evaluate", "Loss, perplexity and task metrics, base vs tuned."),
    "estimate": ("macft.commands.estimate", "estimate", "Predict peak training memory and whether it fits."),
    "recipes": ("macft.commands.recipes", "recipes", "List and show the bundled recipes."),
    "models": ("macft.commands.models", "models", "List models found on this machine."),
    "doctor": ("macft.commands.doctor", "doctor", "Check this machine's set-up (BLAS speed, llama.cpp, Ollama, caches)."),
}

# Commands that run a model, and so are many times slower on Linux without OpenBLAS.
COMPUTE_COMMANDS = {"lora", "generate", "chat", "eval", "fuse", "export", "data", "serve", "merge"}

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MacftError as exc:
            raise click.ClickException(str(exc)) from None
        except (OSError, MemoryError, RuntimeError, ImportError) as exc:
            # a full or read-only disk outside macft's atomic writes (an appended log, a cache), or no memory
            raise click.ClickException(system_error_message(exc, ctx.invoked_subcommand)) from None

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, **kwargs)
        except MemoryError:  # before a command ran (importing it): the traceback would need memory too
            click.echo(f"Error: {MEMORY_MESSAGE}", err=True)
            raise SystemExit(1) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, _, summary) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="macft")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Fine-tune language models locally on Apple Silicon with MLX, and run them in llama.cpp/Ollama.

    \b
    Quickstart (trains the embedded Gemma 3 270M on a demo task):
      macft lora
    """
    from macft import ui
    from macft.backend import missing_blas_hint

    if ctx.invoked_subcommand in COMPUTE_COMMANDS and (hint := missing_blas_hint()):
        click.echo(f"note: {hint}", err=True)
    ctx.with_resource(ui.showing_phases())  # slow phases show a spinner with their name and elapsed time


MEMORY_MESSAGE = "macft could not get the memory it needs to start; raise this process's memory limit (`ulimit -v`) or free memory."


def system_error_message(exc: BaseException, command: str | None) -> str:
    """One line for what the system refused; anything else is a bug, and re-raised with its traceback."""
    from macft.memory_limit import is_out_of_memory, out_of_memory_message
    from macft.paths import unwritable

    if is_out_of_memory(exc):
        return out_of_memory_message(f"`macft {command}`" if command else "macft")
    if isinstance(exc, OSError) and is_disk_full(exc):
        return disk_full_message(Path(exc.filename or "a file"), exc)
    if isinstance(exc, OSError) and exc.errno in UNWRITABLE_ERRNOS and exc.filename:
        return str(unwritable(Path(exc.filename), exc))
    raise exc


def main() -> None:
    cli.main(prog_name="macft")


if __name__ == "__main__":
    main()
