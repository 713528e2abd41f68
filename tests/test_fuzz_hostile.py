"""Issue #27, group 8: fuzzers for what a model file claims, what a chat template builds and what a
reward does, each bounded in time and memory.

- GGUF and config.json: a real tiny model whose sizes and counts are changed one or two at a time
  (to 0, past the weights, past MLX's int32 dimensions, to the wrong type), imported and loaded in a
  child process with its address space capped (``bounded.py``); each case must load or be refused
  in one line, quickly, and the child's peak memory stays small.
- Chat templates: templates built from the constructs that multiply a size (operators, string
  methods, filters, loops, namespaces, recursion), rendered in a capped child process; each must
  render or stop in one line, without MemoryError, within the render deadline.
- GRPO rewards: functions that raise, exit, kill their process, hang, spin, print or return what is
  not a number, each one line naming the reward, within its time limit, and leaving no process behind.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import textwrap
import time
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner

from bounded import GIB, run_bounded
from macft.objectives import rewards as reward_module
from macft.objectives.rewards import load_rewards, score
from macft.cli import cli
from macft.errors import MacftError

# What each case is changed to: nothing, past what the weights hold, past MLX's int32, the wrong type.
SIZES = [0, 3, 200_000, 2**31, 2**33, 2**63 - 1]
WRONG = ["12", 2.5, None, [1] * 5]

# Runs in the capped child: every case's outcome as one JSON line.
CHILD = textwrap.dedent(
    """
    import json, resource, sys, time, traceback
    import macft
    from macft.errors import MacftError

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def outcome(name, action):
        start = time.monotonic()
        try:
            action()
            result = {"ok": True}
        except MacftError as exc:
            result = {"refused": str(exc)}
        except Exception:
            result = {"crash": traceback.format_exc()[-2000:]}
        print(json.dumps({"case": name, "seconds": time.monotonic() - start, "peak": peak(), **result}), flush=True)
    """
)


def run_child(code: str, cwd: Path, timeout: float = 600) -> list[dict]:
    outcome = run_bounded([sys.executable, "-c", CHILD + textwrap.dedent(code)], cwd, timeout=timeout)
    assert outcome.returncode == 0 and not outcome.timed_out, outcome.summary()
    assert outcome.peak_rss < 1.5 * GIB, outcome.summary()
    return [json.loads(line) for line in outcome.lines if line.startswith("{")]


def assert_bounded(results: list[dict], cases: int, seconds: float) -> None:
    assert len(results) == cases, results[-1:]
    for result in results:
        assert "crash" not in result, f"{result['case']}: {result['crash']}"
        assert "\n" not in result.get("refused", ""), result
        assert "MemoryError" not in result.get("refused", ""), result
        assert result["seconds"] < seconds, result


# ---------------------------------------------------------------------------- GGUF and config.json


def rewrite_gguf(source: Path, out: Path, changes: dict[str, object]) -> Path:
    """``source`` rewritten by gguf-py with some metadata values replaced (a Python int beyond
    32 bits is stored as UINT64/INT64, a list as an array, a string as a string)."""
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(out), reader.get_field("general.architecture").contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture" or field.name in changes:
            continue
        vtype = field.types[0]
        writer.add_key_value(field.name, field.contents(), vtype, field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for key, value in changes.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, str, list)):
            raise TypeError(value)
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif value < 0:
            writer.add_int64(key, value)
        else:
            writer.add_uint64(key, value) if value >= 2**32 else writer.add_uint32(key, value)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


GGUF_KEYS = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
             "context_length", "rope.dimension_count"]


def test_gguf_claims_fuzz_imports_or_refuses_in_one_line(tiny_model_dir, tmp_path):
    source = tmp_path / "tiny.gguf"
    result = CliRunner().invoke(cli, ["export", "gguf", "--model", str(tiny_model_dir), "--out", str(source), "--quant", "f16"])
    assert result.exit_code == 0, result.output
    rng = random.Random(27)
    cases = [{f"llama.{key}": value} for key in GGUF_KEYS for value in SIZES + WRONG[:2]]
    cases += [{f"llama.{a}": rng.choice(SIZES), f"llama.{b}": rng.choice(SIZES)} for a, b in (rng.sample(GGUF_KEYS, 2) for _ in range(10))]
    cases += [{"tokenizer.ggml.bos_token_id": 2**32 - 1}, {"tokenizer.ggml.tokens": ["a", "b"]}, {"llama.rope.freq_base": float("nan")},
              {"general.alignment": 0}, {"llama.block_count": None}]
    files = [rewrite_gguf(source, tmp_path / f"case{i}.gguf", changes) for i, changes in enumerate(cases)]
    results = run_child(
        f"""
        from pathlib import Path
        from macft.models.gguf_import import import_gguf
        from macft.models.load import load_model
        from macft.models.shape import read_model_shape
        for i, path in enumerate({[str(f) for f in files]!r}):
            outcome(f"case{{i}} import+load", lambda: load_model(str(import_gguf(path, out=Path(path).with_suffix(".d")))))
            outcome(f"case{{i}} estimate", lambda: read_model_shape(path))
        """,
        tmp_path,
    )
    assert_bounded(results, 2 * len(cases), seconds=20)
    refused = {r["case"] for r in results if "refused" in r}
    assert "case0 import+load" in refused and any("200,000" in r.get("refused", "") for r in results)


CONFIG_KEYS = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "vocab_size", "max_position_embeddings"]


def test_config_json_claims_fuzz_loads_or_refuses_in_one_line(tiny_model_dir, tmp_path):
    rng = random.Random(27)
    cases = [{key: value} for key in CONFIG_KEYS for value in SIZES + WRONG]
    cases += [{a: rng.choice(SIZES), b: rng.choice(SIZES + WRONG)} for a, b in (rng.sample(CONFIG_KEYS, 2) for _ in range(10))]
    cases += [{"model_type": "no_such_model"}, {"rope_theta": -1.0}, {"tie_word_embeddings": "yes"}, {"text_config": {"num_hidden_layers": 10**6}}]
    folders = []
    base = json.loads((tiny_model_dir / "config.json").read_text())
    for i, changes in enumerate(cases):
        folder = shutil.copytree(tiny_model_dir, tmp_path / f"case{i}", ignore=shutil.ignore_patterns(".macft-hash.json"))
        (folder / "config.json").write_text(json.dumps({**base, **changes}))
        folders.append(str(folder))
    (tmp_path / "case-list" / "config.json").parent.mkdir()
    (tmp_path / "case-list" / "config.json").write_text("[1, 2]")
    shutil.copy(tiny_model_dir / "model.safetensors", tmp_path / "case-list")
    folders.append(str(tmp_path / "case-list"))
    results = run_child(
        f"""
        from macft.models.load import load_model
        from macft.models.shape import read_model_shape
        for i, folder in enumerate({folders!r}):
            outcome(f"case{{i}} estimate", lambda: read_model_shape(folder))
            outcome(f"case{{i}} load", lambda: load_model(folder))
        """,
        tmp_path,
    )
    assert_bounded(results, 2 * len(folders), seconds=20)
    by_case = {r["case"]: r for r in results}
    assert "refused" in by_case["case2 load"], by_case["case2 load"]  # num_hidden_layers 200,000 on 2 layers of weights


# ---------------------------------------------------------------------------- chat templates

# Values a template can start from, and ways to grow them; N is replaced by a size.
SEEDS = ["'xy'", "messages[0]['content']", "(range(1000)|list)", "[1, 2, 3]", "'a,b,c'", "bos_token", "{'k': 'v'}"]
GROWERS = [
    "{v} * N", "N * {v}", "{v} ~ {v}", "{v} + {v}", "({v}|string) * N", "{v}|center(N)", "({v}|string).ljust(N)",
    "({v}|string).zfill(N)", "({v}|string).center(N)", "({v}|string).replace('a', 'a' * N)", "{v}|replace('x', 'x' * N)",
    "('-' * N).join({v}|string)", "{v}|join('-' * N)", "{v}|indent(N)", "{v}|tojson(indent=N)", "'%*s' % (N, {v})",
    "('{:>' ~ N ~ '}').format({v})", "{v}|batch(N, 'x')|list", "{v}|slice(N)|list", "('%' ~ N ~ 's') % {v}",
    "({v}|string).expandtabs(N)", "10 ** N", "(2 ** N) * (2 ** N)", "lipsum(N)",
]
SIZES_IN_TEMPLATES = ["(10)", "(100000)", "(5*10**9)", "(10**10)", "(99999999999)"]
LOOPS = [
    "{{% for i in range(99999) %}}{{% for j in range(99999) %}}{{% endfor %}}{{% endfor %}}",
    "{{% set ns = namespace(s='x') %}}{{% for i in range(64) %}}{{% set ns.s = ns.s ~ ns.s %}}{{% endfor %}}{{{{ ns.s|length }}}}",
    "{{% macro d(s, n) %}}{{% if n %}}{{{{ d(s ~ s, n - 1) }}}}{{% endif %}}{{% endmacro %}}{{{{ d('x', 64) }}}}",
    "{{% for i in range(99999) %}}{{{{ 'x' * 9999 }}}}{{% endfor %}}",
    "{{% set ns = namespace(l=[1]) %}}{{% for i in range(40) %}}{{% set ns.l = ns.l + ns.l %}}{{% endfor %}}{{{{ ns.l|length }}}}",
]


def test_template_fuzz_renders_or_stops_in_one_line(tiny_model_dir, tmp_path):
    rng = random.Random(27)
    templates = [
        "{{ " + grower.replace("{v}", seed).replace("N", size) + " }}"
        for grower in GROWERS
        for seed, size in [(rng.choice(SEEDS), rng.choice(SIZES_IN_TEMPLATES)) for _ in range(3)]
    ]
    templates += [loop.format() for loop in LOOPS]
    templates += ["{{ " + rng.choice(GROWERS).replace("{v}", "(" + rng.choice(GROWERS).replace("{v}", rng.choice(SEEDS)) + ")")
                  .replace("N", rng.choice(SIZES_IN_TEMPLATES)) + " }}" for _ in range(20)]
    results = run_child(
        f"""
        from macft.models import chat_template
        from macft.models.chat_template import template_tokens
        from macft.models.tokenizer_cache import load_tokenizer
        chat_template.RENDER_SECONDS = 1.0
        tokenizer = load_tokenizer({str(tiny_model_dir)!r})
        for i, template in enumerate({templates!r}):
            tokenizer._tokenizer.chat_template = template
            outcome(f"template {{i}}: {{template}}", lambda: template_tokens(tokenizer, [{{"role": "user", "content": "hi"}}], add_generation_prompt=True))
        """,
        tmp_path,
    )
    assert_bounded(results, len(templates), seconds=1.0 + 2.0)  # the deadline, plus a loaded machine's slack
    stopped = [r for r in results if "was stopped" in r.get("refused", "")]
    assert len(stopped) > len(templates) // 3, [r["case"] for r in results if "ok" in r][:10]


# ---------------------------------------------------------------------------- GRPO rewards

FAULTS = {
    "raises": ("raise ValueError('bad input')", "ValueError: bad input"),
    "returns text": ("return 'high'", "ValueError"),
    "returns None": ("return None", "TypeError"),
    "returns NaN": ("return float('nan')", "returned nan"),
    "returns a huge integer": ("return 10 ** 400", "OverflowError"),
    "exits cleanly": ("import sys; sys.exit(0)", "called sys.exit(0)"),
    "exits with a message": ("import sys; sys.exit('done')", "called sys.exit('done')"),
    "ends its process": ("import os; os._exit(0)", "ended its process (exit status 0)"),
    "kills its process": ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "ended its process (killed by signal 9)"),
    "terminates its process": ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", "ended its process (killed by signal 15)"),
    "sleeps": ("import time; time.sleep(10**6)", "did not return within 1 s"),
    "spins": ("while True: pass", "did not return within 1 s"),
    "closes its files": ("import os; os.closerange(0, 1024); return 1.0", "ended its process"),
    "prints a lot": ("print('x' * 10**7); return 2.0", None),
    "reads its input": ("import sys; sys.stdin.read(); return 3.0", None),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_reward_faults_are_one_line_and_leave_no_process(fault, tmp_path, monkeypatch):
    body, expected = FAULTS[fault]
    module = tmp_path / "faulty.py"
    module.write_text(f"def score(completion, example):\n    {body}\n")
    monkeypatch.chdir(tmp_path)
    rewards = load_rewards(["faulty.py:score"], timeout=1.0)
    start = time.monotonic()
    try:
        if expected is None:  # harmless: the value arrives
            assert score(rewards, ["a"], [{}], ["p.jsonl:1"]).tolist() == [float(body.rsplit(" ", 1)[1])]
        else:
            with pytest.raises(MacftError) as info:
                score(rewards, ["a"], [{}], ["p.jsonl:1"])
            message = str(info.value)
            assert "\n" not in message and message.startswith("Reward 'faulty.py:score'") and "p.jsonl:1" in message, message
            assert expected in message, message
    finally:
        rewards.close()
    assert time.monotonic() - start < 1.0 + 10.0  # its time limit, plus a loaded machine's slack
    assert rewards._process.poll() is not None  # no process left behind


@pytest.mark.parametrize(
    "body,expected",
    [("import sys\nsys.exit(2)", "importing the rewards failed (it called sys.exit(2)"), ("raise ImportError('no')", "importing faulty failed"),
     ("import time\ntime.sleep(10**6)", "did not return within 2 s")],
)
def test_a_reward_module_that_fails_to_import_is_one_line(body, expected, tmp_path, monkeypatch):
    (tmp_path / "faulty.py").write_text(body + "\ndef score(completion, example):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reward_module, "IMPORT_SECONDS", 2.0)
    with pytest.raises(MacftError) as info:
        load_rewards(["faulty:score"], timeout=1.0)
    assert "\n" not in str(info.value) and expected in str(info.value), str(info.value)
