"""``macft data check PATH``: validate a dataset and show how a model will see it.

    macft data check data/ --model path/to/model --max-seq-length 1024
    macft data check train.jsonl --json
"""

from __future__ import annotations

import json

import click

from macft.config import DEFAULT_MODEL, DataConfig, TrainConfig


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def data() -> None:
    """Check and preview a dataset."""


@data.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True, help="Model whose tokenizer to use.")
@click.option("--max-seq-length", type=click.IntRange(min=8), default=DataConfig.max_seq_length, show_default=True,
              help="Examples are cut to this many tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), default=TrainConfig.batch_size, show_default=True,
              help="Batch size for the padding estimates.")
@click.option("--mask-prompt/--no-mask-prompt", default=DataConfig.mask_prompt, show_default=True,
              help="Train on completions and assistant turns only, or on every token.")
@click.option("--chat-template/--no-chat-template", default=None,
              help="Render chat and prompt/completion data with the chat template [default: when the model has one].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(
    path: str, model: str, max_seq_length: int, batch_size: int, mask_prompt: bool, chat_template: bool | None, as_json: bool
) -> None:
    """Validate every line of PATH (a .jsonl file or a folder with train/valid/test.jsonl) and report
    counts, token lengths, truncation, duplicates, padding with and without packing, and one example
    with its trained tokens highlighted. Preference pairs (prompt/chosen/rejected) and GRPO prompt
    sets get their own report: pairs, chosen/rejected lengths, truncation, identical pairs.

    \b
    Example:
      macft data check data/ --model Qwen/Qwen3-0.6B --max-seq-length 1024
    """
    from mlx_lm.utils import load_tokenizer

    from macft.data.check import check_data
    from macft.models.load import resolve_model_dir

    model_dir, _ = resolve_model_dir(model)
    tokenizer = load_tokenizer(model_dir)
    data_cfg = DataConfig(
        train=path, max_seq_length=max_seq_length, mask_prompt=mask_prompt, use_chat_template=chat_template
    )
    kind = alignment_kind(path)
    if kind != "sft":
        from macft.align.check import check_alignment_data

        aligned = check_alignment_data(data_cfg, tokenizer, kind)
        if as_json:
            click.echo(json.dumps({"path": path, "model": model, **aligned.to_dict()}, indent=2))
        else:
            render_alignment(aligned, path, model)
        return
    report = check_data(data_cfg, tokenizer, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps({"path": path, "model": model, **report.to_dict()}, indent=2))
    else:
        render(report, path, model)


def alignment_kind(path: str) -> str:
    """"pairs", "prompts" or "sft": what the training file (or a folder's train.jsonl) holds."""
    from pathlib import Path

    from macft.data.preference import dataset_kind

    target = Path(path)
    target = target / "train.jsonl" if target.is_dir() else target
    return dataset_kind(target) if target.is_file() else "sft"


def render(report, path: str, model: str) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    console.print(f"[bold]{path}[/bold] with the tokenizer of [bold]{model}[/bold], "
                  f"max_seq_length {report.max_seq_length}")
    counts = Table("split", "examples", "trained tokens", "truncated", "dropped", "duplicates", show_edge=False)
    lengths = Table("tokens per example", "min", "mean", "median", "p95", "max", show_edge=False)
    for name, split in report.splits.items():
        formats = ", ".join(f"{fmt} {n}" for fmt, n in sorted(split.formats.items()))
        console.print(f"{name}: {split.source} ({formats})", highlight=False)
        counts.add_row(name, str(split.examples), str(split.trained_tokens), _warn(split.truncated),
                       _warn(split.dropped), _warn(split.duplicates))
        stats = split.lengths
        lengths.add_row(name, str(stats["min"]), f"{stats['mean']:.1f}", f"{stats['median']:.0f}",
                        f"{stats['p95']:.0f}", str(stats["max"]))
    console.print(counts)
    console.print(lengths)
    for name, count in report.overlap.items():
        console.print(f"{name} examples also in train: {_warn(count)}")
    if report.padding:
        pad = report.padding
        console.print(
            f"padding at batch size {report.batch_size}: random {pad['random']:.1%}, "
            f"length-bucketed {pad['bucketed']:.1%}, packed {pad['packed']:.1%}"
        )
    if report.preview:
        legend = "[reverse green]trained[/reverse green], [dim]not trained[/dim]"
        console.print(f"\n[bold]{report.preview_source}[/bold] ({legend}):")
        text = Text()
        for run, trained in report.preview:
            text.append(run, style="reverse green" if trained else "dim")
        console.print(text)


def render_alignment(report, path: str, model: str) -> None:
    """``macft data check`` on preference pairs or GRPO prompts (a ``macft.align.check.AlignDataReport``)."""
    from rich.console import Console
    from rich.table import Table

    out = Console()
    out.print(f"[bold]{path}[/bold] ({report.kind}) with the tokenizer of [bold]{model}[/bold], max_seq_length {report.max_seq_length}")
    if report.kind == "pairs":
        table = Table("split", "pairs", "chosen tokens (mean/max)", "rejected tokens (mean/max)", "truncated", "dropped",
                      "identical", "duplicates", show_edge=False)
        for name, split in report.splits.items():
            c, r = split.chosen_lengths, split.rejected_lengths
            table.add_row(name, str(split.pairs), f"{c['mean']:.1f}/{c['max']}", f"{r['mean']:.1f}/{r['max']}",
                          _warn(split.truncated), _warn(split.dropped), _warn(split.identical), _warn(split.duplicates))
    else:
        table = Table("split", "prompts", "tokens (mean/max)", "fields for the rewards", show_edge=False)
        for name, split in report.splits.items():
            fields = ", ".join(f"{k} {n}" for k, n in sorted(split.fields.items())) or "none"
            table.add_row(name, str(split.prompts), f"{split.lengths['mean']:.1f}/{split.lengths['max']}", fields)
    out.print(table)


def _warn(count: int) -> str:
    return f"[yellow]{count}[/yellow]" if count else "0"
