"""How much of the fine-tune an exported GGUF kept: the file against the fused float model it came from.

Both models read the same validation examples of the run, teacher-forced, and are compared at the
trained positions (the completion): the mean loss per token, how often the file's top-1 token is the
float model's (agreement), and how many examples each reproduces exactly (every completion token
top-1). The file is run by llama.cpp (llama-cpp-python) when it is installed, the engine users run
it in; otherwise macft reads the written file back, dequantizes every tensor and runs those
weights in the float model's architecture.

    report = measure_fidelity(Path("run-q4_k_m.gguf"), loaded.model, examples, quant="q4_k_m")
    report.agreement, report.export_loss, report.warning
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from macft.errors import MacftError

DEFAULT_EXAMPLES = 16
MIN_AGREEMENT = 0.99  # below this share of completion tokens, the export warns
MAX_LOSS_RATIO = 2.0  # ... or when its loss exceeds this multiple of the float model's
LOSS_SLACK = 0.01  # nats per token tolerated on top, so near-zero float losses do not warn on noise


def open_llama(path: Path, **options):
    """``llama_cpp.Llama`` on ``path`` with llama.cpp's own log silenced: llama-cpp-python's
    ``verbose=False`` still prints llama.cpp's warnings (it maps ggml's log levels one off)."""
    import llama_cpp

    llama_cpp.llama_log_set(discard_logs(), None)
    return llama_cpp.Llama(model_path=str(path), verbose=False, **options)


@functools.cache  # one callback for the process: llama.cpp keeps calling the pointer it was given
def discard_logs():
    import llama_cpp

    return llama_cpp.llama_log_callback(lambda level, text, user_data: None)


@dataclass
class Positions:
    """One model's view of the trained positions of every example."""

    losses: list[np.ndarray] = field(default_factory=list)  # per example: loss at each trained position
    top1: list[np.ndarray] = field(default_factory=list)  # per example: the arg-max token at each
    targets: list[np.ndarray] = field(default_factory=list)


@dataclass
class Fidelity:
    scorer: str  # "llama.cpp" or "macft"
    examples: int
    tokens: int  # trained positions compared
    float_loss: float  # mean loss per token of the fused float model
    export_loss: float  # ... of the exported file
    agreement: float  # share of positions where the file's top-1 token is the float model's
    float_exact: int  # examples whose every completion token is the float model's top-1
    export_exact: int
    warning: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        return [
            f"Fidelity ({self.scorer}, {self.examples} validation examples, {self.tokens} completion tokens): "
            f"loss {self.export_loss:.4f} vs {self.float_loss:.4f} for the float model, "
            f"top-1 agreement {self.agreement:.1%}, exact answers {self.export_exact}/{self.examples} "
            f"(float {self.float_exact}/{self.examples})"
        ]


def positions_of(logits: np.ndarray, tokens: list[int], mask: list[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(loss, top-1, target) at the trained positions, from logits for inputs ``tokens[:-1]``."""
    trained = np.flatnonzero(np.asarray(mask[1:], dtype=bool))
    logits = np.asarray(logits, dtype=np.float32)[trained]
    targets = np.asarray(tokens[1:], dtype=np.int64)[trained]
    peak = logits.max(axis=1)
    log_z = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
    return log_z - logits[np.arange(len(targets)), targets], logits.argmax(axis=1), targets


def mlx_positions(model, examples: list) -> Positions:
    import mlx.core as mx

    out = Positions()
    for example in examples:
        logits = model(mx.array(example.tokens[:-1])[None])[0].astype(mx.float32)
        loss, top1, targets = positions_of(np.array(logits), example.tokens, example.mask)
        out.losses.append(loss), out.top1.append(top1), out.targets.append(targets)
    return out


def llama_cpp_positions(path: Path, examples: list) -> Positions:
    context = max(len(e.tokens) for e in examples) + 8
    llm = open_llama(path, n_ctx=context, n_batch=context, logits_all=True)
    out = Positions()
    try:
        for example in examples:
            llm.reset()
            llm.eval(example.tokens[:-1])
            logits = np.array(llm.scores[: len(example.tokens) - 1], dtype=np.float32)
            loss, top1, targets = positions_of(logits, example.tokens, example.mask)
            out.losses.append(loss), out.top1.append(top1), out.targets.append(targets)
    finally:
        llm.close()
    return out


def gguf_weights(path: Path) -> dict:
    """The tensors of a GGUF file as mlx-lm float32 weights, read with macft's own reader."""
    import mlx.core as mx

    from macft.models.gguf_import.families import family_for, hf_name, import_config
    from macft.models.gguf_import.reader import read_gguf
    from macft.quants import decode

    gguf = read_gguf(path)
    family = family_for(gguf)
    config = import_config(gguf, family)
    weights = {}
    for name, info in gguf.tensors.items():
        hf = hf_name(family, name)
        if hf:
            values = decode(gguf.rows(name), info.qtype).reshape(info.shape)
            values = family.import_float(hf, family.import_columns(hf, family.import_rows(hf, values, config), config))
            weights[hf] = mx.array(np.ascontiguousarray(values, dtype=np.float32))
    return weights


def macft_positions(path: Path, model, examples: list) -> Positions:
    """Run the file's weights in ``model``'s architecture (its own weights are put back after)."""
    from mlx.utils import tree_flatten

    original = tree_flatten(model.parameters())
    model.load_weights(list(gguf_weights(path).items()), strict=False)
    try:
        return mlx_positions(model, examples)
    finally:
        model.load_weights(original, strict=False)


def compare(reference: Positions, exported: Positions, scorer: str, quant: str) -> Fidelity:
    ref_loss, exp_loss = np.concatenate(reference.losses), np.concatenate(exported.losses)
    same = np.concatenate([a == b for a, b in zip(reference.top1, exported.top1)])
    report = Fidelity(
        scorer=scorer,
        examples=len(reference.losses),
        tokens=int(ref_loss.size),
        float_loss=float(ref_loss.mean()),
        export_loss=float(exp_loss.mean()),
        agreement=float(same.mean()),
        float_exact=sum(bool((t == y).all()) for t, y in zip(reference.top1, reference.targets)),
        export_exact=sum(bool((t == y).all()) for t, y in zip(exported.top1, exported.targets)),
    )
    report.warning = fidelity_warning(report, quant)
    return report


def fidelity_warning(report: Fidelity, quant: str) -> str | None:
    lost_loss = report.export_loss > MAX_LOSS_RATIO * report.float_loss + LOSS_SLACK
    if report.agreement >= MIN_AGREEMENT and not lost_loss:
        return None
    higher = {"q4_0": "q4_k_m", "q4_k_m": "q6_k", "q5_k_m": "q8_0", "q6_k": "q8_0"}.get(quant)
    better = f"export with --quant {higher}, or " if higher else ""
    return (
        f"this {quant} file lost part of the fine-tune (top-1 agreement {report.agreement:.1%}, loss "
        f"{report.export_loss:.4f} vs {report.float_loss:.4f}): {better}ship the base GGUF with an adapter GGUF "
        "(--adapter-only), which keeps the fine-tune exactly"
    )


def measure_fidelity(path: Path, model, examples: list, *, quant: str, scorer: str | None = None) -> Fidelity:
    """Score the GGUF at ``path`` against ``model`` (the fused float model) on ``examples``
    (``macft.data.Example`` with trained positions). ``scorer``: "llama.cpp", "macft" or None
    (llama.cpp when llama-cpp-python is installed)."""
    examples = [e for e in examples if any(e.mask[1:])]
    if not examples:
        raise MacftError("No validation example has completion tokens to measure the export's fidelity on.")
    if scorer is None:
        scorer = "llama.cpp" if importlib.util.find_spec("llama_cpp") else "macft"
    reference = mlx_positions(model, examples)
    if scorer == "llama.cpp":
        exported = llama_cpp_positions(Path(path), examples)
    else:
        exported = macft_positions(Path(path), model, examples)
    return compare(reference, exported, scorer, quant)


def validation_sample(run_dir: Path, tokenizer, count: int = DEFAULT_EXAMPLES) -> tuple[list, str]:
    """Up to ``count`` examples of the run's validation split (else its test split), in a seeded
    order, and the split's name."""
    from macft.config import load_recipe
    from macft.data import load_splits

    recipe_file = Path(run_dir) / "recipe.yaml"
    if not recipe_file.is_file():
        raise MacftError(f"{recipe_file} is missing, so the run's validation data is unknown.")
    recipe = load_recipe(recipe_file)
    splits = load_splits(recipe.data, tokenizer)
    for name in ("valid", "test"):
        pool = getattr(splits, name)
        if pool:
            order = np.random.default_rng(recipe.train.seed).permutation(len(pool))[:count]
            return [pool[i] for i in sorted(order)], name
    return [], ""
