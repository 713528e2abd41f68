"""``macft lora``: fine-tune a model from a recipe, with flags for the usual overrides.

    macft lora                                          # recipes/quickstart.yaml
    macft lora my.yaml --iters 200 --set train.warmup_steps=20
    macft lora --model Qwen/Qwen3-0.6B --data data/ --method qlora --rank 16
    macft lora --resume runs/quickstart-20260101-120000 --iters 160
    macft lora my.yaml --hosts mac1,mac2                # data-parallel on two Macs (runs mlx.launch)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from macft.errors import MacftError
from macft.methods import CLI_CHOICES, method_spec


def flag_changes(options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Recipe changes (section -> {key: value}) asked for by first-class flags."""
    changes: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        changes.setdefault(section, {})[key] = value

    simple = {
        "model": ("model", "path"),
        "data": ("data", "train"),
        "batch_size": ("train", "batch_size"),
        "learning_rate": ("train", "learning_rate"),
        "rank": ("method", "rank"),
        "quantize_bits": ("model", "quantize_bits"),
        "out_dir": ("output", "runs_dir"),
        "name": ("output", "name"),
        "iters": ("train", "iters"),
        "init_adapter": ("method", "init_adapter"),
        "memory_budget": ("train", "memory_budget"),
    }
    for option, (section, key) in simple.items():
        if options.get(option) is not None:
            put(section, key, options[option])
    if options.get("epochs") is not None:
        put("train", "epochs", options["epochs"])
        if options.get("iters") is None:
            put("train", "iters", 0)  # epochs only count when iters is 0
    method = options.get("method")
    if method == "qlora":
        put("method", "name", "lora")
        put("model", "quantize_bits", options.get("quantize_bits") or 4)
    elif method is not None:
        put("method", "name", method)
    return changes


def resolve_recipe(recipe_name: str | None, resume: str | None, overrides: list[str], options: dict[str, Any]):
    """The one resolved Recipe, plus notes about values a flag changed: in a resumed run, and the
    learning rate when a flag changed the method but not the learning rate."""
    from macft.config import apply_overrides, load_recipe, validate

    notes: list[str] = []
    if resume:
        saved_file = Path(resume).expanduser() / "recipe.yaml"
        if not saved_file.is_file():
            raise MacftError(f"Cannot resume: {saved_file} does not exist; pass a run directory made by `macft lora`.")
        if recipe_name:
            raise MacftError("Pass either a RECIPE or --resume RUN: a resumed run uses the recipe saved in its folder.")
        saved = load_recipe(saved_file)
        recipe = apply_overrides(saved, overrides) if overrides else saved
    else:
        saved = None
        written = load_recipe(recipe_name or "quickstart")
        recipe = apply_overrides(written, overrides) if overrides else written
    changes = flag_changes(options)
    recipe = validate(recipe.replace(**changes))
    method_keys = [o.partition("=")[0].strip().removeprefix("method.") for o in overrides if o.strip().startswith("method.")]
    method_spec(recipe.method.name).check_options([*changes.get("method", {}), *method_keys], "The command line")
    if saved is None:
        rate_given = options.get("learning_rate") is not None or any(o.partition("=")[0].strip() == "train.learning_rate" for o in overrides)
        recipe, note = switched_method_rate(written, recipe, rate_given)
        notes.extend([note] if note else [])
    else:
        for section in (f.name for f in dataclasses.fields(recipe) if dataclasses.is_dataclass(getattr(recipe, f.name))):
            before, after = getattr(saved, section), getattr(recipe, section)
            for key, value in vars(after).items():
                if getattr(before, key) != value:
                    notes.append(f"Overriding the resumed run's {section}.{key}: {getattr(before, key)!r} → {value!r}.")
        recipe = recipe.replace(output={"resume": str(Path(resume).expanduser())})
    return recipe, notes


def given_method_and_model(options: dict[str, Any], overrides: tuple[str, ...], recipe) -> tuple[dict[str, Any], bool]:
    """({method key: value} the command line set, whether it named the model): what --init-adapter may not override."""
    keys = set(flag_changes(options).get("method", {})) - {"init_adapter"}
    keys |= {o.partition("=")[0].strip().removeprefix("method.") for o in overrides if o.strip().startswith("method.")}
    model_given = options.get("model") is not None or any(o.partition("=")[0].strip() == "model.path" for o in overrides)
    return {key: getattr(recipe.method, key) for key in keys if hasattr(recipe.method, key)}, model_given


def switched_method_rate(written, recipe, rate_given: bool):
    """When flags switched the recipe file's method but set no learning rate, the new method's default
    (a rate written for one method misleads another: LoRA's 2e-4 wrecks full fine-tuning)."""
    from macft.train.plan import switched_method_rate as with_method_rate

    if rate_given or recipe.method.name == written.method.name or written.train.learning_rate is None:
        return recipe, None
    return with_method_rate(recipe, (written.method.name, written.train.learning_rate))


def epochs_value(ctx, param, value: str | None) -> float | str | None:
    """``--epochs 2``, ``--epochs 0.5`` or ``--epochs auto``."""
    if value is None or value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if number <= 0:
        raise click.BadParameter(f"'{value}' is not a positive number or 'auto'.")
    return number


def shared_recipe(world, recipe):
    """Rank 0's resolved recipe on every rank."""
    from macft.config import from_dict, to_dict
    from macft.train.distributed import peer_errors

    if world.size == 1:
        return recipe
    with peer_errors(world, "Training had not started."):
        return from_dict(world.broadcast_json(to_dict(recipe) if world.main else None))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("recipe", required=False)
@click.option("--model", "-m", help="Model: a hub id, a model folder, a .gguf file, ollama:NAME[:TAG], lmstudio:NAME or gemma3-270m.")
@click.option("--data", "-d", help="Training data: a .jsonl file or a folder with train/valid/test.jsonl.")
@click.option("--method", type=click.Choice(CLI_CHOICES), help="Fine-tuning method (qlora = lora on a 4-bit base).")
@click.option("--iters", type=click.IntRange(min=1), help="Optimizer steps (overrides epochs).")
@click.option("--epochs", callback=epochs_value, help="Passes over the training data, or 'auto' (1-5 by data size and method, early stopping with validation data).")
@click.option("--batch-size", type=click.IntRange(min=1))
@click.option("--learning-rate", "--lr", type=float, help="Peak learning rate (default: the method's usual one; see the README's method table).")
@click.option("--rank", type=click.IntRange(min=1), help="LoRA/DoRA rank.")
@click.option("--init-adapter", help="Continue training a PEFT LoRA/DoRA adapter (folder or hub id); its base unless --model is given.")
@click.option("--quantize-bits", type=click.Choice(["4", "8"]), help="Quantize the frozen base at load (QLoRA).")
@click.option("--memory-budget", metavar="SIZE", help="Memory the run may use, e.g. 16GiB (default: this machine's); the planner picks checkpointing, attention blocks and micro-batches to fit.")
@click.option("--resume", type=click.Path(file_okay=False), help="Continue a run from its last checkpoint.")
@click.option("--allow-changed-inputs", is_flag=True, help="With --resume: continue even though the base model or data changed since the checkpoint.")
@click.option("--out-dir", help="Folder that holds run directories (default: runs).")
@click.option("--name", help="Run directory name (default: <recipe>-<timestamp>).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override any recipe value; repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON instead of the live view.")
@click.option("--hosts", help="Train data-parallel on these hosts, one rank each (comma-separated; runs mlx.launch).")
@click.option("--hostfile", type=click.Path(dir_okay=False), help="Train data-parallel on the hosts of this mlx.launch hostfile.")
def lora(
    recipe: str | None,
    resume: str | None,
    overrides: tuple[str, ...],
    as_json: bool,
    hosts: str | None,
    hostfile: str | None,
    allow_changed_inputs: bool,
    **options: Any,
) -> None:
    """Fine-tune a model. With no RECIPE, runs recipes/quickstart.yaml (Gemma 3 270M, a demo task).

    RECIPE is a YAML file or the name of a bundled recipe; flags and --set override its values.
    The run directory gets the adapter, checkpoints, metrics, summary.json and loss.png.

    \b
    Examples:
      macft lora
      macft lora quickstart --iters 40 --set train.learning_rate=5e-4
      macft lora --model Qwen/Qwen3-0.6B --data data/ --method qlora --rank 16
      macft lora --model ollama:qwen3:0.6b --data data/ --epochs auto
      macft lora long-context --memory-budget 16GiB --set data.max_seq_length=32768
      macft lora --resume runs/quickstart-20260101-120000
      macft lora --init-adapter org/peft-adapter --data data/
      macft lora my.yaml --hosts 192.168.1.10,192.168.1.11

    With --hosts or --hostfile every host needs macft at the same path and the recipe and data
    (the README says how to set up two Macs); train.batch_size is the global batch.
    """
    from macft import ui
    from macft.objectives import objective_named
    from macft.train.distributed import connect, launched
    from macft.train.run import loss_history, run_demo, run_training

    if (hosts or hostfile) and not launched():
        from macft.train.launch import launch_ranks

        raise SystemExit(launch_ranks(hosts, hostfile))
    world = connect()
    if options.get("quantize_bits") is not None:
        options["quantize_bits"] = int(options["quantize_bits"])
    if resume and not world.main:  # the run folder is on rank 0; its recipe comes from there
        resolved, notes = None, []
    else:
        resolved, notes = resolve_recipe(recipe, resume, list(overrides), options)
        if resolved.method.init_adapter and not resume:
            from macft.adapters.peft import peft_recipe

            resolved, peft_notes = peft_recipe(resolved, *given_method_and_model(options, overrides, resolved))
            notes.extend(peft_notes)
    if resume:
        resolved = shared_recipe(world, resolved)
    title = f"{resolved.name} · {resolved.method.name}" + (f" · {world.size} ranks ({world.backend})" if world.size > 1 else "")
    view = ui.TrainingView(title=title, quiet=as_json or not world.main, metrics=objective_named(resolved.train.objective).metrics)
    for note in notes:
        view.on_note(note)
    with view:
        outcome = run_training(resolved, view, world, allow_changed_inputs=allow_changed_inputs)
    result = outcome.result
    if not world.main:  # rank 0 reports for every rank; a failing status here would make mlx.launch stop it first
        return
    if result.stop_reason == "interrupted":
        resumable = (outcome.run_dir / "checkpoints" / "last").is_dir()
        resume = f"macft lora --resume {outcome.run_dir}" if resumable else None
        if as_json:
            click.echo(json.dumps({**outcome.summary.to_dict(), "resume_command": resume}, indent=2))
        else:
            click.echo(f"{result.message} Resume with: {resume}" if resume else result.message)
        raise SystemExit(128 + (result.signal or 2))  # 130 after Ctrl-C, 143 after SIGTERM, as the shell reports them
    demo = None if result.failed else run_demo(outcome)
    if as_json:
        payload = outcome.summary.to_dict()
        if demo is not None:
            payload["demo"] = {"examples": demo.examples, "total": demo.total, "base_exact": demo.base_exact, "tuned_exact": demo.tuned_exact}
        click.echo(json.dumps(payload, indent=2))
    else:
        ui.show_notes(outcome.notes)
        ui.show_summary(outcome.summary, curve=loss_history(outcome.run_dir / "metrics.jsonl"))
        if demo is not None:
            ui.show_demo(demo)
    if result.failed:
        raise MacftError(result.message)
