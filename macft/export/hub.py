"""What ``--push-to-hub REPO`` on ``export peft``, ``export gguf`` and ``fuse`` uploads besides the files:
which of an output folder's files go, and the model card that describes the run behind them.

    token = hub_token("me/my-adapter")                 # macft.hub: before any work, offline or logged out is one line
    card = model_card(base, run_facts(run_dir), kind="peft", title="my-adapter")
    url = push_files({"adapter_config.json": path, ...}, card, "me/my-adapter", token)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from macft.errors import MacftError

def folder_files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """The files of an output folder to upload: all but macft's records (they hold local paths) and hidden files."""
    return {
        p.relative_to(folder).as_posix(): p
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file() and not p.name.startswith(".") and p.name not in skip and p.name != "README.md"
    }


# ---------------------------------------------------------------------------- the model card


@dataclass
class RunFacts:
    """What a model card says about the run behind an upload."""

    method: str | None = None
    options: dict = field(default_factory=dict)  # rank, alpha, target modules, layers
    data: list[str] = field(default_factory=list)  # data files (names only: local paths stay local)
    examples: int | None = None  # training examples
    metrics: dict = field(default_factory=dict)


def run_facts(run_dir: str | Path | None) -> RunFacts:
    """Method, data and metrics of a run directory (an empty record for None or a folder without them)."""
    facts = RunFacts()
    if run_dir is None:
        return facts
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    facts.method = config.get("method")
    if facts.method in ("lora", "dora"):
        layers = config.get("num_layers", -1)
        facts.options = {
            "rank": config.get("rank"),
            "alpha": config.get("alpha"),
            "target modules": ", ".join(config.get("target_modules", [])),
            "layers": "all" if layers in (-1, None) else f"last {layers}",
        }
    if (run_dir / "recipe.yaml").is_file():
        from macft.config import load_recipe
        from macft.data.splits import data_files

        recipe = load_recipe(run_dir / "recipe.yaml")
        try:
            files = data_files(recipe.data)
        except MacftError:
            files = {}
        facts.data = [f"{split}: {path.name}" for split, path in files.items()]
        if "train" in files:
            with files["train"].open(errors="replace") as fh:
                facts.examples = sum(1 for line in fh if line.strip())
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    wanted = ("steps", "tokens_seen", "final_train_loss", "best_val_loss", "final_val_loss")
    facts.metrics = {key: summary[key] for key in wanted if summary.get(key) is not None}
    return facts


CARD_USE = {
    "peft": (
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        "base = AutoModelForCausalLM.from_pretrained(\"{base}\")\nmodel = PeftModel.from_pretrained(base, \"{location}\")\n```"
    ),
    "gguf": "```sh\nllama-cli -hf {location}\n```",
    "fused": "```sh\nmlx_lm.generate --model {location} --prompt \"Hello\"\n```",
}


def model_card(base: str | None, facts: RunFacts, *, kind: str, title: str, location: str) -> str:
    """A Hugging Face model card (README.md with YAML metadata) for ``kind`` peft, gguf or fused output at
    ``location`` (its hub repo, or a local folder)."""
    tags = ["macft", *([facts.method] if facts.method else []), *(["gguf"] if kind == "gguf" else [])]
    meta = [f"library_name: {'peft' if kind == 'peft' else 'mlx' if kind == 'fused' else 'gguf'}", "pipeline_tag: text-generation"]
    hub_base = base if base and base.count("/") == 1 and not Path(base).expanduser().exists() else None
    if hub_base:
        meta.insert(0, f"base_model: {hub_base}")
    meta.append("tags:\n" + "".join(f"- {t}\n" for t in tags).rstrip("\n"))
    lines = ["---", *meta, "---", "", f"# {title}", ""]
    what = {"peft": "A PEFT adapter", "gguf": "A GGUF model", "fused": "A model"}[kind]
    method = f" ({facts.method}" + "".join(f", {k} {v}" for k, v in facts.options.items()) + ")" if facts.method else ""
    lines.append(f"{what} fine-tuned from {f'[{hub_base}](https://huggingface.co/{hub_base})' if hub_base else base or 'its base model'} with macft{method}.")
    if facts.data:
        lines += ["", "## Training data", "", *[f"- {d}" for d in facts.data]]
        if facts.examples is not None:
            lines.append(f"- {facts.examples} training examples")
    if facts.metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {v:.4g} |" if isinstance(v, float) else f"| {k.replace('_', ' ')} | {v} |" for k, v in facts.metrics.items()]
    lines += ["", "## Use", "", CARD_USE[kind].format(base=base or "BASE", location=location), ""]
    return "\n".join(lines)
