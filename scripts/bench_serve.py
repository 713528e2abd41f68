"""Serving speed of `macft serve` with each engine (mlx, llama.cpp), on a tiny model and the embedded Gemma 3 270M.

For each model and engine it starts `macft serve` (the public command) on a free loopback port with
two LoRA adapters, then sends greedy streamed chat requests round-robin over the base and both
adapters, so every request switches the adapter, through the official openai client. It reports the
start-up time (until the server listens; the first start of an engine also exports and caches its GGUF
files), the time to the first token, the decoding speed (tokens after the first / their seconds; on
a tiny model they arrive in bursts, so this one is coarse) and tokens per second of whole requests,
as medians over the requests, beside `macft generate`'s own tokens/s on the base. The adapters are random LoRA weights (small, so the 270M model still
writes text); speed does not depend on what they learned.

    python scripts/bench_serve.py                                   # tiny + 270M, both engines
    python scripts/bench_serve.py --models tiny --requests 9 --json scripts/results/bench-serve.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import print_and_write, report_header

import macft  # noqa: F401  (loads OpenBLAS before mlx is imported)

PROMPT = "Write a short story about a robot who learns to paint."


def make_adapters(model: str, root: Path, scale: float) -> list[Path]:
    """Two LoRA runs on ``model`` with random weights (the base's load options as `macft lora` records them)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from macft.adapters.files import save_adapter
    from macft.config import Recipe, save_recipe
    from macft.methods import apply_method
    from macft.models.load import load_model

    recipe = Recipe().replace(model={"path": model, "dequantize": True}, method={"name": "lora", "rank": 8, "target_modules": ("q_proj", "v_proj")})
    runs = []
    for seed in (1, 2):
        loaded = load_model(model, dequantize=True)
        adapted = apply_method(loaded.model, recipe.method, loaded.tokenizer)
        mx.random.seed(seed)
        adapted.load_weights([(k, scale * mx.random.normal(v.shape).astype(v.dtype)) for k, v in tree_flatten(adapted.trainable_parameters())], strict=False)
        run = root / f"adapter{seed}"
        save_adapter(adapted, run, recipe.method, loaded.identity, recipe.model.recorded)
        save_recipe(recipe, run / "recipe.yaml")
        runs.append(run)
    return runs


def start_server(model: str, adapters: list[Path], engine: str) -> tuple[subprocess.Popen, str, float]:
    command = [sys.executable, "-m", "macft.cli", "serve", "-m", model, "--engine", engine, "--port", "0"]
    for run in adapters:
        command += ["--adapter", str(run)]
    start = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    if " on " not in line:
        process.kill()
        raise SystemExit(f"macft serve --engine {engine} did not start: {line!r}")
    return process, line.split(" on ")[1].split()[0], time.time() - start


def measure(url: str, names: list[str], requests: int, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    first_token, decode, overall, tokens = [], [], [], []
    for i in range(requests):
        sent = time.perf_counter()
        first = None
        stream = client.chat.completions.create(
            model=names[i % len(names)], messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.usage:
                count = chunk.usage.completion_tokens
        done = time.perf_counter()
        first = first or done
        first_token.append(first - sent)
        tokens.append(count)
        overall.append(count / (done - sent))
        if count > 1 and done > first:
            decode.append((count - 1) / (done - first))
    return {
        "first_token_s": round(statistics.median(first_token), 3),
        "decode_tokens_per_s": round(statistics.median(decode), 1) if decode else None,
        "request_tokens_per_s": round(statistics.median(overall), 1),  # completion tokens / whole request
        "completion_tokens": tokens,
    }


def generate_speed(model: str, engine: str, max_tokens: int) -> float:
    """`macft generate`'s own tokens/s on the base (the same prompt; no server), for reference."""
    command = [sys.executable, "-m", "macft.cli", "generate", "-m", model, "--engine", engine, "-p", PROMPT, "-n", str(max_tokens), "--temperature", "0", "--json"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return round(json.loads(output.strip().splitlines()[-1])["tokens_per_second"], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,gemma3-270m", help="comma-separated: 'tiny' (built here) and/or model specs")
    parser.add_argument("--engines", default="mlx,llama.cpp")
    parser.add_argument("--requests", type=int, default=6, help="requests per engine (round-robin over base and two adapters)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        root = Path(scratch)
        for model in args.models.split(","):
            spec = model
            if model == "tiny":
                from macft.models.random_init import build_random_model

                spec = str(build_random_model("llama", root / "tiny"))  # the tests' tiny model
            adapters = make_adapters(spec, root / f"runs-{len(results)}", 0.5 if model == "tiny" else 0.02)
            names = [spec, adapters[0].name, adapters[1].name]
            for engine in args.engines.split(","):
                process, url, first_start = start_server(spec, adapters, engine)
                process.terminate()
                process.wait(timeout=60)
                process, url, warm_start = start_server(spec, adapters, engine)  # caches warm
                try:
                    row = {"model": model, "engine": engine, "first_start_s": round(first_start, 1), "warm_start_s": round(warm_start, 1)}
                    row |= measure(url, names, args.requests, args.max_tokens)
                finally:
                    process.terminate()
                    process.wait(timeout=60)
                row["generate_tokens_per_s"] = generate_speed(spec, engine, args.max_tokens)
                print(json.dumps(row), flush=True)
                results.append(row)
    report = {
        **report_header("scripts/bench_serve.py"),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "results": results,
    }
    print_and_write(report, args.json)


if __name__ == "__main__":
    main()
