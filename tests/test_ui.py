"""Terminal drawing: the loss chart under the run summary and the spinner that names slow phases."""

from __future__ import annotations

import io

from rich.console import Console

from macft import phases
from macft.ui import PhaseSpinner, TrainingView, loss_chart


def rendered(renderable) -> str:
    capture = Console(file=io.StringIO(), width=100, force_terminal=False)
    capture.print(renderable)
    return capture.file.getvalue()


def test_loss_chart_places_each_loss_by_step_and_value():
    train = [(step, 5.0 - step / 10) for step in range(1, 21)]  # 4.9 down to 3.0
    valid = [(10, 4.5), (20, 3.5)]
    lines = loss_chart(train, valid, width=40, height=8)
    rows = lines[:8]
    assert rows[0].startswith("4.900 │") and rows[-1].startswith("3.000 │")
    plot = [row.split("│", 1)[1] for row in rows]
    assert plot[0][0] == "•" and plot[-1][-1] == "•"  # first report top left, last bottom right
    columns = {col: r for r, line in enumerate(plot) for col, ch in enumerate(line) if ch == "•"}
    assert all(columns[a] <= columns[b] for a, b in zip(sorted(columns), sorted(columns)[1:]))  # never rises
    diamonds = [(r, c) for r, line in enumerate(plot) for c, ch in enumerate(line) if ch == "◆"]
    # step 10 sits at column 39 * 9/19 = 18; 4.5 at row 7 * 0.4/1.9 = 1; step 20, 3.5 at (5, 39)
    assert diamonds == [(1, 18), (5, 39)]
    assert lines[-1].split() == ["step", "1", "20"]
    assert loss_chart([], []) == []


def test_phase_spinner_names_the_innermost_phase_and_closes():
    out = Console(file=io.StringIO(), force_terminal=True, width=100)
    spinner = PhaseSpinner(out)
    with phases.reporting(spinner):
        with phases.phase("Loading tiny"):
            with phases.phase("Importing tiny.gguf"):
                assert "Importing tiny.gguf · 0:00" in rendered(spinner)
            assert "Loading tiny · 0:00" in rendered(spinner)
        assert spinner.live is None and not spinner.running
    with phases.phase("unreported"):  # no reporter outside the block
        pass


def test_phases_stay_silent_off_a_terminal():
    out = Console(file=io.StringIO(), force_terminal=False)
    with phases.reporting(PhaseSpinner(out)), phases.phase("Loading tiny"):
        pass
    assert out.file.getvalue() == ""


def test_training_view_shows_phases_then_the_compiling_first_steps():
    view = TrainingView(title="t", out=Console(file=io.StringIO(), force_terminal=True, width=100))
    with view:
        with phases.phase("Loading tiny"):
            assert "Loading tiny · 0:00" in rendered(view)
        assert "first steps compile" in rendered(view)
        view.on_train_report({"step": 1, "iters": 2, "epoch": 0.5, "train_loss": 2.0, "learning_rate": 1e-4,
                              "tokens_per_second": 10.0, "elapsed": 1.0, "eta": 1.0, "peak_memory": 1024})  # fmt: skip
        assert "1/2" in rendered(view) and "first steps" not in rendered(view)


def test_slow_library_calls_mark_their_phases(tiny_model_dir, tmp_path):
    from contextlib import contextmanager

    from macft.data import read_records
    from macft.evaluate import EvalOptions, evaluate
    from macft.models.load import load_model

    names = []

    @contextmanager
    def record(name):
        names.append(name)
        yield

    path = tmp_path / "test.jsonl"
    path.write_text('{"prompt": "1 plus 1?", "completion": " 2"}\n{"prompt": "2 plus 2?", "completion": " 4"}\n')
    with phases.reporting(record):
        loaded = load_model(str(tiny_model_dir))
        evaluate(loaded.model, loaded.tokenizer, read_records(path), EvalOptions(max_tokens=2))
    assert names == [f"Loading {tiny_model_dir}", "Generating 2 answers"]
