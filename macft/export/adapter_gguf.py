"""A LoRA adapter as a GGUF file that llama.cpp applies on top of its base (``--lora``, Ollama ``ADAPTER``).

    result = write_adapter_gguf("runs/quickstart", Path("adapter.gguf"))

llama.cpp computes y += (alpha / r)·B(Ax) with ``<base tensor>.lora_a`` of numpy shape (r, in) and
``.lora_b`` of (out, r); mlx-lm's layout is the transpose (x·A·B with A (in, r), B (r, out)), so
both are transposed, alpha = scale·r, and for llama-family q/k the rows of B get the same rotary
permutation as the base weight. What llama.cpp cannot express is refused with the alternative:
DoRA (its magnitude vector), LoRA on the embedding or output head, and the non-LoRA methods.
"""

from __future__ import annotations

import json
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from macft.errors import MacftError
from macft.export import families
from macft.export.fuse import read_adapter_config
from macft.families.base import text_config
from macft.export.gguf_writer import GGUF_COMMAND_KEY
from macft.paths import atomic_path

ALTERNATIVE = "use `macft fuse --adapter RUN` or a full GGUF export (`macft export gguf --adapter RUN`) instead"


@dataclass
class AdapterGGUFResult:
    path: Path
    base_model: str
    architecture: str
    rank: int
    alpha: float
    pairs: int  # adapted tensors
    size_bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}


def check_exportable(adapter_cfg: dict, weight_names: list[str], prefix: str = "") -> None:
    """Raise with a one-line reason when llama.cpp has no form for this adapter (``prefix``: the family's weights_prefix)."""
    method = adapter_cfg.get("method")
    if method == "dora":
        raise MacftError(f"llama.cpp's LoRA adapters have no place for DoRA's magnitude vectors; {ALTERNATIVE}.")
    if method == "full":
        raise MacftError(f"llama.cpp adapters are LoRA only and this run trained the full weights; {ALTERNATIVE}.")
    if method != "lora":  # soft prompts, prefixes and bottlenecks can neither be fused nor carried by llama.cpp
        raise MacftError(
            f"llama.cpp has no form for a '{method}' adapter, neither as an adapter file nor merged into the weights; "
            "use the run directory with `macft chat`, `generate` or `eval --adapter RUN`, or train with --method lora to export."
        )
    heads = [n for n in weight_names if n.removeprefix(prefix).startswith(("lm_head.", "model.embed_tokens."))]
    if heads:
        raise MacftError(f"The adapter changes the embedding/output head ('{heads[0]}'), which llama.cpp adapters cannot carry; {ALTERNATIVE}.")


def base_config(adapter_cfg: dict) -> dict:
    """The base model's config.json, without loading its weights."""
    from macft.models.load import model_family, resolve_model_dir

    base = adapter_cfg.get("base_model") or {}
    model_dir, _ = resolve_model_dir(base.get("source") or base["path"])
    config = json.loads((Path(model_dir) / "config.json").read_text())
    model_family(config)  # refuses unsupported model types with a clear message
    return text_config(config)


def write_adapter_gguf(run_dir: str | Path, out: Path) -> AdapterGGUFResult:
    import mlx.core as mx

    from macft.adapters.files import adapter_files
    from macft.models.load import model_family
    from macft.run_files import ADAPTER_FIX, load_safetensors

    start = time.time()
    run_dir = Path(run_dir)
    adapter_cfg = read_adapter_config(run_dir)
    weights_file, _ = adapter_files(run_dir)
    weights = {k: np.array(v.astype(mx.float32)) for k, v in load_safetensors(weights_file, fix=ADAPTER_FIX, finite=True).items()}
    config = base_config(adapter_cfg)
    family = model_family(config)
    check_exportable(adapter_cfg, list(weights), families.export_family(family).weights_prefix)
    arch = families.gguf_arch(family)
    name_map = families.tensor_name_map(config, family)
    rank = int(adapter_cfg["rank"])
    alpha = float(adapter_cfg.get("scale", float(adapter_cfg["alpha"]) / rank)) * rank
    prefixes = sorted(k[: -len(".lora_a")] for k in weights if k.endswith(".lora_a"))
    if not prefixes:
        raise MacftError(f"{weights_file} holds no LoRA weights (lora_a/lora_b).")
    out = Path(out)
    with atomic_path(out) as tmp, closing(gguf.GGUFWriter(str(tmp), arch)) as writer:  # closed on a failed write too
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_string(GGUF_COMMAND_KEY, "export gguf")
        for prefix in prefixes:
            # "model.layers.0.self_attn.q_proj" (the LoRA layer) -> "blk.0.attn_q.weight"
            record = families.export_family(family)
            target = families.gguf_name(record.export_name(f"{prefix}.weight"), name_map)
            # (r, in) and (out, r), per expert for a mixture-of-experts stack
            lora_a = record.export_columns(f"{prefix}.", weights[f"{prefix}.lora_a"].swapaxes(-1, -2), config)
            lora_b = weights[f"{prefix}.lora_b"].swapaxes(-1, -2)
            lora_b = record.export_rows(f"{prefix}.", lora_b, config)
            writer.add_tensor(f"{target}.lora_a", np.ascontiguousarray(lora_a, dtype=np.float32))
            writer.add_tensor(f"{target}.lora_b", np.ascontiguousarray(lora_b, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    base = adapter_cfg.get("base_model", {}).get("source", "?")
    return AdapterGGUFResult(out, base, arch, rank, alpha, len(prefixes), out.stat().st_size, time.time() - start)
