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


def open_base(model_spec: str | None, adapter: str | Path | None):
    """(spec, sha256, LoadedModel without weights) of the base that ``adapter`` was trained on (with
    its recorded load options), else of ``model_spec``."""
    from macft.models.load import LoadedModel, model_family, resolve_model_dir
    from macft.models.spec import DEFAULT_MODEL
    from macft.models.tokenizer_cache import LazyTokenizer
    from macft.run_base import recorded_base

    options: dict = {}
    if adapter is not None:
        recorded = recorded_base(adapter)
        model_spec, options = model_spec or recorded.spec, recorded.options
    model_spec = model_spec or DEFAULT_MODEL
    model_dir, sha = resolve_model_dir(model_spec, revision=options.get("revision"), dequantize=bool(options.get("dequantize")))
    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = LazyTokenizer(model_dir, config.get("eos_token_id"))
    identity = {"source": model_spec, "path": str(model_dir), "family": model_family(config), "sha256": sha}
    return model_spec, sha, LoadedModel(None, tokenizer, model_dir, config, identity)


def context_length(config: dict) -> int:
    return int(config.get("max_position_embeddings") or MAX_CONTEXT)


def open_llamacpp(model_spec: str | None, adapter: str | Path | None = None):
    """An ``OpenedModel`` whose ``model`` is a ``LlamaCppModel`` (no MLX weights are loaded once cached)."""
    from macft.engines import OpenedModel
    from macft.run_base import recorded_base

    require_llama_cpp()
    if adapter is not None and model_spec is not None and model_spec != (recorded := recorded_base(adapter)).spec:
        raise MacftError(f"--engine llama.cpp runs {adapter} on the base it was trained on ({recorded.spec}); drop --model.")
    model_spec, sha, loaded = open_base(model_spec, adapter)
    path, _ = cached_gguf(model_spec, None if adapter is None else Path(adapter), sha)
    engine = LlamaCppModel(path, context_length(loaded.config))
    return OpenedModel(loaded, engine, adapter=None if adapter is None else Path(adapter))


def cached_adapter_gguf(run_dir: Path, base_sha256: str) -> Path:
    """The run's LoRA as an adapter GGUF (float32, for llama.cpp's runtime LoRA), exported on first use."""
    from macft.export.adapter_gguf import write_adapter_gguf
    from macft.paths import atomic_path, cache_dir

    entry = cache_dir("llama.cpp") / f"{cache_key(base_sha256, run_dir)}-lora"
    if (entry / "adapter.gguf").is_file():
        return entry / "adapter.gguf"
    with atomic_path(entry) as tmp:
        tmp.mkdir()
        write_adapter_gguf(run_dir, tmp / "adapter.gguf")
    return entry / "adapter.gguf"


class LlamaCppAdapters:
    """``macft serve --engine llama.cpp``: the base's cached Q8_0 GGUF in one llama.cpp context, and
    each LoRA adapter loaded once as an adapter GGUF and switched at runtime, so the base is read once
    and a switch costs no reload. llama.cpp adds the float32 adapter to the Q8_0 base (``generate
    --engine llama.cpp`` fuses first, then rounds), so answers can differ from it past near-ties."""

    name = "llama.cpp"

    def __init__(self, model_spec: str | None, adapters: dict[str, Path]):
        from macft.adapters.files import adapter_files

        self.llama_cpp = require_llama_cpp()
        if not hasattr(self.llama_cpp, "llama_set_adapters_lora"):
            raise MacftError("This llama-cpp-python cannot switch LoRA adapters at runtime; upgrade it (pip install -U llama-cpp-python) or serve with --engine mlx.")
        spec, self.base_sha256, self.loaded = open_base(model_spec, next(iter(adapters.values()), None))
        base_gguf, _ = cached_gguf(spec, None, self.base_sha256)
        self.model = LlamaCppModel(base_gguf, context_length(self.loaded.config))
        self.handles = {}
        for name, run_dir in adapters.items():
            method = json.loads(adapter_files(run_dir)[1].read_text()).get("method")
            if method != "lora":
                raise MacftError(f"Adapter '{name}' is a '{method}' adapter; llama.cpp switches LoRA adapters only, so serve it with --engine mlx.")
            path = cached_adapter_gguf(Path(run_dir), self.base_sha256)
            # llama-cpp-python keeps the model and context pointers on private members; they stay alive with self.model.
            handle = self.llama_cpp.llama_adapter_lora_init(self.model.llama._model.model, str(path).encode())
            if not handle:
                raise MacftError(f"llama.cpp could not load the adapter GGUF of '{name}' ({path}).")
            self.handles[name] = handle  # freed with the model
        self.current: str | None = None

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    def use(self, adapter: str | None) -> None:
        import ctypes

        if adapter == self.current:
            return
        context = self.model.llama._ctx.ctx
        if adapter is None:
            status = self.llama_cpp.llama_set_adapters_lora(context, None, 0, None)
        else:
            handles = (self.llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.handles[adapter])
            status = self.llama_cpp.llama_set_adapters_lora(context, handles, 1, (ctypes.c_float * 1)(1.0))
        if status != 0:
            raise MacftError(f"llama.cpp refused to switch to '{adapter or 'the base'}' (status {status}).")
        self.model.llama.reset()  # the cached keys and values were computed with the previous adapter
        self.current = adapter

    def seed(self, value: int) -> None:
        self.model.llama.set_seed(value)

    def stream(self, tokens: list[int], sampling) -> Iterator[Piece]:
        return self.model.stream_tokens(self.loaded.tokenizer, tokens, sampling)
