"""Write one GGUF file as an MLX model directory that ``mlx_lm.load`` opens.

Weights in a type MLX can hold exactly (see ``affine``) become quantized layers with a per-layer
``quantization`` entry in config.json; the rest become float tensors. ``dequantize=True`` makes
every weight float32 (or its own F16/BF16). The directory holds config.json,
generation_config.json, model.safetensors, the tokenizer files and ``macft_import.json``
(the per-type summary).

    summary = convert_gguf(read_gguf("model.gguf"), Path("out"), dequantize=False)
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType

from macft.errors import MacftError
from macft.outputs import IMPORT_RECORD
from macft.families import Family
from macft.models.claims import check_gguf_claims
from macft.models.gguf_import.affine import GROUP_SIZE, quantize_exact
from macft.models.gguf_import.families import family_for, hf_name, import_config
from macft.models.gguf_import.reader import GGUFFile
from macft.models.gguf_import.tokenizer import save_tokenizer, stop_token_ids
from macft.models.weights import check_finite
from macft.quants import decode



def convert_gguf(gguf: GGUFFile, out_dir: Path, *, dequantize: bool, tokenizer_from: Path | None = None) -> dict:
    """Write the model directory into ``out_dir`` (which must exist); return the tensor summary
    ``{"exact": {type: count}, "float": {type: count}}``. ``tokenizer_from``: an earlier import of
    the same file whose tokenizer files are copied instead of rebuilt (slow for a large vocabulary)."""
    import mlx.core as mx

    family = family_for(gguf)
    config = import_config(gguf, family)
    check_gguf_claims(gguf, config)  # before check_names builds the model the metadata describes
    weights: dict[str, mx.array] = {}
    per_module: dict[str, dict | bool] = {}
    exact: Counter[str] = Counter()
    floats: Counter[str] = Counter()
    for name, info in gguf.tensors.items():
        hf = hf_name(family, name)
        if not hf:
            continue
        rows = gguf.rows(name)
        packed = None
        if not dequantize and len(info.shape) in (2, 3) and hf.endswith(".weight") and family.keeps_blocks(hf, config):  # 3-D: stacked experts
            with fitting(gguf, name):
                packed = quantize_exact(family.import_rows(hf, rows, config), info.qtype)
        module = hf.removesuffix(".weight")
        if packed is not None:
            stacked = (*info.shape[:-1], -1)
            weights[hf] = mx.array(packed.weight.reshape(stacked))
            weights[f"{module}.scales"] = mx.array(packed.scales.reshape(stacked))
            weights[f"{module}.biases"] = mx.array(packed.biases.reshape(stacked))
            per_module[module] = {"group_size": GROUP_SIZE, "bits": packed.bits}
            exact[info.qtype.name] += 1
            continue
        with fitting(gguf, name):
            values = family.import_float(hf, family.import_columns(hf, family.import_rows(hf, decode(rows, info.qtype).reshape(info.shape), config), config))
        array = mx.array(np.ascontiguousarray(values))
        if len(info.shape) in (2, 3) and hf.endswith(".weight"):
            per_module[module] = False
            if info.qtype == GGMLQuantizationType.BF16:
                array = array.astype(mx.bfloat16)  # exact: the values came from bfloat16
        weights[hf] = array
        floats[info.qtype.name] += 1

    check_names(family, config, weights)
    check_finite(weights.items(), gguf.path)
    quantized_bits = Counter(entry["bits"] for entry in per_module.values() if entry)
    if quantized_bits:
        quantization = {"group_size": GROUP_SIZE, "bits": quantized_bits.most_common(1)[0][0], "mode": "affine", **per_module}
        config["quantization"] = quantization
        config["quantization_config"] = quantization

    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"eos_token_id": stop_token_ids(gguf)}
    if "bos_token_id" in config:
        generation["bos_token_id"] = config["bos_token_id"]
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer_from is not None and (tokenizer_from / "tokenizer.json").exists():
        for file in tokenizer_from.glob("tokenizer*.json"):
            shutil.copyfile(file, out_dir / file.name)
    else:
        save_tokenizer(gguf, out_dir)
    return {"exact": dict(exact), "float": dict(floats)}


@contextmanager
def fitting(gguf: GGUFFile, name: str) -> Iterator[None]:
    """A tensor that does not fit the model its file's metadata describes (3 heads in rows of 4) is one line."""
    try:
        yield
    except (ValueError, TypeError, IndexError, ZeroDivisionError) as exc:
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise MacftError(f"{gguf.path}: tensor '{name}' does not fit the model its metadata describes ({type(exc).__name__}: {reason}).") from None


def check_names(family: Family, config: dict, weights: dict) -> None:
    """Compare the converted tensors with the parameters mlx-lm's architecture expects."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))  # parameters stay lazy: nothing is allocated
    except Exception as exc:  # mlx-lm checks nothing itself: a zero, a wrong type or a missing key fails anywhere
        reason = (str(exc).splitlines() or [""])[0][:200]
        raise MacftError(f"This {family.gguf_arch} GGUF's metadata does not describe a model mlx-lm can build ({type(exc).__name__}: {reason}).") from None
    expected = {name for name, _ in tree_flatten(model.parameters())}
    if config.get("tie_word_embeddings"):
        expected.discard(f"{family.weights_prefix}lm_head.weight")
    got = {name for name in weights if not name.endswith((".scales", ".biases"))}
    if missing := sorted(expected - got):
        raise MacftError(f"This {family.gguf_arch} GGUF lacks '{missing[0]}' (and {len(missing) - 1} more) that mlx-lm's {config['model_type']} needs.")
    if extra := sorted(got - expected):
        raise MacftError(f"This {family.gguf_arch} GGUF has '{extra[0]}', which mlx-lm's {config['model_type']} has no place for.")
