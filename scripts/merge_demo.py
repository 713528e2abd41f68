"""Two task adapters on the embedded Gemma 3 270M, merged into one: how much of each task the merge keeps.

Trains the quickstart recipe (sentence → JSON record) and the dates recipe (date in words → ISO date)
with `macft lora`, merges the two adapters with `macft merge` for each method, then serves every
adapter at once with `macft serve` and scores exact match on both tasks' 40 held-out test examples:
greedy completions of each prompt (the tasks train without a chat template), compared with the
reference after stripping whitespace, as `macft eval` compares them. The llama.cpp engine serves by
default because it is several times faster on a CPU; ``--engine mlx`` scores with MLX instead.
Prints a table and writes the numbers as JSON.

    python scripts/merge_demo.py                                  # train (2 runs), merge, score
    python scripts/merge_demo.py --runs-dir runs/merge-demo       # reuses runs already trained there
    python scripts/merge_demo.py --json scripts/results/merge-demo.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import print_and_write, report_header

from macft.paths import PROJECT_ROOT, RECIPES_DIR

TASKS = {"json": "quickstart", "dates": "dates"}  # task -> bundled recipe; its data's test split is scored
MERGES = {  # name -> `macft merge` options (two adapters, in TASKS' order, weight 1 each)
    "linear": ["--method", "linear"],
    "cat": ["--method", "cat"],
    "ties": ["--method", "ties", "--density", "0.5"],
    "dare": ["--method", "dare", "--density", "0.5"],
    "dare_ties": ["--method", "dare_ties", "--density", "0.5"],
}


def macft_command(*args: str) -> None:
    print("$ macft " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "macft.cli", *args], check=True, stdout=subprocess.DEVNULL)


def train(runs_dir: Path) -> None:
    """Train each task's adapter unless its run is already there."""
    for task, recipe in TASKS.items():
        if not (runs_dir / task / "adapters.safetensors").is_file():
            macft_command("lora", recipe, "--out-dir", str(runs_dir), "--name", task, "--json")


def test_records(task: str) -> list[dict]:
    path = RECIPES_DIR / "data" / TASKS[task] / "test.jsonl"  # the recipe's data folder
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score(runs_dir: Path, adapters: list[str], engine: str, max_tokens: dict[str, int]) -> dict[str, dict[str, float]]:
    """adapter -> task -> exact match, from one `macft serve` of every run in ``runs_dir``."""
    from openai import OpenAI

    command = [sys.executable, "-m", "macft.cli", "serve", "--adapter", str(runs_dir), "--engine", engine, "--port", "0"]
    print("$ macft " + " ".join(command[3:]), flush=True)
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if " on " not in line:
            raise SystemExit(f"macft serve did not start: {line!r}")
        client = OpenAI(base_url=line.split(" on ")[1].split()[0], api_key="unused", max_retries=0, timeout=600)
        table: dict[str, dict[str, float]] = {}
        for adapter in adapters:
            table[adapter] = {}
            for task in TASKS:
                records = test_records(task)
                hits = 0
                for record in records:
                    answer = client.completions.create(model=adapter, prompt=record["prompt"], temperature=0, max_tokens=max_tokens[task])
                    hits += answer.choices[0].text.strip() == record["completion"].strip()
                table[adapter][task] = hits / len(records)
            print(f"{adapter:>16}: " + "  ".join(f"{t} {v:.1%}" for t, v in table[adapter].items()), flush=True)
        return table
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", type=Path, default=PROJECT_ROOT / "runs" / "merge-demo")
    parser.add_argument("--engine", choices=("llama.cpp", "mlx"), default="llama.cpp", help="the engine `macft serve` scores with")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    started = time.time()
    train(args.runs_dir)
    for name, options in MERGES.items():
        macft_command("merge", *(str(args.runs_dir / t) for t in TASKS), *options, "--out", str(args.runs_dir / f"merge-{name}"))
    # room for each task's longest answer (a JSON record is about 25 tokens, an ISO date 8)
    max_tokens = {"json": 40, "dates": 16}
    table = score(args.runs_dir, [*TASKS, *(f"merge-{name}" for name in MERGES)], args.engine, max_tokens)
    trained = {task: round(json.loads((args.runs_dir / task / "summary.json").read_text())["train_seconds"], 1) for task in TASKS}
    result = {
        **report_header("scripts/merge_demo.py"),
        "engine": args.engine,
        "training_seconds": trained,
        "total_seconds": round(time.time() - started, 1),
        "merges": {name: " ".join(options) for name, options in MERGES.items()},
        "exact_match": table,
    }
    print_and_write(result, args.json)


if __name__ == "__main__":
    main()
