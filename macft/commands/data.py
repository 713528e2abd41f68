"""``macft data check PATH``: validate a dataset and show how a model will see it.

    macft data check data/ --model path/to/model --max-seq-length 1024
    macft data check train.jsonl --json
"""

from __future__ import annotations

import json

import click

from macft import ui
from macft.config import TrainConfig
from macft.data.splits import DataConfig
from macft.models.spec import DEFAULT_MODEL


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
    with its trained tokens highlighted. Preference pairs (prompt/chosen/rejected), GRPO prompt sets
    and KTO feedback (prompt/completion/label) get their own report: chosen/rejected lengths and
    identical pairs, the fields the rewards see, the label balance.

    \b
    Example:
      macft data check data/ --model Qwen/Qwen3-0.6B --max-seq-length 1024
    """
    from macft.data.check import DataReport
    from macft.models.load import resolve_model_dir
    from macft.models.tokenizer_cache import load_tokenizer
    from macft.objectives import AlignConfig

    model_dir, _ = resolve_model_dir(model)
    tokenizer = load_tokenizer(model_dir)
    data_cfg = DataConfig(
        train=path, max_seq_length=max_seq_length, mask_prompt=mask_prompt, use_chat_template=chat_template
    )
    report = data_shape(path).check(data_cfg, tokenizer, AlignConfig(), batch_size=batch_size)
    if as_json:
        click.echo(json.dumps({"path": path, "model": model, **report.to_dict()}, indent=2))
    elif isinstance(report, DataReport):
        ui.show_data_report(report, path, model)
    else:
        ui.show_table_report(report, path, model)


def data_shape(path: str):
    """The data shape (``macft.data.shapes.DataShape``) the training file, or a folder's train.jsonl, holds."""
    from pathlib import Path

    from macft.data.examples import EXAMPLES
    from macft.objectives import data_shape_of

    target = Path(path)
    target = target / "train.jsonl" if target.is_dir() else target
    return data_shape_of(target) if target.is_file() else EXAMPLES
