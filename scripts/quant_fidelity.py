"""How much of a fine-tune each GGUF export keeps: every quant type, plain and guided, against the fused float model.

    python scripts/quant_fidelity.py --run runs/quickstart-20261130 --name quickstart
    python scripts/quant_fidelity.py --run runs/wikisql --name wikisql --completion-after "A:"

For each export the run's validation examples are read teacher-forced by llama.cpp (llama-cpp-python)
and compared with the fused float model (MLX) at the completion tokens: completion loss per token,
top-1 agreement with the float model, and examples whose every completion token is top-1. "plain"
is llama-quantize's types and rounding (``--plain``); "guided" uses the run's importance matrix and
delta-aware types (the default of ``macft export gguf --adapter``). Also scored: the untrained base
exported to F16. Results go to ``scripts/results/quant-fidelity-<name>.json``; ``--table FILE`` prints
one as the README's markdown table.

    python scripts/quant_fidelity.py --table scripts/results/quant-fidelity-quickstart.json
Quality numbers only: the export times in the file are wall clock on whatever machine ran it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from macft.config import load_recipe
from macft.data import read_records
from macft.data.splits import data_files
from macft.evaluate import EvalOptions, prepare
from macft.export.fidelity import Positions, compare, llama_cpp_positions, mlx_positions
from macft.export.fuse import load_fused
from macft.export.pipeline import export_gguf

ROWS = [  # in the order they are measured: what the README needs first
    "f16:plain",
    "q4_k_m:plain",
    "q4_k_m:guided",
    "q5_k_m:guided",
    "q6_k:guided",
    "q8_0:guided",
    "base:f16",
    "q5_k_m:plain",
    "q6_k:plain",
    "q8_0:plain",
]


def validation_items(run: Path, tokenizer, completion_after: str | None, limit: int) -> list:
    """The run's validation records, tokenized as training did, with only the answer counted."""
    recipe = load_recipe(run / "recipe.yaml")
    records = read_records(data_files(recipe.data)["valid"])
    options = EvalOptions(max_examples=limit, completion_after=completion_after, max_seq_length=recipe.data.max_seq_length)
    return prepare(records, tokenizer, options)


def summary(reference: Positions, exported: Positions) -> dict:
    report = compare(reference, exported, "llama.cpp", "")
    return {k: getattr(report, k) for k in ("tokens", "export_loss", "float_loss", "agreement", "export_exact", "float_exact")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--name")
    parser.add_argument("--completion-after", default=None, help="split text records here (WikiSQL: 'A:')")
    parser.add_argument("--examples", type=int, default=0, help="validation examples (0: all)")
    parser.add_argument("--only", nargs="*", default=None, help="e.g. q4_k_m:guided f16:plain")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table", type=Path, default=None, help="print this results file as a markdown table and stop")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.table.read_text())))
        return
    if not args.run or not args.name:
        parser.error("--run and --name are needed to measure")
    run = args.run
    results_file = args.out or Path(__file__).parent / "results" / f"quant-fidelity-{args.name}.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"rows": {}}

    loaded, _, _ = load_fused(run, dequantize=True)
    items = validation_items(run, loaded.tokenizer, args.completion_after, args.examples)
    reference = mlx_positions(loaded.model, items)
    results.update(run=str(run), examples=len(items), float_completion_loss=float(np.concatenate(reference.losses).mean()))

    work = run / "quant-fidelity"
    work.mkdir(exist_ok=True)
    for label in ROWS:
        if args.only and label not in args.only:
            continue
        quant, kind = label.split(":")
        out = work / f"{quant}-{kind}.gguf"
        start = time.time()
        if quant == "base":
            row = {"types": export_base(run, out)}
        else:
            report = export_gguf(adapter=str(run), quant=quant, out=out, plain=kind == "plain", fidelity_examples=0)
            row = {"types": report.gguf["types"], "guided": report.gguf.get("guided")}
        row.update(export_seconds=round(time.time() - start, 1), size_bytes=out.stat().st_size)
        row.update(summary(reference, llama_cpp_positions(out, items)))
        results["rows"][label] = row
        print(label, {k: row[k] for k in ("size_bytes", "export_loss", "agreement", "export_exact")}, flush=True)
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2))
        out.unlink()


TABLE_ORDER = ["f16:plain", "q8_0:plain", "q8_0:guided", "q6_k:plain", "q6_k:guided", "q5_k_m:plain", "q5_k_m:guided", "q4_k_m:plain", "q4_k_m:guided-budget12", "q4_k_m:guided", "base:f16"]


def markdown_table(results: dict) -> str:
    """File size, size against plain Q4_K_M, completion loss (and x F16's), top-1 agreement, exact answers."""
    rows = results["rows"]
    plain_q4 = rows["q4_k_m:plain"]["size_bytes"]
    f16_loss = rows["f16:plain"]["export_loss"]
    lines = [
        "| export | file size | vs plain Q4_K_M | completion loss per token | × F16's | top-1 agreement with float | exact answers |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in TABLE_ORDER:
        if label not in rows:
            continue
        row = rows[label]
        quant, kind = label.split(":")
        kind = kind.replace("-budget12", " within 12% (before)")  # a row kept from the earlier budget
        name = "base model, untrained (F16)" if quant == "base" else quant.upper() + ("" if quant == "f16" else f", {kind}")
        lines.append(
            f"| {name} | {row['size_bytes'] / 1e6:.1f} MB | {row['size_bytes'] / plain_q4:.3f}× | {row['export_loss']:.4f} "
            f"| {row['export_loss'] / f16_loss:.2f} | {row['agreement']:.2%} | {row['export_exact']}/{results['examples']} |"
        )
    return "\n".join(lines)


def export_base(run: Path, out: Path) -> dict:
    """The untrained base the run started from, as an F16 GGUF."""
    from macft.export.fuse import dequantize_model, origin_gguf
    from macft.export.gguf_writer import write_gguf

    from macft.run_base import load_run_base

    base = load_run_base(run)
    dequantize_model(base.model)
    return write_gguf(base.model, base.config, base.family, out, "f16", tokenizer_dir=base.path, tokenizer_gguf=origin_gguf(base.path)).types


if __name__ == "__main__":
    main()
