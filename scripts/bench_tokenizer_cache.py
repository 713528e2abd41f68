"""What macft's tokenizer cache buys, and what its format costs: the time to load a model's tokenizer
and a training run's time to its first step, each in fresh processes, interleaved and repeated.

Loading (the embedded Gemma 3 270M's 262k-word tokenizer unless --model says otherwise), each a
fresh Python process timing only the load (imports excluded):

  mlx-lm         mlx_lm.utils.load_tokenizer from the model's files (what the cache saves)
  pickle         pickle.loads of mlx-lm's tokenizer, as macft's cache stored it before (it ran code on load)
  macft cache    macft.models.tokenizer_cache.load_tokenizer from a filled cache entry (data, not code)

Time to first step: ``macft lora --iters 1`` from process start to its first step report, on a fresh
copy of a small data file each round (its tokens are not cached, so the run needs the tokenizer),
with the tokenizer cache filled. ``--before PATH`` runs the same command from another checkout of
macft (PYTHONPATH), interleaved, for a before/after comparison.

    python scripts/bench_tokenizer_cache.py --rounds 5
    python scripts/bench_tokenizer_cache.py --rounds 5 --before /path/to/older/macft --out /tmp/tok.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LOAD = {
    "mlx-lm": "from mlx_lm.utils import load_tokenizer as load\nstart = time.perf_counter()\nload(model_dir)",
    "pickle": "import pickle\nfrom mlx_lm.utils import load_tokenizer\nblob = pickle.dumps(load_tokenizer(model_dir))\n"
              "start = time.perf_counter()\npickle.loads(blob)",
    "macft cache": "from macft.models.tokenizer_cache import load_tokenizer as load\nload(model_dir)\n"
                   "start = time.perf_counter()\nload(model_dir)",
}
HEADER = "import sys, time\nimport macft\nfrom pathlib import Path\nmodel_dir = Path(sys.argv[1])\n"


def load_seconds(kind: str, model_dir: Path, env: dict) -> float:
    code = HEADER + LOAD[kind] + "\nprint(time.perf_counter() - start)\n"
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def first_step_seconds(root: Path, model: str, data: Path, runs: Path, env: dict) -> float:
    fresh = runs / f"data-{time.time_ns()}.jsonl"  # new contents' name: the tokenized-data cache misses
    fresh.write_text(data.read_text() + json.dumps({"text": f"round {time.time_ns()}"}) + "\n")
    command = [sys.executable, "-m", "macft.cli", "lora", "--model", model, "--data", str(fresh), "--iters", "1",
               "--out-dir", str(runs), "--name", fresh.stem, "--set", "demo.count=0", "--set", "train.report_every=1"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**env, "PYTHONPATH": str(root)})
    seconds = None
    for line in process.stdout:
        if seconds is None and line.startswith("step 1/"):
            seconds = time.perf_counter() - start
    if process.wait() != 0 or seconds is None:
        raise SystemExit(f"macft lora failed from {root}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another macft checkout to compare the time to first step with")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from macft.models.load import resolve_model_dir

    model_dir, _ = resolve_model_dir(args.model)  # imports the GGUF once, in the usual macft home
    env = dict(os.environ)
    data = Path(tempfile.mkdtemp(prefix="bench-tokenizer-data-")) / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: two plus {i}?", "completion": f" {i + 2}"}) + "\n" for i in range(32)))
    runs = data.parent

    systems = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    for root in systems.values():  # fills each checkout's tokenizer cache (the formats differ) and compiles
        first_step_seconds(root, args.model, data, runs, env)
    results: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for kind in LOAD:
            results.setdefault(f"load: {kind}", []).append(load_seconds(kind, model_dir, env))
        for label, root in systems.items():
            results.setdefault(f"first step: {label}", []).append(first_step_seconds(root, args.model, data, runs, env))
    summary = {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for name, v in results.items()}
    for name, values in summary.items():
        print(f"{name:24s} {values['median']:7.2f} s  ({values['min']:.2f}-{values['max']:.2f})")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "rounds": args.rounds, "load_avg": os.getloadavg(), **summary}, indent=2))


if __name__ == "__main__":
    main()
