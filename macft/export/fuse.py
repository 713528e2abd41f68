"""Merge a trained LoRA/DoRA adapter into its base model and save an MLX model directory.

    result = fuse_adapter("runs/quickstart", out="fused/quickstart")            # float or as the base
    result = fuse_adapter("runs/qlora", out="fused/q4", quantize_bits=4)        # re-quantized once
    loaded, adapter_cfg, merged = load_fused("runs/quickstart", dequantize=True)  # in memory (export)

The base recorded in ``adapter_config.json`` is loaded as it was for training (QLoRA bases
quantized the same way), the method is re-applied with ``macft.adapters.files.load_adapter`` and each
adapter layer's own ``fuse()`` merges it in float32. A quantized base keeps its untouched layers
quantized unless ``dequantize`` is asked; ``quantize_bits`` dequantizes everything and quantizes
the merged model once. The directory (config.json, model.safetensors, the base's tokenizer files)
opens with ``mlx_lm.load`` and is written atomically.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from macft.errors import MacftError
from macft.outputs import IMPORT_RECORD, check_output, manifest
from macft.paths import atomic_path
from macft.phases import phase
from macft.run_files import ADAPTER_FIX, read_json

FUSE_RECORD = "macft_fuse.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)


@dataclass
class FuseResult:
    path: Path
    base_model: str
    method: str
    fused_layers: int
    quantization: str  # "float", "as base" or "<bits>-bit"
    seconds: float

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def read_adapter_config(run_dir: Path) -> dict:
    """The adapter's config alone, so a method a command cannot take is refused before its weights are read."""
    from macft.adapters.files import adapter_paths

    _, config_file = adapter_paths(Path(run_dir))
    return read_json(config_file, fix=ADAPTER_FIX, keys=("method",))


def load_fused(run_dir: str | Path, *, dequantize: bool = False, on_base=None):
    """Base + adapter, merged in memory: returns (LoadedModel with the fused model, adapter config, merged layers).

    ``on_base(model)`` is called with the base model before the adapter touches it."""
    from mlx.utils import tree_flatten

    from macft.adapters.files import adapter_files, load_adapter
    from macft.methods import fuse_model, method_spec
    from macft.run_base import load_run_base

    run_dir = Path(run_dir)
    adapter_cfg = read_adapter_config(run_dir)
    method_spec(adapter_cfg.get("method", "lora")).refuse_fusing()  # before loading any weights
    adapter_files(run_dir)  # damaged adapter weights are one line before the base loads
    loaded = load_run_base(run_dir)
    if on_base is not None:
        on_base(loaded.model)
    base_names = {name for name, _ in tree_flatten(loaded.model.parameters())}
    model, _ = load_adapter(loaded.model, run_dir)
    merged = sum(1 for _, m in model.named_modules() if hasattr(m, "fuse") and callable(m.fuse))
    model = fuse_model(model)
    extra = sorted({name for name, _ in tree_flatten(model.parameters())} - base_names)
    if extra:
        raise MacftError(
            f"The '{adapter_cfg.get('method')}' method adds weights the base architecture has no place for ('{extra[0]}'), "
            "so it cannot be merged; use the run directory as an adapter with chat, generate or eval instead."
        )
    if dequantize:
        import mlx.core as mx

        from macft.models.quantized import dequantize_model

        dequantize_model(model, mx.float32)
    loaded.model = model
    return loaded, adapter_cfg, merged


def quantization_entry(model, defaults: dict) -> dict | None:
    """The config.json ``quantization`` mapping that makes mlx-lm rebuild exactly these quantized layers."""
    from macft.models.quantized import QUANTIZED

    layers = {
        path: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for path, m in model.named_modules()
        if isinstance(m, QUANTIZED)
    }
    if not layers:
        return None
    first = next(iter(layers.values()))
    return {"group_size": defaults.get("group_size", first["group_size"]), "bits": defaults.get("bits", first["bits"]), "mode": "affine", **layers}


def fuse_adapter(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    dequantize: bool = False,
    quantize_bits: int | None = None,
    group_size: int = 64,
    force: bool = False,
) -> FuseResult:
    """Fuse the adapter in ``run_dir`` and save the merged model to ``out`` (default ``RUN/fused``)."""
    import mlx.core as mx
    from mlx_lm.utils import save_config, save_model

    from macft.models.load import quantize_model

    if dequantize and quantize_bits is not None:
        raise MacftError("Choose either --dequantize or --quantize, not both.")
    if quantize_bits is not None and quantize_bits not in (2, 3, 4, 5, 6, 8):
        raise MacftError("--quantize takes 2, 3, 4, 5, 6 or 8 bits.")
    start = time.time()
    run_dir = Path(run_dir)
    out = check_output(run_dir / "fused" if out is None else out, "fuse", record=FUSE_RECORD, inputs=run_inputs(run_dir), force=force)
    loaded, adapter_cfg, merged = load_fused(run_dir, dequantize=dequantize or quantize_bits is not None)
    model, config = loaded.model, dict(loaded.config)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if quantize_bits is not None:
        quantize_model(model, quantize_bits, group_size)
        mx.eval(model.parameters())
        mode = f"{quantize_bits}-bit"
    else:
        mode = "float" if dequantize else "as base"
    entry = quantization_entry(model, {"group_size": group_size, "bits": quantize_bits} if quantize_bits else {})
    if entry is not None:
        config["quantization"] = entry
    elif mode == "as base":
        mode = "float"
    with atomic_path(out) as tmp, phase(f"Saving the fused model to {out}"):
        save_model(tmp, model)
        save_config(config, tmp / "config.json")
        for name in TOKENIZER_FILES:
            if (loaded.path / name).is_file():
                shutil.copy(loaded.path / name, tmp / name)
        record = {
            "adapter": str(run_dir.resolve()),
            "method": adapter_cfg.get("method"),
            "base_model": loaded.identity,
            "tokenizer_gguf": str(source) if (source := origin_gguf(loaded.path)) else None,
            "quantization": mode,
            "files": manifest(tmp),
        }
        (tmp / FUSE_RECORD).write_text(json.dumps(record, indent=2))
    return FuseResult(out, loaded.identity["source"], adapter_cfg.get("method", "?"), merged, mode, time.time() - start)


def run_inputs(run_dir: Path) -> list[Path | str | None]:
    """What a command reading a run depends on: the run, and its base (spec, model folder, GGUF origin)."""
    base = read_adapter_config(run_dir).get("base_model") or {}
    folder = base.get("path")
    return [run_dir, base.get("source"), folder, origin_gguf(Path(folder)) if folder else None]


def origin_gguf(model_dir: Path) -> Path | None:
    """The GGUF file a model directory came from (a GGUF import, or a fuse of one), if it still exists."""
    for record_name, key in ((IMPORT_RECORD, "source"), (FUSE_RECORD, "tokenizer_gguf")):
        try:
            source = json.loads((Path(model_dir) / record_name).read_text()).get(key)
        except (OSError, ValueError):
            continue
        if source and Path(source).is_file():
            return Path(source)
    return None
