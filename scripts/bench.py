"""Benchmark macft against mlx_lm.lora (and mlx-lm-lora) the way users run them: each system's own
command line, in its own process, interleaved and repeated, on a machine checked to be quiet.

Every round runs every system once (A B A B A B ...), each as a fresh process of its public command
(`macft lora`, `mlx_lm.lora`, mlx-lm-lora's `mlx_lm_lora.train`) on the same data
(../shared/data/wikisql), batch size, maximum length, LoRA rank/scale/layers/target layers,
learning rate and steps. From the lines each tool prints, timestamped as they arrive, and the
process's resource usage, each run gives:

  tokens/s        trained tokens between the first and the second-to-last step report divided by
                  the wall time between those reports (the first step compiles; mlx_lm validates
                  before its last step), one formula for every tool
  own tok/s       the median of the tokens/s the tool itself printed over the same steps
  step s          the median wall time between consecutive step reports
  first step s    process start to the first finished step's report (imports, loading, compiling);
                  macft's caches (the tokenizer, the tokenized data) are filled before the rounds,
                  as after a user's first run on the data
  wall s          process start to exit, for all N steps
  MLX peak        mx.get_peak_memory() at exit, read by a probe (sitecustomize) that changes nothing else
  RSS peak        the process's own peak resident memory (VmHWM), read by the same probe at exit; wait4's
                  ru_maxrss (bytes on macOS) only where there is no /proc: on Linux it also counts this script's own peak
                  (about 1.5 GiB after copying the model), which the kernel carries into a child at exec

The FLOPs a step must do are counted per trained token from the model's config.json (every
token of these runs is trained): 2 per weight of every layer's linear maps (q, k, v, o, gate, up,
down) and of the output head in the forward pass; 2 per weight again in the backward pass for the
head and for the layers from the first adapted one on (the gradient with respect to the activations;
the frozen weights need none, and the layers below the first adapter need no backward pass); 6 per
LoRA weight. Attention scores (about 1% at these lengths), norms and elementwise work are left out.
For Gemma 3 270M with 16 adapted layers that is about 1.06 GFLOP per token. Two matmul limits:
MLX's measured GFLOP/s on a 2048 x 2048 float32 product (macft.backend.matmul_gflops), and the
step's own: the tokens/s of a step that did only those products, each timed alone at the speed MLX
multiplies that very shape with the runs' median trained tokens per step as its rows (a 262,144-wide
head product and a 640 x 2048 layer map run at different speeds). The summary gives each system's
achieved GFLOP/s (FLOPs per token x tokens/s) as a share of the first, and its tokens/s as a share
of the second.

The summary gives each metric's median and spread (min-max) over the rounds, and ratios of medians
against each mlx_lm row. The machine is sampled during every run: the CPU time that processes
other than the benchmark used (/proc/stat less the run's own usage) and the load average. Above
--busy-cores the results are printed but not written, unless --allow-busy.

Systems:
  macft          macft lora (float32 compute on CPU)
  macft-qlora    macft lora --method qlora (base quantized to 4 bits at load)
  mlx_lm         mlx_lm.lora on a float32 copy of the model, given macft's BLAS (LD_PRELOAD) where
                 macft found OpenBLAS
  mlx_lm-stock   mlx_lm.lora as a user installs it: its own BLAS, the model's own dtype
  mlx-lm-lora    mlx_lm_lora.train from --mlx-lm-lora-venv (its own mlx and mlx-lm versions)

    python scripts/bench.py --systems mlx_lm,macft --steps 10 --rounds 3     # Gemma 3 270M
    python scripts/bench.py --model tiny-llama --steps 6 --rounds 3 --allow-busy --out /tmp/bench.json
    python scripts/bench.py --systems macft,mlx_lm,mlx-lm-lora --mlx-lm-lora-venv /work/venvs/perf-mlxlmlora
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
WIKISQL = ROOT.parent / "shared" / "data" / "wikisql"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLX_LM_KEYS = [f"self_attn.{k}" for k in ALL_LINEAR[:4]] + [f"mlp.{k}" for k in ALL_LINEAR[4:]]
MACFT_DATA = {"packing": False, "mask_prompt": False}  # macft's data options (as plain mlx_lm.lora trains)
METRICS = ("tokens_per_second", "own_tokens_per_second", "step_seconds", "first_step_seconds", "wall_seconds",
           "mlx_peak_bytes", "rss_peak_bytes")

# Imported by every child's Python before the tool's code (PYTHONPATH); it only reads MLX's peak and
# the process's own peak resident memory at exit.
PROBE = '''import atexit, sys
def _macft_bench_peak():
    mx = sys.modules.get("mlx.core")
    if mx is not None:
        print(f"BENCH_MLX_PEAK {mx.get_peak_memory()}", file=sys.stderr, flush=True)
    try:
        with open("/proc/self/status") as fh:
            hwm = next(line.split()[1] for line in fh if line.startswith("VmHWM:"))
        print(f"BENCH_RSS_PEAK {int(hwm) * 1024}", file=sys.stderr, flush=True)
    except (OSError, StopIteration):
        pass
atexit.register(_macft_bench_peak)
'''

# One finished step in each tool's plain (not-a-terminal) output.
MACFT_STEP = re.compile(r"^step (?P<step>\d+)/\d+\s+loss (?P<loss>[\d.]+)\s.*?(?P<tps>[\d.]+) tok/s")
MLX_LM_STEP = re.compile(r"^\s*(?P<step>\d+)\s+(?P<loss>[\d.]+)\s+[▼▲]\s+(?P<tps>[\d,.]+)\s+(?P<tokens>[\d.]+)k\s*$")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # mlx_lm's console colours even when writing to a pipe
MLX_LM_LORA_STEP = re.compile(r"Iter (?P<step>\d+): loss (?P<loss>[\d.]+),.*?tok/s (?P<tps>[\d.]+), trained_tok (?P<tokens>\d+)")


# ----------------------------------------------------------------------------- the machine


def cpu_busy_seconds() -> float:
    """Seconds of CPU time the whole machine has spent busy (all cores), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def report_header(script: str) -> dict:
    """The command that reproduces this run of ``script`` (a path under scripts/), the date and the machine."""
    return {
        "command": f"python {script} " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
    }


def print_and_write(report: dict, path: Path | None) -> None:
    if path:
        path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def busy_processes(seconds: float = 1.0, threshold: float = 0.05) -> list[dict]:
    """Processes other than this one that used more than ``threshold`` of a core over ``seconds``."""

    def sample() -> dict[int, tuple[str, float]]:
        ticks = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:
                continue
            name = text[text.index("(") + 1 : text.rindex(")")]
            rest = text[text.rindex(")") + 2 :].split()
            ticks[int(stat.parent.name)] = (name, (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK"))
        return ticks

    if not Path("/proc/stat").exists():
        return []
    before = sample()
    time.sleep(seconds)
    after = sample()
    found = []
    for pid, (name, cpu) in after.items():
        if pid != os.getpid() and pid in before and (used := (cpu - before[pid][1]) / seconds) > threshold:
            found.append({"pid": pid, "name": name, "cores": round(used, 2)})
    return sorted(found, key=lambda p: -p["cores"])


class Watch:
    """CPU used by everything except one child process (and this script) while it runs."""

    def __init__(self):
        self.load_start = os.getloadavg()
        self.busy_start = cpu_busy_seconds() if Path("/proc/stat").exists() else None
        self.self_start = time.process_time()
        self.started = time.perf_counter()

    def others_cores(self, child_cpu_seconds: float) -> float | None:
        if self.busy_start is None:
            return None
        elapsed = time.perf_counter() - self.started
        ours = child_cpu_seconds + time.process_time() - self.self_start
        return max(0.0, (cpu_busy_seconds() - self.busy_start - ours) / elapsed)


# ----------------------------------------------------------------------------- preparation


def prepare_models(name: str, scratch: Path) -> dict[str, str]:
    """Model directories: the model as a user has it, and a float32 copy for the same-dtype runs."""
    import macft  # noqa: F401
    import mlx.core as mx

    from macft.models.load import resolve_model_dir
    from macft.models.random_init import build_random_model

    if name == "tiny-llama":
        native = build_random_model("llama", scratch / "tiny-llama", hidden=256, layers=4, dtype="bfloat16")
    elif Path(name).is_dir():
        native = Path(name)
    else:
        native, _ = resolve_model_dir(name, dequantize=True)
    fp32 = scratch / "model-fp32"
    if not fp32.exists():
        fp32.mkdir(parents=True)
        for item in native.iterdir():
            if item.suffix == ".safetensors":
                weights = mx.load(str(item))
                mx.save_safetensors(str(fp32 / item.name), {k: v.astype(mx.float32) for k, v in weights.items()})
            elif item.is_file() and not item.name.startswith("."):
                (fp32 / item.name).write_bytes(item.read_bytes())
    return {"native": str(native), "float32": str(fp32)}


def fill_macft_caches(model_dir: str, data: str) -> None:
    """Load the tokenizer and tokenize ``data`` as `macft lora` does on a user's first run (with the
    encoding options of ``macft_command``), so that every round finds both in macft's caches."""
    from macft.config import DataConfig
    from macft.data import load_splits
    from macft.models.load import model_tokenizer

    config = json.loads((Path(model_dir) / "config.json").read_text())
    load_splits(DataConfig(train=data, **MACFT_DATA), model_tokenizer(Path(model_dir), config))


def joined_rows(source: Path, per_row: int, out: Path) -> Path:
    """A copy of a text dataset (train and valid) whose rows each join ``per_row`` consecutive rows."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        texts = [json.loads(line)["text"] for line in (source / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        rows = ["\n\n".join(texts[i : i + per_row]) for i in range(0, len(texts), per_row)]
        (out / f"{split}.jsonl").write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    return out


def openblas_path() -> str | None:
    """The OpenBLAS library macft loads on this machine, for giving mlx_lm the same one."""
    from macft.backend import load_openblas

    return load_openblas()


# ----------------------------------------------------------------------------- command lines


def macft_command(cfg: dict, run_dir: Path) -> list[str]:
    command = [
        sys.executable, "-m", "macft.cli", "lora",
        "--model", cfg["model_dir"], "--data", cfg["data"], "--iters", str(cfg["steps"]),
        "--batch-size", str(cfg["batch"]), "--lr", str(cfg["lr"]), "--rank", str(cfg["rank"]),
        "--out-dir", str(run_dir.parent), "--name", run_dir.name,
    ]
    sets = {
        "data.max_seq_length": cfg["seq"], **{f"data.{k}": str(v).lower() for k, v in MACFT_DATA.items()},
        "method.alpha": cfg["scale"] * cfg["rank"], "method.num_layers": cfg["layers"],
        "method.target_modules": f"[{','.join(ALL_LINEAR)}]", "train.lr_schedule": "constant", "train.grad_clip": 0,
        "train.eval_every": 0, "train.eval_batches": 1, "train.save_every": 10**9, "train.report_every": 1,
        "demo.count": 0, "train.grad_checkpoint": str(cfg["grad_checkpoint"]).lower(),
    }
    for key, value in sets.items():
        command += ["--set", f"{key}={value}"]
    if cfg["system"] == "macft-qlora":
        command += ["--method", "qlora"]
    return command


def mlx_lm_config(cfg: dict, run_dir: Path) -> Path:
    """mlx_lm.lora's YAML config (rank, scale and target layers have no flags); mlx-lm-lora reads the same
    keys (it ignores the target layers) and would otherwise fuse and save the model after training."""
    import yaml

    config = {
        "model": cfg["model_dir"], "train": True, "data": cfg["data"], "iters": cfg["steps"], "batch_size": cfg["batch"],
        "max_seq_length": cfg["seq"], "num_layers": cfg["layers"], "learning_rate": cfg["lr"], "mask_prompt": False,
        "lora_parameters": {"rank": cfg["rank"], "scale": cfg["scale"], "dropout": 0.0, "keys": MLX_LM_KEYS},
        "steps_per_report": 1, "steps_per_eval": 10**9, "val_batches": 1, "save_every": 10**9,
        "adapter_path": str(run_dir), "seed": 0, "grad_checkpoint": cfg["grad_checkpoint"],
    }
    if cfg["system"] == "mlx-lm-lora":
        config.update(train_type="lora", train_mode="sft", fuse=False)
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    return path


def command_for(cfg: dict, run_dir: Path, tools: dict) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment of one run of ``cfg['system']``."""
    system, env = cfg["system"], {}
    if system.startswith("macft"):
        return macft_command(cfg, run_dir), {"PYTHONPATH": str(ROOT)}
    config = mlx_lm_config(cfg, run_dir)
    if system == "mlx-lm-lora":
        return [tools["mlx-lm-lora"], "--config", str(config)], env
    if system == "mlx_lm" and tools.get("openblas"):
        from macft.backend import preload_environment

        env.update(preload_environment(tools["openblas"]))
    return [tools["mlx_lm"], "--config", str(config)], env


# ----------------------------------------------------------------------------- one run


def run_once(cfg: dict, run_dir: Path, tools: dict, probe_dir: Path) -> dict:
    """Start the system's command, timestamp its step reports, and measure the process."""
    command, extra = command_for(cfg, run_dir, tools)
    if cfg["system"] == "mlx_lm-stock":
        extra["MACFT_OPENBLAS"] = "0"
    pattern = MACFT_STEP if cfg["system"].startswith("macft") else MLX_LM_LORA_STEP if cfg["system"] == "mlx-lm-lora" else MLX_LM_STEP
    return run_command(command, extra, pattern, run_dir, probe_dir, macft=cfg["system"].startswith("macft"))


def run_command(command: list[str], extra: dict[str, str], pattern: re.Pattern, run_dir: Path, probe_dir: Path, macft: bool,
                rss_cap: int | None = None, time_cap: float | None = None, min_steps: int = 3) -> dict:
    """Run one benchmark process (``extra``: environment on top of this one's; ``probe_dir`` goes first
    on its PYTHONPATH), timestamp the step reports ``pattern`` matches, and measure the process. Past
    ``rss_cap`` resident bytes the process is killed and the result says "out of memory"; past
    ``time_cap`` seconds it is killed and says "not finished" (with the resident peak seen so far)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(probe_dir), extra.get("PYTHONPATH"), os.environ.get("PYTHONPATH")) if p)
    watch = Watch()
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=run_dir.parent)
    steps, tail, mlx_peak, rss_peak = [], [], None, None

    def read() -> None:
        nonlocal mlx_peak, rss_peak
        for line in proc.stdout:
            now = time.perf_counter()
            line = ANSI.sub("", line)
            tail.append(line.rstrip())
            del tail[:-20]
            if line.startswith("BENCH_MLX_PEAK "):
                mlx_peak = int(line.split()[1])
            elif line.startswith("BENCH_RSS_PEAK "):
                rss_peak = int(line.split()[1])
            elif match := pattern.search(line):
                found = match.groupdict()
                tokens = float(found["tokens"]) * (1000 if pattern is MLX_LM_STEP else 1) if "tokens" in found else None
                steps.append({"time": now - started, "step": int(found["step"]), "loss": float(found["loss"]),
                              "own_tps": float(found["tps"].replace(",", "")), "tokens": tokens})

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    watched = {"rss": 0, "killed": None}
    if rss_cap or time_cap:
        threading.Thread(target=kill_over, args=(proc, rss_cap, time_cap, watched), daemon=True).start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    reader.join(timeout=10)
    others = watch.others_cores(usage.ru_utime + usage.ru_stime)
    load_end = os.getloadavg()
    if macft:
        attach_macft_tokens(steps, run_dir)
    result = {"exit_status": os.waitstatus_to_exitcode(status), "wall_seconds": wall, "rss_peak_bytes": rss_peak or usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024),
              "mlx_peak_bytes": mlx_peak, "steps": steps, "load_start": watch.load_start, "load_end": load_end,
              "other_cores": others}
    if watched["killed"] == "time":
        result["rss_peak_bytes"] = max(watched["rss"], result["rss_peak_bytes"] or 0)
        result["error"] = f"not finished: over {time_cap / 60:.0f} min"
        return result
    if watched["killed"] == "memory" or result["exit_status"] == -9:  # our cap, or the kernel's out-of-memory killer
        result["error"] = "out of memory" + (f" (over {rss_cap / 2**30:.1f} GiB resident)" if watched["killed"] else " (killed)")
        return result
    if result["exit_status"] != 0 or len(steps) < min_steps:
        result["error"] = " | ".join(tail[-5:])
        return result
    if len(steps) >= 3:
        result.update(step_metrics(steps))
    return result


def kill_over(proc: subprocess.Popen, rss_cap: int | None, time_cap: float | None, watched: dict) -> None:
    """Kill ``proc`` once its resident memory passes ``rss_cap`` bytes or it has run ``time_cap``
    seconds; ``watched`` keeps its resident peak so far (the kernel's VmHWM) and why it was killed."""
    status, started = Path(f"/proc/{proc.pid}/status"), time.perf_counter()
    while proc.poll() is None:
        try:
            sizes = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith(("VmRSS:", "VmHWM:"))}
            rss = sizes["VmRSS"]
        except (OSError, KeyError, ValueError):
            return
        watched["rss"] = max(watched["rss"], sizes.get("VmHWM", rss))
        over = "memory" if rss_cap and rss > rss_cap else "time" if time_cap and time.perf_counter() - started > time_cap else None
        if over:
            watched["killed"] = over
            proc.kill()
            return
        time.sleep(0.5)


def attach_macft_tokens(steps: list[dict], run_dir: Path) -> None:
    """macft's terminal line has no token count; its run directory's metrics.jsonl has it per step."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return
    tokens = {row["step"]: row["tokens"] for row in map(json.loads, metrics.read_text().splitlines()) if row.get("kind") == "train"}
    for step in steps:
        step["tokens"] = tokens.get(step["step"])


def step_metrics(steps: list[dict]) -> dict:
    """The per-run numbers over the steady window: from the first step report to the second-to-last."""
    window = steps[:-1] if len(steps) >= 4 else steps
    first, last = window[0], window[-1]
    gaps = [b["time"] - a["time"] for a, b in zip(window, window[1:])]
    tokens = None if first["tokens"] is None or last["tokens"] is None else last["tokens"] - first["tokens"]
    return {
        "tokens_per_second": tokens / (last["time"] - first["time"]) if tokens else None,
        "own_tokens_per_second": statistics.median(s["own_tps"] for s in window[1:]),
        "step_seconds": statistics.median(gaps),
        "first_step_seconds": steps[0]["time"],
        "final_loss": steps[-1]["loss"],
        "trained_tokens_in_window": tokens,
    }


# ----------------------------------------------------------------------------- FLOPs


def counted_products(model_dir: str | Path, adapted_layers: int, rank: int) -> list[tuple[str, int, int, int]]:
    """The matrix products one trained token's training step must do, as the module docstring counts
    them: (part, inner size, output size, times per step), each costing 2 x inner x output FLOPs."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    shapes = [(hidden, q_out), (hidden, kv_out), (hidden, kv_out), (q_out, hidden)] + [(hidden, config["intermediate_size"])] * 2
    shapes.append((config["intermediate_size"], hidden))
    adapted = min(adapted_layers, layers)
    products = [("forward_head", hidden, config["vocab_size"], 1), ("backward_head", config["vocab_size"], hidden, 1)]
    for a, b in shapes:
        products += [("forward_layers", a, b, layers), ("backward_layers", b, a, adapted)]
        # A LoRA pair's forward products; its backward pass does the same FLOPs twice more
        # (the input's gradient and the adapter weights' gradients).
        products += [("lora", a, rank, 3 * adapted), ("lora", rank, b, 3 * adapted)]
    return products


def flops_per_token(products: list[tuple[str, int, int, int]]) -> dict:
    """FLOPs of one trained token's training step, by part and in total."""
    counts: dict[str, int] = {}
    for part, inner, out, times in products:
        counts[part] = counts.get(part, 0) + 2 * inner * out * times
    return {**counts, "total": sum(counts.values())}


HEAD_BLOCK = 8192


def matmul_bound_tokens_per_second(products: list[tuple[str, int, int, int]], tokens: int, seconds: float = 0.3) -> float:
    """Trained tokens/s of a step that did nothing but its counted products, each at the speed MLX
    multiplies that very shape (``tokens`` rows) on its own: the matmul limit for this step's FLOPs."""
    import mlx.core as mx

    step_seconds = 0.0
    for inner, out in {(inner, out) for _, inner, out, _ in products}:
        # The head's 262,144-wide products are timed in blocks of HEAD_BLOCK, as a loss that never
        # holds the whole logits does them (one product would allocate hundreds of MB per call).
        blocks = max(1, max(inner, out) // HEAD_BLOCK)
        x = mx.random.normal((tokens, inner // blocks if inner > out else inner))
        w = mx.random.normal((x.shape[1], out // blocks if out > inner else out))
        mx.eval(x @ w)  # warm-up: first-touch pages
        runs, start = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - start < seconds:
            mx.eval(x @ w)
            runs += 1
        each = blocks * (time.perf_counter() - start) / runs
        step_seconds += each * sum(times for _, i, o, times in products if (i, o) == (inner, out))
    return tokens / step_seconds


def tokens_per_step(runs: list[dict]) -> int | None:
    """The median trained tokens per step over every run (all systems train on the same batches)."""
    counts = [s["tokens"] / s["step"] for r in runs for s in r["result"].get("steps", [])[-1:] if s.get("tokens")]
    return round(statistics.median(counts)) if counts else None


def add_flop_shares(summary: dict, per_token: float, matmul_gflops: float, bound_tokens_per_second: float | None) -> None:
    """Each system's achieved GFLOP/s (median tokens/s x FLOPs per token), its share of the 2048^2
    matmul limit, and its share of the matmul-bound tokens/s of the step's own products."""
    for row in summary.values():
        if "tokens_per_second" in row:
            achieved = row["tokens_per_second"]["median"] * per_token / 1e9
            row["achieved_gflops"] = achieved
            row["share_of_matmul_limit"] = achieved / matmul_gflops if matmul_gflops else None
            if bound_tokens_per_second:
                row["share_of_step_matmul_limit"] = row["tokens_per_second"]["median"] / bound_tokens_per_second


# ----------------------------------------------------------------------------- rounds and summary


def system_config(system: str, base: dict, models: dict) -> dict:
    cfg = dict(base, system=system)
    cfg["model_dir"] = models["native"] if system == "mlx_lm-stock" else models["float32"]
    return cfg


def summarise(runs: list[dict], systems: list[str]) -> dict:
    """Per system and metric: median, min, max and the number of successful runs."""
    summary = {}
    for system in systems:
        ok = [r["result"] for r in runs if r["system"] == system and "error" not in r["result"]]
        summary[system] = {"runs": len(ok)}
        for metric in METRICS:
            values = [r[metric] for r in ok if r.get(metric) is not None]
            if values:
                summary[system][metric] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return summary


def gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def print_summary(summary: dict, references: list[str]) -> None:
    columns = [("tokens_per_second", "tok/s", "{:.1f}"), ("own_tokens_per_second", "own tok/s", "{:.1f}"),
               ("step_seconds", "step s", "{:.2f}"), ("first_step_seconds", "1st step s", "{:.1f}"),
               ("wall_seconds", "wall s", "{:.1f}"), ("mlx_peak_bytes", "MLX GiB", None), ("rss_peak_bytes", "RSS GiB", None)]
    print(f"{'system':<14}{'runs':>5}" + "".join(f" {label:>24}" for _, label, _ in columns))
    for system, row in summary.items():
        cells = []
        for metric, _, fmt in columns:
            if metric not in row:
                cells.append(f" {'-':>24}")
                continue
            m = row[metric]
            show = (lambda v: gib(v)) if fmt is None else (lambda v, f=fmt: f.format(v))
            cells.append(f" {show(m['median']) + ' (' + show(m['min']) + '-' + show(m['max']) + ')':>24}")
        print(f"{system:<14}{row['runs']:>5}" + "".join(cells))
    print("  (median over rounds, min-max in brackets)")
    for system, row in summary.items():
        if row.get("share_of_matmul_limit") is not None:
            step_share = row.get("share_of_step_matmul_limit")
            print(f"  {system}: {row['achieved_gflops']:.1f} GFLOP/s counted, {row['share_of_matmul_limit']:.0%} of the 2048^2 float32 matmul limit"
                  + (f", {step_share:.0%} of the step's own matmul limit" if step_share else ""))
    for reference in references:
        ref = summary.get(reference, {})
        for system, row in summary.items():
            if system == reference or not system.startswith(("macft", "mlx-lm-lora")):
                continue
            parts = [f"{row[m]['median'] / ref[m]['median']:.2f}x {label}" for m, label in
                     (("tokens_per_second", "tokens/s"), ("first_step_seconds", "time to first step"),
                      ("mlx_peak_bytes", "MLX peak"), ("rss_peak_bytes", "RSS"))
                     if m in row and m in ref and ref[m]["median"]]
            if parts:
                print(f"  {system} vs {reference}: " + ", ".join(parts))


def run_all(args: argparse.Namespace, scratch: Path) -> dict:
    systems = args.systems.split(",")
    tools = {"mlx_lm": str(Path(sys.executable).with_name("mlx_lm.lora")), "openblas": openblas_path()}
    if "mlx-lm-lora" in systems:
        if args.mlx_lm_lora_venv is None or not (Path(args.mlx_lm_lora_venv) / "bin" / "mlx_lm_lora.train").exists():
            sys.exit("mlx-lm-lora: pass --mlx-lm-lora-venv, a venv where `pip install mlx-lm-lora` put bin/mlx_lm_lora.train")
        tools["mlx-lm-lora"] = str(Path(args.mlx_lm_lora_venv) / "bin" / "mlx_lm_lora.train")
    models = prepare_models(args.model, scratch)
    probe_dir = scratch / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    base = {"data": str(args.data), "steps": args.steps, "batch": args.batch, "seq": args.seq, "rank": args.rank,
            "scale": args.scale, "layers": args.layers, "lr": args.lr, "grad_checkpoint": args.grad_checkpoint}
    settings = [] if args.seq_scaling else [dict(base)]
    if args.scaling:
        settings += [dict(base, batch=b) for b in (2, 8) if b != args.batch]
    if args.seq_scaling:
        # WikiSQL rows are 58-210 tokens long, so a longer maximum alone changes nothing: each
        # row here joins enough consecutive examples to fill about that many tokens.
        for seq in (256, 512, 1024):
            data = joined_rows(args.data, max(1, seq // 100), scratch / f"rows-{seq}")
            settings.append(dict(base, seq=seq, batch=1, data=str(data)))

    from macft.backend import matmul_gflops

    products = counted_products(models["float32"], args.layers, args.rank)
    flops = flops_per_token(products)
    limit = matmul_gflops(2048, seconds=2.0)
    print(f"FLOPs per trained token {flops['total'] / 1e9:.3f} G (see the docstring); float32 matmul limit {limit:.1f} GFLOP/s", flush=True)
    before = busy_processes()
    report = {"machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores", "model": args.model,
              "date": time.strftime("%Y-%m-%d %H:%M"), "rounds": args.rounds, "blas_for_mlx_lm": tools["openblas"],
              "busy_before": before, "load_before": os.getloadavg(), "flops_per_token": flops,
              "matmul_limit_gflops": limit, "settings": []}
    for setting in settings:
        print(f"\n== {args.model}: batch {setting['batch']}, seq {setting['seq']}, rank {setting['rank']}, "
              f"{setting['layers']} layers, {setting['steps']} steps, {args.rounds} rounds of {', '.join(systems)}"
              + (", gradient checkpointing" if args.grad_checkpoint else ""), flush=True)
        if any(s.startswith("macft") for s in systems):
            fill_macft_caches(models["float32"], setting["data"])
        runs = []
        for round_ in range(1, args.rounds + 1):
            for system in systems:
                run_dir = scratch / "runs" / f"{system}-r{round_}-b{setting['batch']}-s{setting['seq']}"
                run_dir.parent.mkdir(exist_ok=True)
                result = run_once(system_config(system, setting, models), run_dir, tools, probe_dir)
                runs.append({"system": system, "round": round_, "result": result})
                shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.items() if k not in ("steps", "load_start", "load_end")}
                print(f"  round {round_} {system}: {json.dumps(shown)[:240]}", flush=True)
        summary = summarise(runs, systems)
        step_tokens = tokens_per_step(runs)
        bound = matmul_bound_tokens_per_second(products, step_tokens) if step_tokens else None
        if bound:
            print(f"  a step of {step_tokens} trained tokens doing only its counted products, each at the speed "
                  f"MLX multiplies that shape alone: {bound:.1f} tokens/s", flush=True)
        add_flop_shares(summary, flops["total"], limit, bound)
        print_summary(summary, [s for s in ("mlx_lm", "mlx_lm-stock") if s in systems])
        report["settings"].append({"settings": setting, "summary": summary, "runs": runs,
                                   "step_matmul_limit": {"tokens_per_step": step_tokens, "tokens_per_second": bound}})
    others = [r["result"]["other_cores"] for s in report["settings"] for r in s["runs"] if r["result"].get("other_cores") is not None]
    report["other_cores_max"] = max(others, default=None)
    report["busy"] = bool(before) and sum(p["cores"] for p in before) > args.busy_cores or any(o > args.busy_cores for o in others)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m", help="gemma3-270m, tiny-llama, or a model folder")
    parser.add_argument("--systems", default="macft,mlx_lm", help="comma-separated: macft, macft-qlora, mlx_lm, mlx_lm-stock, mlx-lm-lora")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every system, interleaved (A B A B ...)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--scale", type=float, default=20.0)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--data", type=Path, default=WIKISQL)
    parser.add_argument("--grad-checkpoint", action="store_true", help="recompute each layer in the backward pass (all systems)")
    parser.add_argument("--scaling", action="store_true", help="also sweep the batch size (2/4/8)")
    parser.add_argument("--seq-scaling", action="store_true",
                        help="instead sweep the maximum length (256/512/1024, batch 1) over rows of joined examples that fill it")
    parser.add_argument("--mlx-lm-lora-venv", type=Path, help="a venv with mlx-lm-lora installed (for the mlx-lm-lora system)")
    parser.add_argument("--busy-cores", type=float, default=0.25,
                        help="the machine counts as busy when other processes use more cores than this during a run")
    parser.add_argument("--allow-busy", action="store_true", help="write the results even when the machine was busy")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts" / "results" / "bench.json")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 3:
        parser.error("--rounds must be at least 1 and --steps at least 3")

    run_and_write(run_all, args, "macft-bench-")


def run_and_write(run: Callable[[argparse.Namespace, Path], dict], args: argparse.Namespace, prefix: str) -> None:
    """``run(args, scratch)`` in a scratch folder removed afterwards, then its report written to
    ``args.out``, unless the machine was busy and ``args.allow_busy`` is not set (exit status 2)."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        report = run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # a float32 copy of the model lives there
    if report["busy"]:
        print(f"\nThe machine was busy (other processes used up to {report['other_cores_max'] or 0:.2f} cores; "
              f"load average before {report['load_before'][0]:.1f}; busy: {report['busy_before'][:5]})")
        if not args.allow_busy:
            print("Results not written: re-run on a quiet machine, or pass --allow-busy.")
            sys.exit(2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
