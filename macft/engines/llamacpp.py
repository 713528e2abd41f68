"""Generation with llama.cpp (llama-cpp-python) on the tuned model exported once to a cached Q8_0 GGUF.

On a CPU, MLX re-reads the full float32 output matrix for every token; llama.cpp runs the Q8_0 file
the user would ship, several times faster. The export goes through ``macft.export.pipeline`` (the
adapter fused in), is cached under ``<macft home>/llama.cpp/`` keyed by the base weights' sha256, the
adapter's files and the exporting code, and is written atomically. Prompts are tokenized by the same tokenizer and chat
template as the MLX path, and generation stops on the same end-of-sequence ids, so only the
weights' rounding differs.

    opened = open_llamacpp(None, adapter="runs/quickstart")   # an OpenedModel whose .model is a LlamaCppModel
    for piece in opened.model.stream_tokens(opened.tokenizer, ids, Sampling(max_tokens=64)): ...
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from macft.errors import MacftError

QUANT = "q8_0"
INSTALL = "pip install llama-cpp-python"
MAX_CONTEXT = 8192  # a chat's KV cache; the model's own limit when that is smaller


@dataclass(frozen=True)
class Piece:
    """One streamed piece of text; the last piece of an answer carries its totals."""

    text: str
    token: int
    generation_tokens: int
    generation_tps: float


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise MacftError(f"--engine llama.cpp needs llama-cpp-python, which is not installed: run `{INSTALL}` (or use --engine mlx).") from None
    return llama_cpp


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# The code a cached export depends on: a change to any of it (a fixed tensor map, a new rounding)
# must not keep serving the file the old code wrote, even within one version of macft.
EXPORT_CODE = ("export", "families", "methods", "models", "quants")


def exporter_fingerprint(root: Path | None = None) -> str:
    """sha256 of the source of the packages (under macft's folder, or ``root``) that write the cached GGUF."""
    import macft

    root = root or Path(macft.__file__).parent
    digest = hashlib.sha256()
    for source in sorted(f for package in EXPORT_CODE for f in (root / package).rglob("*.py")):
        digest.update(str(source.relative_to(root)).encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def cache_key(base_sha256: str, adapter: Path | None) -> str:
    """Names the export: the base weights, the adapter's weights and config, the quant and the exporter's code."""
    from macft.adapters.files import adapter_files

    parts = [base_sha256, QUANT, exporter_fingerprint()]
    if adapter is not None:
        parts += [file_sha256(f) for f in adapter_files(adapter)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def cached_gguf(model_spec: str, adapter: Path | None, base_sha256: str) -> tuple[Path, bool]:
    """(the Q8_0 GGUF of model_spec + adapter, whether it was already cached); exported on first use."""
    from macft.export.pipeline import default_out, export_gguf
    from macft.paths import atomic_path, cache_dir

    entry = cache_dir("llama.cpp") / cache_key(base_sha256, adapter)
    name = default_out(model_spec, None if adapter is None else str(adapter), QUANT, False).name
    if entry.is_dir() and (found := sorted(entry.glob("*.gguf"))):
        return found[0], True
    with atomic_path(entry) as tmp:
        tmp.mkdir()
        if adapter is None:
            export_gguf(model=model_spec, quant=QUANT, out=tmp / name)
        else:
            export_gguf(adapter=str(adapter), quant=QUANT, out=tmp / name)
    return entry / name, False


class LlamaCppModel:
    """A llama.cpp context over one GGUF file; ``stream_tokens`` mirrors ``mlx_lm.stream_generate``."""

    def __init__(self, path: Path, context_length: int):
        from macft.export.fidelity import open_llama

        require_llama_cpp()
        self.path = path
        self.llama = open_llama(
            path,
            n_ctx=min(context_length, MAX_CONTEXT),
            n_gpu_layers=-1,  # all layers on Metal where the wheel has it; ignored by CPU builds
            # Threads stay at llama-cpp-python's default (half the cores): with more threads than free
            # cores, llama.cpp's spinning threads wait on each other and generation slows many times over.
        )

    def stream_tokens(self, tokenizer, tokens: list[int], sampling) -> Iterator[Piece]:
        """Generate after ``tokens`` until an end-of-sequence id of ``tokenizer`` or ``sampling.max_tokens``."""
        if len(tokens) + sampling.max_tokens > self.llama.n_ctx():
            raise MacftError(
                f"The prompt ({len(tokens)} tokens) and --max-tokens {sampling.max_tokens} exceed the llama.cpp context "
                f"of {self.llama.n_ctx()} tokens; /reset the conversation or lower --max-tokens."
            )
        detokenizer = tokenizer.detokenizer
        detokenizer.reset()
        greedy = sampling.temperature == 0
        generator = self.llama.generate(
            tokens,
            temp=sampling.temperature,
            top_p=sampling.top_p if not greedy else 1.0,
            top_k=0,  # MLX samples from the whole vocabulary (top-p only), so llama.cpp does too
            min_p=0.0,
            repeat_penalty=1.0,
        )
        count, started, token = 0, None, -1
        for token in generator:
            if started is None:
                started = time.perf_counter()  # like mlx_lm, speed counts from the first token
            if token in tokenizer.eos_token_ids:
                break
            detokenizer.add_token(token)
            count += 1
            if count == sampling.max_tokens:
                break
            yield Piece(detokenizer.last_segment, token, count, 0.0)
        detokenizer.finalize()
        elapsed = time.perf_counter() - started if started is not None else 0.0
        yield Piece(detokenizer.last_segment, token, count, count / elapsed if elapsed > 0 else 0.0)


def open_llamacpp(model_spec: str | None, adapter: str | Path | None = None):
    """An ``OpenedModel`` whose ``model`` is a ``LlamaCppModel`` (no MLX weights are loaded once cached)."""
    from macft.models.tokenizer_cache import LazyTokenizer

    from macft.engines import OpenedModel
    from macft.models.load import LoadedModel, model_family, resolve_model_dir
    from macft.models.spec import DEFAULT_MODEL
    from macft.run_base import recorded_base

    require_llama_cpp()
    options: dict = {}
    if adapter is not None:
        recorded = recorded_base(adapter)
        if model_spec is not None and model_spec != recorded.spec:
            raise MacftError(f"--engine llama.cpp runs {adapter} on the base it was trained on ({recorded.spec}); drop --model.")
        model_spec, options = recorded.spec, recorded.options
    model_spec = model_spec or DEFAULT_MODEL
    model_dir, sha = resolve_model_dir(model_spec, revision=options.get("revision"), dequantize=bool(options.get("dequantize")))
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = LazyTokenizer(model_dir, config.get("eos_token_id"))
    path, _ = cached_gguf(model_spec, None if adapter is None else Path(adapter), sha)
    identity = {"source": model_spec, "path": str(model_dir), "family": model_family(config), "sha256": sha}
    loaded = LoadedModel(None, tokenizer, model_dir, config, identity)
    engine = LlamaCppModel(path, int(config.get("max_position_embeddings") or MAX_CONTEXT))
    return OpenedModel(loaded, engine, adapter=None if adapter is None else Path(adapter))
