"""`macft estimate`: predict peak training memory from a model's config and say whether it fits."""

from __future__ import annotations

import dataclasses
import json

import click

from macft import ui
from macft.methods import CLI_CHOICES
from macft.models.spec import DEFAULT_MODEL
from macft.objectives import OBJECTIVE_NAMES


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "-m", "model_spec", default=DEFAULT_MODEL, show_default=True, help="Hub id, model folder, .gguf file or gemma3-270m.")
@click.option("--method", type=click.Choice(CLI_CHOICES), default="lora", show_default=True, help="Fine-tuning method (qlora = lora on a 4-bit base); other methods' options at their recipe defaults.")
@click.option("--batch", "-b", type=click.IntRange(min=1), default=4, show_default=True, help="Batch size.")
@click.option("--seq", "-s", type=click.IntRange(min=8), default=512, show_default=True, help="Sequence length in tokens.")
@click.option("--rank", "-r", type=click.IntRange(min=1), default=8, show_default=True, help="LoRA/DoRA rank.")
@click.option("--targets", default="q_proj,k_proj,v_proj,o_proj", show_default=True, help="Comma-separated adapted modules.")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None, help="Layer checkpointing (default: the planner turns it on when needed).")
@click.option("--attention-block", type=click.IntRange(min=-1), default=0, show_default=True, help="Queries per attention block, as train.attention_block (0 = the planner's choice, -1 = MLX's fused attention).")
@click.option("--loss-chunk", type=click.IntRange(min=0), default=0, show_default=True, help="Positions per loss chunk, as train.loss_chunk_size (0 = automatic).")
@click.option("--memory", "memory_gb", type=click.FloatRange(min=0.1), default=None, help="Plan for an Apple Silicon Mac with this many GB of RAM (bfloat16 compute) instead of this machine.")
@click.option("--objective", type=click.Choice(OBJECTIVE_NAMES), default="sft", show_default=True, help="train.objective, at its default align settings: a preference pair takes two rows, a GRPO prompt align.group_size; objectives with a reference model hold a frozen copy of the base with --method full.")
@click.option("--ranks", type=click.IntRange(min=1), default=1, show_default=True, help="Plan one of this many data-parallel ranks (Macs) sharing the batch.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def estimate(model_spec, method, batch, seq, rank, targets, grad_checkpoint, attention_block, loss_chunk, memory_gb, objective, ranks, as_json):
    """Predict the peak memory of training MODEL and whether it fits this machine.

    Only the model's config (config.json or GGUF metadata) is read; no weights are loaded. Settings
    not given are chosen as `macft lora` chooses them: the cheapest that fit (attention blocks,
    checkpointing; `macft lora` may also split the batch into micro-batches).

    \b
    Examples:
      macft estimate --model Qwen/Qwen3-0.6B --method qlora --batch 4 --seq 1024
      macft estimate --model mistralai/Mistral-7B-Instruct-v0.3 --method qlora --memory 16
      macft estimate --model gemma3-270m --method full --batch 8 --seq 256 --json
      macft estimate --model Qwen/Qwen3-0.6B --method full --batch 16 --ranks 2 --memory 16
      macft estimate --model gemma3-270m --method full --objective dpo --batch 4 --seq 256
      macft estimate --model gemma3-270m --batch 1 --seq 32768 --memory 16
    """
    from macft.memory import MAC_SETTINGS, Freedom, Plan, backend_settings, choose_settings, mac_working_set
    from macft.methods import MethodConfig, method_spec
    from macft.models.shape import read_model_shape
    from macft.objectives import AlignConfig, objective_named
    from macft.units import GIB

    if memory_gb is not None:
        available, settings = mac_working_set(int(memory_gb * GIB)), MAC_SETTINGS
    else:
        from macft.backend import machine_memory_bytes

        available, settings = machine_memory_bytes(), backend_settings()
    spec, goal = method_spec(method), objective_named(objective)
    plan = Plan(
        method=method,
        batch=batch,
        seq=seq,
        settings=MethodConfig(name=spec.name, rank=rank, target_modules=tuple(t.strip() for t in targets.split(",") if t.strip())),
        grad_checkpoint=bool(grad_checkpoint),
        attention_block=attention_block if attention_block > 0 else None,
        loss_chunk_size=loss_chunk,
        ranks=ranks,
        objective=objective,
        rows_per_example=goal.rows_per_example(AlignConfig()),
        reference_copy=goal.needs_reference and not spec.switchable,
        **settings,
    )
    free = Freedom(checkpoint=grad_checkpoint is None, attention=attention_block == 0 and spec.block_attention, micro_batches=False)
    choice = choose_settings(read_model_shape(model_spec), plan, available, free)
    result = dataclasses.replace(choice.estimate, notes=[f"Chosen: {reason}." for reason in choice.reasons] + choice.estimate.notes)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    ui.show_estimate(result, memory_gb)
