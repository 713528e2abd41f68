"""Everything macft shows in a terminal; the only module that imports rich.

On a terminal, training shows a live panel (step, epoch, train loss with a sparkline of recent
reports, validation loss, tokens/s, learning rate, elapsed/ETA, peak memory). When stdout is not a
terminal (pipes, CI, click's CliRunner) the same reports come out as one plain line each.

    view = TrainingView(title="quickstart · lora")
    with view:
        outcome = run_training(recipe, view)
    show_summary(outcome.summary)
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from macft import phases
from macft.units import format_bytes

SPARKS = "▁▂▃▄▅▆▇█"


def console() -> Console:
    return Console(file=sys.stdout, highlight=False)


def sparkline(values: list[float], width: int = 24) -> str:
    values = values[-width:]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARKS[int((v - low) / span * (len(SPARKS) - 1))] for v in values)


def metrics_text(metrics: tuple, info: dict, prefix: str = "") -> str:
    """``pref acc 62%  margin +0.210 …``: an objective's report values (``macft.objectives.base.Metric``)
    found in ``info``; "" when it reports none. A spread ("_std") follows its mean with ±."""
    parts = []
    for metric in metrics:
        if prefix + metric.key not in info:
            continue
        value = metric.format.format(info[prefix + metric.key])
        if metric.key.endswith("_std") and parts:
            parts[-1] += f" ± {value}"
        else:
            parts.append(f"{metric.label} {value}")
    return "  ".join(parts)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class PhaseSpinner:
    """A ``macft.phases`` reporter: on a terminal, a spinner with the innermost running phase's name and
    elapsed time, and one line for each phase that took over two seconds once it ends. Elsewhere
    (pipes, ``--json``) it shows nothing, so machine-read output stays clean."""

    def __init__(self, out: Console | None = None):
        self.out = out or console()
        self.running: list[tuple[str, float]] = []
        self.spinner = Spinner("dots")
        self.live: Live | None = None

    def __rich__(self) -> Spinner | Text:
        if not self.running:  # the last refresh as the display closes
            return Text("")
        name, start = self.running[-1]
        self.spinner.update(text=Text(f"{name} · {format_seconds(time.monotonic() - start)}"))
        return self.spinner

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.out.is_terminal:
            yield
            return
        self.running.append((name, time.monotonic()))
        if self.live is None:
            self.live = Live(self, console=self.out, refresh_per_second=8, transient=True)
            self.live.__enter__()
        try:
            yield
        finally:
            _, start = self.running.pop()
            if not self.running:
                self.live.__exit__(None, None, None)
                self.live = None
            if time.monotonic() - start > 2:
                self.out.print(Text(f"· {name}: {format_seconds(time.monotonic() - start)}", style="dim"))


@contextmanager
def showing_phases(out: Console | None = None) -> Iterator[None]:
    """Show every ``macft.phases.phase`` started inside this block with a ``PhaseSpinner``."""
    with phases.reporting(PhaseSpinner(out)):
        yield


class TrainingView:
    """The loop's callback (``macft.train.loop.Callback`` protocol) that renders progress; while
    entered it also reports ``macft.phases`` (model loading, a GGUF import) in its own panel."""

    def __init__(self, title: str = "training", out: Console | None = None, quiet: bool = False, metrics: tuple = ()):
        self.title = title
        self.metrics = metrics  # the objective's report values (macft.objectives.base.Metric)
        self.out = out or console()
        self.quiet = quiet
        self.live_mode = self.out.is_terminal and not quiet
        self.losses: list[float] = []
        self.last: dict[str, Any] = {}
        self.valid: dict[str, Any] = {}
        self.live: Live | None = None
        self.running: list[tuple[str, float]] = []  # phases in progress: (name, start)
        self.waiting_since = time.monotonic()  # since the last phase ended: the first steps compile
        self.spinner = Spinner("dots")
        self._phases = phases.reporting(self.phase)

    def __enter__(self) -> "TrainingView":
        if self.live_mode:
            self.live = Live(self, console=self.out, refresh_per_second=4, transient=False)
            self.live.__enter__()
        self._phases.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._phases.__exit__(*exc)
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None

    def __rich__(self) -> Table:
        return self._panel()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.running.append((name, time.monotonic()))
        try:
            yield
        finally:
            _, start = self.running.pop()
            self.waiting_since = time.monotonic()
            if self.live_mode and time.monotonic() - start > 2:
                self.on_note(f"{name}: {format_seconds(time.monotonic() - start)}")

    def on_note(self, text: str) -> None:
        if not self.quiet:
            self.out.print(Text("· " + text, style="dim"))

    def on_train_report(self, info: dict) -> None:
        self.last = info
        self.losses.append(info["train_loss"])
        if self.live is not None:
            self.live.refresh()
        elif not self.quiet:
            self.out.print(
                f"step {info['step']}/{info['iters']}  loss {info['train_loss']:.4f}  "
                f"lr {info['learning_rate']:.2e}  {throughput(info)}  "
                f"peak {format_bytes(info['peak_memory'])}  elapsed {format_seconds(info['elapsed'])}"
                + (f"  {metrics_text(self.metrics, info)}" if metrics_text(self.metrics, info) else ""),
                markup=False,
            )

    def on_valid_report(self, info: dict) -> None:
        self.valid = info
        if self.live is not None:
            self.live.refresh()
        elif not self.quiet:
            mark = " (best)" if info["improved"] else ""
            extra = metrics_text(self.metrics, info, "val_")
            self.out.print(f"step {info['step']}  val loss {info['val_loss']:.4f}{mark}" + (f"  {extra}" if extra else ""), markup=False)

    def _panel(self) -> Table:
        info = self.last
        table = Table(title=self.title, show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold cyan")
        table.add_column()
        if not info:
            name, start = self.running[-1] if self.running else ("Training: the first steps compile the model", self.waiting_since)
            self.spinner.update(text=f"{name} · {format_seconds(time.monotonic() - start)}")
            table.add_row("status", self.spinner)
            return table
        trend = ""
        if len(self.losses) > 1:
            trend = " ↓" if self.losses[-1] < self.losses[-2] else " ↑"
        table.add_row("step", f"{info['step']}/{info['iters']}  (epoch {info['epoch']:.2f})")
        table.add_row("train loss", f"{info['train_loss']:.4f}{trend}  {sparkline(self.losses)}  (mean since the last report)")
        if self.valid:
            best = self.valid["best_val_loss"]
            table.add_row("val loss", f"{self.valid['val_loss']:.4f}  (best {best:.4f})" if best is not None else f"{self.valid['val_loss']:.4f}")
        if metrics_text(self.metrics, info):
            table.add_row("objective", metrics_text(self.metrics, info))
        if self.valid and metrics_text(self.metrics, self.valid, "val_"):
            table.add_row("held out", metrics_text(self.metrics, self.valid, "val_"))
        table.add_row("tokens/s", throughput(info))
        table.add_row("learning rate", f"{info['learning_rate']:.2e}")
        table.add_row("time", f"{format_seconds(info['elapsed'])} elapsed · {format_seconds(info['eta'])} left")
        table.add_row("peak memory", format_bytes(info["peak_memory"]))
        return table


def throughput(info: dict) -> str:
    """Trained tokens/s; with several ranks, the total and each rank's share."""
    total, ranks = info["tokens_per_second"], info.get("ranks", 1)
    if ranks == 1:
        return f"{total:.0f} tok/s"
    return f"{total:.0f} tok/s total · {total / ranks:.0f} per rank × {ranks} ranks"


def show_notes(notes: list[str], out: Console | None = None) -> None:
    out = out or console()
    for note in notes:
        out.print(Text("· " + note, style="dim"))


def loss_chart(train: list[tuple[int, float]], valid: list[tuple[int, float]], width: int = 60, height: int = 10) -> list[str]:
    """The loss curve as text: ``•`` train loss, ``◆`` validation loss, the loss range on the left."""
    train = [(s, v) for s, v in train if math.isfinite(v)]
    valid = [(s, v) for s, v in valid if math.isfinite(v)]
    points = train + valid
    if not points:
        return []
    first, last = min(s for s, _ in points), max(s for s, _ in points)
    low, high = min(v for _, v in points), max(v for _, v in points)
    grid = [[" "] * width for _ in range(height)]

    def place(step: float, value: float, mark: str) -> None:
        col = round((step - first) / ((last - first) or 1) * (width - 1))
        row = round((high - value) / ((high - low) or 1) * (height - 1))
        grid[row][col] = mark

    for (s0, v0), (s1, v1) in zip(train, train[1:]):  # the train line, sampled at every column it crosses
        samples = max(2, round((s1 - s0) / ((last - first) or 1) * width) + 1)
        for t in range(samples):
            frac = t / (samples - 1)
            place(s0 + frac * (s1 - s0), v0 + frac * (v1 - v0), "•")
    if len(train) == 1:
        place(*train[0], "•")
    for step, value in valid:
        place(step, value, "◆")
    label_width = max(len(f"{high:.3f}"), len(f"{low:.3f}"))
    lines = []
    for row, cells in enumerate(grid):
        label = f"{high:.3f}" if row == 0 else f"{low:.3f}" if row == height - 1 else ""
        lines.append(f"{label:>{label_width}} │{''.join(cells)}")
    lines.append(" " * label_width + " └" + "─" * width)
    steps = f"step {first}"
    lines.append(" " * (label_width + 2) + steps + f"{last:>{width - len(steps)}}")
    return lines


def show_loss_chart(train: list[tuple[int, float]], valid: list[tuple[int, float]], out: Console | None = None) -> None:
    out = out or console()
    lines = loss_chart(train, valid)
    if not lines:
        return
    out.print(Text.assemble("Loss  ", ("• train", "cyan"), "  ", ("◆ validation", "yellow")))
    for line in lines:
        text = Text(line)
        text.highlight_regex("•", "cyan")
        text.highlight_regex("◆", "yellow")
        out.print(text)


def show_summary(summary: Any, out: Console | None = None, curve: tuple[list, list] | None = None) -> None:
    """A finished run (a ``macft.train.summary.RunSummary``); ``curve`` (train and validation (step, loss)
    lists) adds the loss chart."""
    out = out or console()
    table = Table(title="Run summary", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    best = summary.best_val_loss
    rows = [
        ("run", summary.run_dir),
        ("result", summary.message),
        ("steps", f"{summary.steps}/{summary.iters}"),
        ("best val loss", f"{best:.4f} (step {summary.best_step})" if best is not None else "no validation data"),
        ("train loss, last step", f"{summary.final_train_loss:.4f}" if summary.final_train_loss is not None else "-"),
        ("tokens seen", f"{summary.tokens_seen:,}"),
        ("throughput", f"{summary.tokens_per_second:.0f} trained tokens/s"),
        ("peak memory", format_bytes(summary.peak_memory_bytes)),
        ("time", format_seconds(summary.train_seconds)),
        ("trainable", f"{summary.trainable_parameters:,} of {summary.total_parameters:,} parameters"),
        ("backend", summary.backend),
        ("fast paths", "; ".join(summary.fast_paths)),
    ]
    for key, value in rows:
        table.add_row(key, Text(str(value)))
    out.print(table)
    if curve is not None:
        show_loss_chart(*curve, out=out)


def show_doctor(checks: list[Any], out: Console | None = None) -> None:
    """``macft doctor``'s table (``macft.doctor.Check`` rows), then each problem with its fix."""
    out = out or console()
    table = Table(title="macft doctor", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_column()
    for check in checks:
        mark = Text("✗", style="bold red") if check.problem else Text("✓", style="green")
        table.add_row(check.name, Text(check.value), mark)
    out.print(table)
    problems = [c for c in checks if c.problem]
    if not problems:
        out.print("No problems found.")
    for check in problems:
        out.print(Text.assemble((f"{check.name}: ", "bold"), check.problem + "."))
        if check.fix:
            out.print(Text.assemble("  fix: ", (check.fix, "cyan")))


def show_demo(demo: Any, out: Console | None = None) -> None:
    """Base vs tuned answers (a ``macft.train.run.DemoResult``)."""
    out = out or console()
    table = Table(title="Held-out prompts: base vs tuned (greedy)", show_lines=True)
    for column in ("prompt", "expected", "base", "tuned"):
        table.add_column(column, overflow="fold")
    for ex in demo.examples:
        table.add_row(*(Text(ex[k]) for k in ("prompt", "expected", "base", "tuned")))
    out.print(table)
    out.print(
        f"Exact match on {demo.total} held-out examples: base {demo.base_exact:.0%} → tuned {demo.tuned_exact:.0%}",
        markup=False,
    )


def show_estimate(result: Any, memory_gb: float | None) -> None:
    """A memory plan (a ``macft.memory.Estimate``) as a table, then whether it fits and why."""
    plan = result.plan
    where = f"a {memory_gb:g} GB Mac" if memory_gb is not None else "this machine"
    title = f"{result.model} · {plan.method} · batch {plan.batch} × {plan.seq} tokens"
    if plan.rows_per_example > 1:
        title += f" · {plan.objective}: {plan.rank_batch} rows"
    if plan.ranks > 1:
        title += f" over {plan.ranks} ranks · per rank: {plan.rank_batch} rows"
        where = f"each {where}" if memory_gb is not None else "each machine like this one"
    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("memory", justify="right")
    for name, size in result.parts.items():
        table.add_row(name, format_bytes(size))
    table.add_row("[bold]peak[/bold]", f"[bold]{format_bytes(result.total_bytes)}[/bold]")
    table.add_row(f"available on {where}", format_bytes(result.available_bytes))
    out = console()
    out.print(table)
    if result.fits:
        out.print(f"[green]Fits[/green] on {where} with {format_bytes(result.available_bytes - result.total_bytes)} to spare.")
    else:
        out.print(f"[red]Does not fit[/red] on {where}; any of these brings it under:")
        for item in result.suggestions:
            out.print(f"  • {item}")
    for note in result.notes:
        out.print(f"[dim]{note}[/dim]")


def show_side_by_side(base: str, tuned: str) -> None:
    """Base and tuned answers side by side on a terminal; one after the other otherwise."""
    out = console()
    if not out.is_terminal:
        out.print(f"--- base ---\n{base}\n--- tuned ---\n{tuned}", markup=False, soft_wrap=True)
        return
    table = Table(show_lines=False, expand=True)
    table.add_column("base")
    table.add_column("tuned")
    table.add_row(base, tuned)
    out.print(table)


def show_data_report(report: Any, path: str, model: str) -> None:
    """``macft data check``'s report (a ``macft.data.check`` report)."""
    out = console()
    out.print(f"[bold]{path}[/bold] with the tokenizer of [bold]{model}[/bold], "
                  f"max_seq_length {report.max_seq_length}")
    counts = Table("split", "examples", "trained tokens", "truncated", "dropped", "duplicates", show_edge=False)
    lengths = Table("tokens per example", "min", "mean", "median", "p95", "max", show_edge=False)
    for name, split in report.splits.items():
        formats = ", ".join(f"{fmt} {n}" for fmt, n in sorted(split.formats.items()))
        out.print(f"{name}: {split.source} ({formats})", highlight=False)
        counts.add_row(name, str(split.examples), str(split.trained_tokens), _flagged(split.truncated),
                       _flagged(split.dropped), _flagged(split.duplicates))
        stats = split.lengths
        lengths.add_row(name, str(stats["min"]), f"{stats['mean']:.1f}", f"{stats['median']:.0f}",
                        f"{stats['p95']:.0f}", str(stats["max"]))
    out.print(counts)
    out.print(lengths)
    for name, count in report.overlap.items():
        out.print(f"{name} examples also in train: {_flagged(count)}")
    if report.padding:
        pad = report.padding
        out.print(
            f"padding at batch size {report.batch_size}: random {pad['random']:.1%}, "
            f"length-bucketed {pad['bucketed']:.1%}, packed {pad['packed']:.1%}"
        )
    if report.preview:
        legend = "[reverse green]trained[/reverse green], [dim]not trained[/dim]"
        out.print(f"\n[bold]{report.preview_source}[/bold] ({legend}):")
        text = Text()
        for run, trained in report.preview:
            text.append(run, style="reverse green" if trained else "dim")
        out.print(text)


def show_table_report(report: Any, path: str, model: str) -> None:
    """``macft data check`` on pairs, prompts or feedback: a report with ``table()`` (columns, a row per
    split, the columns whose non-zero counts deserve a look)."""
    out = console()
    out.print(f"[bold]{path}[/bold] ({report.kind}) with the tokenizer of [bold]{model}[/bold], max_seq_length {report.max_seq_length}")
    columns, rows, flagged = report.table()
    table = Table(*columns, show_edge=False)
    for row in rows:
        table.add_row(*(_flagged(v) if c in flagged else str(v) for c, v in zip(columns, row)))
    out.print(table)


def _flagged(count: int) -> str:
    return f"[yellow]{count}[/yellow]" if count else "0"


def show_eval_scores(result: Any, report: str | None) -> None:
    """Base and tuned scores (a ``macft.evaluate.EvalResult``) as one table."""
    names = list(result.scores)
    table = Table(title=f"{next(iter(result.scores.values())).examples} examples", title_justify="left")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    rows = [("loss", "loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"), ("exact match", "exact_match", "{:.1%}"),
            ("similarity", "similarity", "{:.3f}"), ("token F1", "f1", "{:.3f}")]
    for label, key, fmt in rows:
        values = [getattr(result.scores[n], key) for n in names]
        if all(v is None for v in values):
            continue
        table.add_row(label, *("—" if v is None else fmt.format(v) for v in values))
    out = console()
    out.print(table)
    if report:
        out.print(f"Per-example report: {report}")


def show_recipes(rows: list[dict]) -> None:
    """The bundled recipes: name, model, method and description."""
    table = Table(title="Recipes (run one with `macft lora NAME`)", title_justify="left")
    table.add_column("name", no_wrap=True)
    for column in ("model", "method", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["model"], row["method"], row["description"])
    console().print(table)


def show_models(found: list) -> None:
    """Local models (``macft.discovery.LocalModel``) with what --model accepts for each."""
    table = Table(title=f"{len(found)} local models", title_justify="left")
    table.add_column("name · --model spec", overflow="fold", ratio=1)
    table.add_column("source", no_wrap=True)
    table.add_column("family", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("quant", no_wrap=True)
    for m in found:
        params = f"{m.params / 1e9:.2f}B" if m.params and m.params >= 1e9 else f"{m.params / 1e6:.0f}M" if m.params else "?"
        size = f"{m.size_bytes / 1024**3:.2f} GiB" if m.size_bytes >= 1024**3 else f"{m.size_bytes / 1024**2:.0f} MiB"
        label = m.name if m.spec == m.name else f"{m.name}\n[dim]{m.spec}[/dim]"
        table.add_row(label, m.source, m.family or "?", params, size, m.quantization or "?")
    console().print(table)
