"""Write an MLX model (a loaded mlx-lm module) as a GGUF file llama.cpp and Ollama run, without llama.cpp.

    result = write_gguf(loaded.model, loaded.config, "gemma3", Path("model.gguf"), "q4_k_m",
                        tokenizer_dir=loaded.path)

Quantized MLX weights (GGUF imports, QLoRA bases) are dequantized to float32 first; the families
module maps names and layouts; ``quant_plan`` picks each tensor's type and ``macft.quants`` packs it. The file appears only once complete (``macft.paths.atomic_path``).

With a ``guide`` (``macft.export.guidance.QuantGuide``: a run's importance matrix and how much its
fine-tune changed each weight) every tensor is rounded to minimise its importance-weighted error
and ``quant_plan.guided_types`` raises the most-changed tensors within ``extra_bytes``.
"""

from __future__ import annotations

import time
from contextlib import closing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from macft.errors import MacftError
from macft.export import families, tokenizer_meta
from macft.export.quant_plan import EXTRA_BYTES, SCHEMES, PlanTensor, guided_types, sample_rows, tensor_bytes, tensor_type
from macft.families.base import text_config
from macft.paths import atomic_path
from macft.quants import quant_type, quantize

GGUF_COMMAND_KEY = "macft.command"  # GGUF metadata key naming the macft command that wrote the file


@dataclass
class GGUFResult:
    path: Path
    quant: str
    tensors: int
    types: dict[str, int] = field(default_factory=dict)  # GGUF type name -> tensor count
    size_bytes: int = 0
    seconds: float = 0.0
    guided: dict | None = None  # with a guide: importance-weighted tensors, upgrades, plain and guided tensor bytes

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def float_weights(model) -> dict[str, np.ndarray]:
    """Every parameter of an mlx-lm model as float32 numpy, quantized layers dequantized."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from macft.models.quantized import QUANTIZED, float_weight

    weights: dict[str, np.ndarray] = {}
    skip: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, QUANTIZED):
            prefix = f"{path}." if path else ""
            weights[f"{prefix}weight"] = np.array(float_weight(module).astype(mx.float32))
            skip.update(f"{prefix}{k}" for k in ("weight", "scales", "biases"))
    for name, value in tree_flatten(model.parameters()):
        if name not in skip:
            weights[name] = np.array(value.astype(mx.float32))
    leftover = [n for n in weights if n.endswith((".lora_a", ".lora_b", ".magnitude"))]
    if leftover:
        raise MacftError(f"The model still holds adapter weights ('{leftover[0]}'); fuse it before exporting.")
    return weights


def write_gguf(
    model,
    config: dict,
    family: str,
    out: Path,
    quant: str,
    *,
    tokenizer_dir: Path,
    tokenizer_gguf: Path | None = None,
    name: str | None = None,
    guide=None,
    extra_bytes: float = EXTRA_BYTES,
) -> GGUFResult:
    """Export ``model`` to ``out`` at ``quant`` (see ``quant_plan.SCHEMES``).

    ``tokenizer_gguf``: a GGUF file whose tokenizer keys are copied verbatim (the model's origin);
    otherwise the tokenizer comes from the HF files in ``tokenizer_dir``. ``guide``: a
    ``QuantGuide`` for importance-weighted rounding and delta-aware types (see the module docstring).
    """
    if quant not in SCHEMES:
        raise MacftError(f"Unknown GGUF quantization '{quant}'; choose from {', '.join(SCHEMES)}.")
    scheme = SCHEMES[quant]
    start = time.time()
    config = text_config(config)  # HF Qwen3.5 (and Gemma 3) nest the decoder's keys
    arch = families.gguf_arch(family)
    weights = float_weights(model)
    prefix = families.export_family(family).weights_prefix
    tied = f"{prefix}lm_head.weight" not in weights
    n_layers = int(config["num_hidden_layers"])
    vocab_size = int(weights[f"{prefix}model.embed_tokens.weight"].shape[0])
    out = Path(out)
    types: Counter[str] = Counter()
    with atomic_path(out) as tmp, closing(gguf.GGUFWriter(str(tmp), arch)) as writer:  # closed on a failed write too
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or out.stem)
        writer.add_file_type(int(scheme.file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string(GGUF_COMMAND_KEY, "export gguf")
        families.add_hparams(writer, config, family)
        writer.add_vocab_size(vocab_size)
        if tokenizer_gguf is not None:
            tokenizer_meta.copy_from_gguf(writer, tokenizer_gguf)
        else:
            tokenizer_meta.add_tokenizer(writer, tokenizer_dir, vocab_size=vocab_size, family=family)
        tensors = dict(families.gguf_tensors(weights, config, family))
        v_layers = sum(n.endswith((".attn_v.weight", ".attn_qkv.weight")) for n in tensors)  # llama-quantize's attn_v-like
        plain = {n: tensor_type(n, a.shape, scheme, n_layers, tied, v_layers) for n, a in tensors.items()}
        chosen, importance, guided = plain, {}, None
        if guide is not None and not quant_type(scheme.base).is_float:
            chosen, importance, guided = _guided_plan(tensors, plain, guide, config, family, extra_bytes)
        for gguf_name, array in tensors.items():
            _add_tensor(writer, gguf_name, array, chosen[gguf_name], importance.get(gguf_name))
            types[chosen[gguf_name].name] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GGUFResult(out, quant, sum(types.values()), dict(types), out.stat().st_size, time.time() - start, guided)


def _guided_plan(tensors: dict, plain: dict, guide, config: dict, family: str, extra_bytes: float):
    """(types, importance by GGUF name, summary) for a guided export."""
    name_map, record = families.tensor_name_map(config, family), families.export_family(family)

    def by_gguf_name(values: dict) -> dict:
        renamed = {name_map.get_name(record.export_name(n), try_suffixes=(".weight", ".bias")): v for n, v in values.items()}
        return {n: v for n, v in renamed.items() if n in tensors}

    importance = {n: v for n, v in by_gguf_name(guide.importance).items() if v.shape[0] == tensors[n].shape[-1]}
    change = by_gguf_name(guide.change)
    candidates = [
        PlanTensor(n, tensors[n].shape, plain[n], change.get(n, 0.0), sample_rows(tensors[n]), importance.get(n))
        for n in tensors
        if not quant_type(plain[n]).is_float
    ]
    chosen = {**plain, **guided_types(candidates, extra_bytes)}
    quantized = [t.name for t in candidates]
    summary = {
        "importance_weighted": sum(n in importance for n in quantized),
        "upgraded": {n: f"{plain[n].name}->{chosen[n].name}" for n in quantized if chosen[n] != plain[n]},
        "plain_tensor_bytes": sum(tensor_bytes(tensors[n].shape, plain[n]) for n in quantized),
        "guided_tensor_bytes": sum(tensor_bytes(tensors[n].shape, chosen[n]) for n in quantized),
    }
    return chosen, importance, summary


def _add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, qtype: Q, importance: np.ndarray | None = None) -> None:
    packed = quantize(array.reshape(-1, array.shape[-1]), qtype, importance=importance)
    writer.add_tensor(name, packed.reshape(*array.shape[:-1], -1), raw_dtype=qtype)


def is_exported_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF that ``macft export gguf`` wrote (its metadata says so)."""
    from macft.models.gguf_import.reader import read_gguf

    try:
        return read_gguf(path).metadata.get(GGUF_COMMAND_KEY) == "export gguf"
    except MacftError:
        return False
