"""``macft lora`` through click's CliRunner on a tiny model and a tiny dataset."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from macft.cli import cli


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [{"prompt": f"Q: {i} plus one?", "completion": f" {i + 1}"} for i in range(30)]
    for name, part in (("train", rows[:20]), ("valid", rows[20:25]), ("test", rows[25:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return folder


def invoke(*args):
    return CliRunner().invoke(cli, ["lora", *map(str, args)])


def test_lora_cli_runs_end_to_end(tiny_model_dir, data_dir, tmp_path):
    result = invoke(
        "--model", tiny_model_dir, "--data", data_dir, "--iters", 4, "--batch-size", 4, "--rank", 4,
        "--out-dir", tmp_path / "runs", "--name", "smoke", "--set", "train.report_every=2", "--set", "train.eval_every=2",
        "--set", "demo.count=2", "--set", "demo.max_tokens=4",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "smoke"
    for name in ("adapters.safetensors", "adapter_config.json", "recipe.yaml", "metrics.jsonl", "summary.json", "loss.png"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / "last" / "optimizer.safetensors").exists()
    assert "step 4/4" in result.output and "val loss" in result.output
    assert "Run summary" in result.output and "Exact match on 5 held-out examples" in result.output
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["train"]["iters"] == 4 and saved["method"]["rank"] == 4 and saved["model"]["path"] == str(tiny_model_dir)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["compiled"] and summary["tokens_seen"] > 0


def test_qlora_json_and_resume_notes(tiny_model_dir, data_dir, tmp_path):
    result = invoke(
        "--model", tiny_model_dir, "--data", data_dir, "--method", "qlora", "--iters", 2, "--out-dir", tmp_path / "runs",
        "--name", "q", "--json", "--set", "demo.count=0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["steps"] == 2 and summary["method"] == "lora"
    assert any("dequantize" in p for p in summary["fast_paths"])
    config = json.loads((tmp_path / "runs" / "q" / "adapter_config.json").read_text())
    assert config["quantize_bits"] == 4

    resumed = invoke("--resume", tmp_path / "runs" / "q", "--iters", 3, "--set", "demo.count=0")
    assert resumed.exit_code == 0, resumed.output
    assert "Overriding the resumed run's train.iters: 2 → 3" in resumed.output
    assert json.loads((tmp_path / "runs" / "q" / "summary.json").read_text())["steps"] == 3


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "train.bogus=1"], "unknown recipe key 'train.bogus'"),
        (["--set", "trainiters"], "must look like section.key=value"),
        (["--data", "/nonexistent/data.jsonl"], "does not exist"),
        (["no-such-recipe"], "No recipe named 'no-such-recipe'"),
        (["--resume", "/nonexistent/run"], "Cannot resume"),
    ],
)
def test_bad_inputs_give_one_line_errors(tiny_model_dir, tmp_path, args, message):
    result = invoke("--model", tiny_model_dir, "--out-dir", tmp_path / "runs", *args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
