"""Open a base model from wherever the user has it: the embedded default, a folder, a GGUF file or the hub.

Every path ends in an MLX model directory that ``mlx_lm`` loads with its own architectures;
GGUF files are imported first (``macft.models.gguf_import``) and cached by content hash.

    loaded = load_model("gemma3-270m")              # the embedded Gemma 3 270M
    loaded = load_model("path/to/model.gguf", quantize_bits=4)
    loaded = load_model("Qwen/Qwen3-0.6B")           # downloaded from the hub
    loaded = load_model("ollama:qwen3:0.6b")         # the GGUF Ollama runs (also lmstudio:NAME)
"""

from __future__ import annotations

import hashlib
import math
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macft.errors import MacftError
from macft.families import for_model_type
from macft.models.claims import check_folder_claims
from macft.models.spec import DEFAULT_MODEL, locate
from macft.memory_limit import check_room, is_out_of_memory, limit_bytes, model_bytes, out_of_memory_message
from macft.models.tokenizer_cache import LazyTokenizer
from macft.models.weights import check_finite
from macft.phases import phase


@dataclass(frozen=True)
class ModelConfig:
    """The recipe's ``model`` section: which base model, and how it is loaded."""

    path: str = DEFAULT_MODEL  # a model spec (macft.models.spec): hub id, model folder, .gguf file, ollama:/lmstudio: name
    revision: str | None = None  # hub revision
    quantize_bits: int | None = None  # QLoRA: quantize the frozen base to 4 or 8 bits at load
    quantize_group_size: int = 64
    allow_qlora: bool = False  # the memory planner may quantize the frozen base to 4 bits when nothing else fits
    dequantize: bool = False  # GGUF import: a float model instead of exact quantized weights
    trust_remote_code: bool = False

    def problems(self) -> list[str]:
        checks = [
            (self.quantize_bits in (None, 2, 3, 4, 5, 6, 8), "model.quantize_bits must be 4 or 8 (or 2, 3, 5, 6)."),
            (self.quantize_group_size in (32, 64, 128), "model.quantize_group_size must be 32, 64 or 128."),
        ]
        return [message for ok, message in checks if not ok]

    @property
    def recorded(self) -> dict:
        """How the base was loaded, as an adapter config records it beside the base's identity."""
        return {"quantize_bits": self.quantize_bits, "quantize_group_size": self.quantize_group_size}

    @property
    def load_options(self) -> dict:
        """``load_model`` keywords (besides the spec)."""
        return {
            "revision": self.revision, "quantize_bits": self.quantize_bits, "group_size": self.quantize_group_size,
            "dequantize": self.dequantize, "trust_remote_code": self.trust_remote_code,
        }


@dataclass
class LoadedModel:
    model: Any  # mlx.nn.Module (an mlx-lm architecture)
    lazy_tokenizer: LazyTokenizer  # loads the tokenizer when ``tokenizer`` is first read
    path: Path  # the MLX model directory the weights came from
    config: dict
    identity: dict = field(default_factory=dict)  # {"source", "path", "family", "sha256"}

    @property
    def family(self) -> str:
        return self.identity["family"]

    @property
    def tokenizer(self) -> Any:
        """mlx-lm's ``TokenizerWrapper``, loaded on first use."""
        return self.lazy_tokenizer.get()


def model_tokenizer(model_dir: Path, config: dict) -> LazyTokenizer:
    """The tokenizer of an MLX model directory, not yet loaded; a GGUF import's tokenizes as llama.cpp does."""
    from macft.outputs import IMPORT_RECORD

    return LazyTokenizer(model_dir, config.get("eos_token_id"), as_given=(Path(model_dir) / IMPORT_RECORD).is_file())


def resolve_model_dir(spec: str, *, revision: str | None = None, dequantize: bool = False) -> tuple[Path, str]:
    """Map a model spec to an MLX model directory; also return the content hash that names it."""
    where = locate(spec)
    if where.kind == "gguf":
        from macft.models.gguf_import import import_gguf_report

        # The import already hashed the GGUF file; hashing the imported weights again would read them twice.
        report = import_gguf_report(Path(where.target), dequantize=dequantize)
        return report.path, report.sha256
    model_dir = Path(where.target) if where.kind == "folder" else download(where.target, revision)
    check_folder_claims(model_dir)
    return model_dir, weights_hash(model_dir)


def download(repo_id: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    from macft.hub import unreachable

    patterns = ["*.json", "model*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
    if reason := unreachable():  # the cache alone, at once, instead of the client's retries
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached, in whichever form the client says it
            raise MacftError(f"'{repo_id}' is not in the Hugging Face cache and {reason}; connect, or pass a local model folder or .gguf file.") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # the hub client raises many types; the user needs one line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MacftError(f"Could not download '{repo_id}' from the Hugging Face hub: {reason}") from None


def weights_hash(model_dir: Path) -> str:
    """sha256 over the model's weight files, cached beside them keyed by size and mtime."""
    files = sorted(model_dir.glob("model*.safetensors"))
    key = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    memo = model_dir / ".macft-hash.json"
    try:
        saved = json.loads(memo.read_text())
        if saved["key"] == json.loads(json.dumps(key)):
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    value = digest.hexdigest()
    try:
        memo.write_text(json.dumps({"key": key, "sha256": value}))
    except OSError:  # a read-only model folder (hub cache) still loads
        pass
    return value


def model_family(config: dict) -> str:
    """macft's name of the family ``config.json`` describes; a clear error for unsupported types."""
    return for_model_type(config.get("model_type", "?")).name


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    revision: str | None = None,
    quantize_bits: int | None = None,
    group_size: int = 64,
    dequantize: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a model and tokenizer, cast float weights to this backend's compute dtype, and
    optionally quantize the frozen base (QLoRA)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model as mlx_load_model

    from macft.backend import compute_dtype

    model_dir, sha = resolve_model_dir(spec, revision=revision, dequantize=dequantize)
    check_room(model_bytes(model_dir, 1 if quantize_bits else compute_dtype().size), f"loading {spec}")
    with phase(f"Loading {spec}"):
        try:
            if quantize_bits is None:
                model, config = mlx_load_model(model_dir, trust_remote_code=trust_remote_code)
            else:  # QLoRA reads the weights lazily so that each layer is quantized as it is read
                model, config, stored = load_lazily(model_dir, trust_remote_code)
        except RuntimeError as exc:  # MLX's safetensors reader: a truncated or damaged weights file
            raise unreadable_weights(model_dir, exc) from None
        except Exception as exc:  # mlx-lm checks no config value itself: a zero or a wrong type fails anywhere
            reason = (str(exc).splitlines() or [""])[0][:200]
            raise MacftError(f"Could not build the model in {model_dir}: {type(exc).__name__}: {reason}") from None
        family = model_family(config)
        try:
            if quantize_bits is not None:
                quantize_while_loading(model, quantize_bits, group_size, compute_dtype(), model_dir, stored)
            check_finite(tree_flatten(model.parameters()), model_dir)
            cast_floats(model, compute_dtype())
            mx.eval(model.parameters())
        except RuntimeError as exc:  # lazily read weights fail only when they are first used
            raise unreadable_weights(model_dir, exc) from None
        tokenizer = model_tokenizer(Path(model_dir), config)
    identity = {"source": spec, "path": str(model_dir), "family": family, "sha256": sha}
    return LoadedModel(model, tokenizer, Path(model_dir), config, identity)


def unreadable_weights(model_dir, exc: Exception) -> MacftError:
    if is_out_of_memory(exc) or limit_bytes() is not None and str(exc).startswith("[read]"):  # a buffer it could not get
        return MacftError(out_of_memory_message(f"loading {model_dir}"))
    return MacftError(
        f"Could not read the weights in {model_dir} ({str(exc).splitlines()[0]}); download, import or convert the model again."
    )


QUANTIZE_BLOCK = 1 << 22  # float elements quantized at a time while loading
# Safetensors dtypes whose rows are read straight from the file (bfloat16 as its bits).
FILE_DTYPES = {"F32": ("float32", "float32"), "F16": ("float16", "float16"), "BF16": ("uint16", "bfloat16")}


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's bytes lie in a safetensors file."""

    file: Path
    dtype: str  # the safetensors name: F32, F16, BF16
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file

    def rows(self, start: int, stop: int):
        """Rows ``start:stop`` as an MLX array, read from the file alone (MLX's lazy load of a slice
        reads the whole tensor first: 671 MB for Gemma 3 270M's float32 embedding)."""
        import mlx.core as mx
        import numpy as np

        stored, dtype = FILE_DTYPES[self.dtype]
        row = math.prod(self.shape[1:])
        itemsize = np.dtype(stored).itemsize
        with self.file.open("rb") as fh:
            fh.seek(self.offset + start * row * itemsize)
            values = np.fromfile(fh, dtype=stored, count=(stop - start) * row)
        block = mx.array(values.reshape(stop - start, *self.shape[1:]))
        return block.view(getattr(mx, dtype)) if stored != dtype else block


def safetensors_index(model_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor of the weight files mlx-lm loads (``model*.safetensors``), from their headers."""
    index = {}
    for file in sorted(model_dir.glob("model*.safetensors")):
        with file.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for key, info in header.items():
            if key != "__metadata__" and info["dtype"] in FILE_DTYPES:
                index[key] = StoredTensor(file, info["dtype"], tuple(info["shape"]), 8 + size + info["data_offsets"][0])
    return index


def load_lazily(model_dir: Path, trust_remote_code: bool):
    """mlx-lm's lazy load, and for the weights it took unchanged from a safetensors file (the same
    array object in and out of the architecture's ``sanitize``, which may rename, transpose or stack
    others), where their bytes are: ``(model, config, {parameter name: StoredTensor})``."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes
    from mlx_lm.utils import load_model as mlx_load_model

    passed = {}  # the arrays kept as read, by name (lazy: nothing is read until a layer is quantized)

    def classes(config):
        model_class, args_class = _get_classes(config)

        def build(args):
            model = model_class(args)
            sanitize = getattr(model, "sanitize", None)

            def recording(weights):
                read = dict(weights)
                out = sanitize(weights) if sanitize is not None else weights
                passed.update((k, v) for k, v in out.items() if read.get(k) is v)
                return out

            object.__setattr__(model, "sanitize", recording)  # an instance attribute, removed after loading
            return model

        return build, args_class

    model, config = mlx_load_model(model_dir, lazy=True, get_model_classes=classes, trust_remote_code=trust_remote_code)
    vars(model).pop("sanitize", None)
    index = safetensors_index(model_dir)
    stored = {
        name: index[name]
        for name, value in tree_flatten(model.parameters())
        if passed.get(name) is value and name in index
    }
    return model, config, stored


def quantizable(module, group_size: int) -> bool:
    """A layer MLX can quantize whose rows split into groups of ``group_size``."""
    return hasattr(module, "to_quantized") and "weight" in module and module.weight.shape[-1] % group_size == 0


def quantize_model(model, bits: int, group_size: int) -> None:
    """MLX affine quantization of every layer that supports it and whose rows split into groups."""
    import mlx.nn as nn

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=lambda _, m: quantizable(m, group_size))


def quantize_while_loading(model, bits: int, group_size: int, dtype, source, stored: dict[str, StoredTensor]) -> None:
    """``quantize_model`` on a lazily loaded model, one layer at a time: each layer's float weights are
    read, checked, cast to ``dtype`` and quantized before the next layer is read, so the float model
    never exists whole (a 270M model in float32 is 1.07 GB; its 4-bit form about 0.2 GB). Weights
    in ``stored`` are read from their file a block of rows at a time, so not even one exists whole."""
    from mlx.utils import tree_unflatten

    pending = [(p, m) for p, m in model.named_modules() if quantizable(m, group_size)]
    pending.reverse()
    while pending:  # popped, so that no reference keeps a quantized layer's float weights alive
        path, module = pending.pop()
        rows = stored.get(f"{path}.weight")
        layer = quantized_layer(module, path, bits, group_size, dtype, source, rows.rows if rows else None)
        model.update_modules(tree_unflatten([(path, layer)]))
        del module


def quantized_layer(module, path: str, bits: int, group_size: int, dtype, source, read_rows=None):
    """``module.to_quantized`` evaluated a block of rows at a time: groups run along rows, so the arrays
    are the same while the temporaries stay a block's size (a whole 262k x 640 embedding's would
    double its peak). ``read_rows(start, stop)`` gives the weight's rows from its file; without it
    the lazy weight is read whole when its first block is evaluated."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    others = [(f"{path}.{k}", v) for k, v in tree_flatten(module.parameters()) if read_rows is None or k != "weight"]
    check_finite(others, source)
    cast_floats(module, dtype)
    quantized = module.to_quantized(group_size=group_size, bits=bits)
    weight, step = module.weight, max(1, QUANTIZE_BLOCK // module.weight.shape[-1])
    blocks = []
    for start in range(0, weight.shape[0], step):
        if read_rows is None:
            block = weight[start : start + step]
        else:
            block = read_rows(start, min(start + step, weight.shape[0]))
            check_finite([(f"{path}.weight", block)], source)
            block = block.astype(weight.dtype)  # the dtype cast_floats gave the module's weight
        blocks.append(mx.quantize(block, group_size, bits))
        mx.eval(blocks[-1])
    quantized.weight, quantized.scales, quantized.biases = (mx.concatenate(parts) for parts in zip(*blocks))
    mx.eval(quantized.parameters())
    return quantized


def cast_floats(model, dtype) -> None:
    """Cast float weights to ``dtype``; quantized weights and their scales keep their own types."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    quantized_params = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            quantized_params.update(f"{name}.{k}" if name else k for k in ("weight", "scales", "biases"))
    keeps = getattr(model, "cast_predicate", None) or (lambda name: True)  # mlx-lm's: False keeps float32 (A_log)
    updates = [
        (k, v.astype(dtype))
        for k, v in tree_flatten(model.parameters())
        if k not in quantized_params and mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype and keeps(k)
    ]
    if updates:
        model.update(tree_unflatten(updates))
