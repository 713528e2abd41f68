"""Write an MLX model (a loaded mlx-lm module) as a GGUF file llama.cpp and Ollama run, without llama.cpp.

    result = write_gguf(loaded.model, loaded.config, "gemma3", Path("model.gguf"), "q4_k_m",
                        tokenizer_dir=loaded.path)

Quantized MLX weights (GGUF imports, QLoRA bases) are dequantized to float32 first; the families
module maps names and layouts; ``quant_plan`` picks each tensor's type and ``kquants`` (or gguf-py
for the legacy types) packs it. The file appears only once complete (``macft.paths.atomic_path``).
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
from macft.export import families, kquants, tokenizer_meta
from macft.export.quant_plan import SCHEMES, tensor_type
from macft.outputs import GGUF_COMMAND_KEY
from macft.paths import atomic_path


@dataclass
class GGUFResult:
    path: Path
    quant: str
    tensors: int
    types: dict[str, int] = field(default_factory=dict)  # GGUF type name -> tensor count
    size_bytes: int = 0
    seconds: float = 0.0

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
) -> GGUFResult:
    """Export ``model`` to ``out`` at ``quant`` (see ``quant_plan.SCHEMES``).

    ``tokenizer_gguf``: a GGUF file whose tokenizer keys are copied verbatim (the model's origin);
    otherwise the tokenizer comes from the HF files in ``tokenizer_dir``.
    """
    if quant not in SCHEMES:
        raise MacftError(f"Unknown GGUF quantization '{quant}'; choose from {', '.join(SCHEMES)}.")
    scheme = SCHEMES[quant]
    start = time.time()
    arch = families.gguf_arch(family)
    weights = float_weights(model)
    tied = "lm_head.weight" not in weights
    n_layers = int(config["num_hidden_layers"])
    vocab_size = int(weights["model.embed_tokens.weight"].shape[0])
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
        for gguf_name, array in families.gguf_tensors(weights, config, family):
            qtype = tensor_type(gguf_name, array.shape, scheme, n_layers, tied)
            _add_tensor(writer, gguf_name, array, qtype)
            types[qtype.name] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GGUFResult(out, quant, sum(types.values()), dict(types), out.stat().st_size, time.time() - start)


def _add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, qtype: Q) -> None:
    if qtype == Q.F32:
        writer.add_tensor(name, array.astype(np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, array.astype(np.float16))
    else:
        packed = kquants.quantize(array.reshape(-1, array.shape[-1]), qtype)
        writer.add_tensor(name, packed.reshape(*array.shape[:-1], -1), raw_dtype=qtype)
