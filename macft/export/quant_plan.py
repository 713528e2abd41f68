"""Which GGUF type each tensor gets for a ``--quant`` choice (llama.cpp's mixture rules).

    scheme = SCHEMES["q4_k_m"]
    qtype = tensor_type("blk.0.attn_v.weight", (256, 640), scheme, n_layers=18, tied=True)

The rules follow ``llama-quantize`` without an importance matrix:
* 1-D tensors (norms, biases, rope factors) and mixture-of-experts routers stay F32, Gemma's
  per-layer input projection F16;
* the output projection, or the token embedding when it is tied to the output, goes to Q6_K
  (Q8_0 stays Q8_0), and so does Gemma's per-layer token embedding;
* Q4_K_M / Q5_K_M put attn_v and ffn_down (ffn_down_exps of MoE models too) at Q6_K in the first and last eighth of the layers
  and every third layer between; a fused attn_qkv (Phi-3, Qwen3.5's linear attention) counts as attn_v, as
  llama-quantize's "attention-v-like" category does (every block holds one of the two);
* a row length that is not a multiple of the type's block falls back to the type's ``fallback``
  (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; ``macft.quants``), and to F16 when that does not fit either.

``guided_types`` then raises some tensors of a fine-tuned model above those rules (see there).
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType

from macft.quants import quant_type, quantize, weighted_error


@dataclass(frozen=True)
class Scheme:
    name: str
    file_type: LlamaFileType
    base: Q
    mixture: bool = False  # the _M rules for attn_v (and attn_qkv) / ffn_down
    # Exports of a run use the importance matrix and the delta-aware plan by default where they keep
    # what the plain types lose of the fine-tune (docs/benchmarks.md); Q6_K and Q8_0 plain are already
    # at the F16 export's loss, so guidance would only add bytes and time.
    guided: bool = False


SCHEMES = {
    "f16": Scheme("f16", LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": Scheme("bf16", LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": Scheme("q8_0", LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": Scheme("q4_0", LlamaFileType.MOSTLY_Q4_0, Q.Q4_0, guided=True),
    "q4_k_m": Scheme("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K, mixture=True, guided=True),
    "q5_k_m": Scheme("q5_k_m", LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K, mixture=True, guided=True),
    "q6_k": Scheme("q6_k", LlamaFileType.MOSTLY_Q6_K, Q.Q6_K),
}

_LAYER = re.compile(r"^blk\.(\d+)\.")


def more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], scheme: Scheme, n_layers: int, tied: bool, v_layers: int | None = None) -> Q:
    """The GGUF type of tensor ``name`` whose numpy shape is ``shape`` (rows, row length).

    ``v_layers``: how many (first) layers have an attn_v or attn_qkv, when not all do (Gemma 4's
    k/v-sharing layers have none): llama-quantize spreads the extra bits over the ones there are."""
    if len(shape) < 2 or ".ffn_gate_inp." in name or ".ssm_conv1d." in name:
        return Q.F32  # an MoE router and a recurrent block's conv kernel stay F32, as convert_hf_to_gguf and llama-quantize keep them
    if scheme.base in (Q.F16, Q.BF16):
        return scheme.base
    if name == "per_layer_model_proj.weight":
        return Q.F16  # llama-quantize keeps Gemma's per-layer input projection as converted
    chosen = scheme.base
    layer = _LAYER.match(name)
    if name in ("output.weight", "per_layer_token_embd.weight") or (tied and name == "token_embd.weight"):
        chosen = Q.Q8_0 if scheme.base == Q.Q8_0 else Q.Q6_K
    elif scheme.mixture and layer and (".attn_v." in name or ".attn_qkv." in name or ".ffn_down" in name):  # ffn_down_exps too
        counted = (v_layers or n_layers) if ".ffn_down" not in name else n_layers
        if more_bits(int(layer.group(1)), counted):
            chosen = Q.Q6_K
    row = shape[-1]
    if row % quant_type(chosen).block_size:
        chosen = quant_type(chosen).fallback or chosen
    if row % quant_type(chosen).block_size:
        chosen = Q.F16
    return chosen


# ---------------------------------------------------------------------------- delta-aware upgrades

EXTRA_BYTES = 0.15  # guided plans may add this share of the plain plan's tensor bytes (the size goal)
_K_LADDER = (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0)
_LEGACY_LADDER = (Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q8_0)
_SAMPLE_ROWS = 64


def tensor_bytes(shape: tuple[int, ...], qtype: Q) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return quant_type(qtype).nbytes(count)


def higher_types(qtype: Q, row: int) -> list[Q]:
    """The types above ``qtype`` a row of this length can take, cheapest first (never float)."""
    ladder = next((steps for steps in (_K_LADDER, _LEGACY_LADDER) if all(row % quant_type(t).block_size == 0 for t in steps)), ())
    if qtype not in ladder and qtype not in (*_K_LADDER, *_LEGACY_LADDER):
        return []
    bits = tensor_bytes((256,), qtype)
    return [t for t in ladder if tensor_bytes((256,), t) > bits]


@dataclass
class PlanTensor:
    """One GGUF tensor as the guided plan sees it."""

    name: str
    shape: tuple[int, ...]
    base: Q  # the plain scheme's type
    change: float  # how much the fine-tune changed it (``guidance.QuantGuide.change``); 0 = untouched
    sample: np.ndarray  # a few of its rows, to estimate each type's error
    importance: np.ndarray | None  # per column


def sample_rows(array: np.ndarray, count: int = _SAMPLE_ROWS) -> np.ndarray:
    rows = array.reshape(-1, array.shape[-1])
    return rows[np.linspace(0, rows.shape[0] - 1, min(count, rows.shape[0])).astype(int)]


def relative_error(tensor: PlanTensor, qtype: Q) -> float:
    """Importance-weighted squared error of ``qtype`` on the sampled rows, relative to their weighted energy."""
    weight = tensor.importance if tensor.importance is not None else np.ones(tensor.sample.shape[1], np.float32)
    packed = quantize(tensor.sample, qtype, importance=tensor.importance)
    energy = float(np.square(tensor.sample).sum(axis=0) @ weight)
    return float(weighted_error(tensor.sample, packed, qtype, weight).sum()) / energy if energy > 0 else 0.0


def guided_types(tensors: list[PlanTensor], extra_bytes: float = EXTRA_BYTES) -> dict[str, Q]:
    """Each tensor's type: the plain scheme's, raised where the fine-tune's change meets the most error.

    The value of moving tensor t from type a to b is change_t · (err_t(a) − err_t(b)): the error
    removed, counted in proportion to how much of the tuned behaviour lives in t. Upgrades are
    bought greedily by value per extra byte until ``extra_bytes`` of the plain plan's bytes are
    spent; tensors the fine-tune did not change keep their plain type.
    """
    chosen = {t.name: t.base for t in tensors}
    budget = extra_bytes * sum(tensor_bytes(t.shape, t.base) for t in tensors)
    errors: dict[tuple[str, Q], float] = {}

    def error(t: PlanTensor, qtype: Q) -> float:
        if (t.name, qtype) not in errors:
            errors[t.name, qtype] = relative_error(t, qtype)
        return errors[t.name, qtype]

    offers: list[tuple[float, int, str, Q, int]] = []

    def offer(t: PlanTensor) -> None:
        current = chosen[t.name]
        for higher in higher_types(current, t.shape[-1]):
            value = t.change * (error(t, current) - error(t, higher))
            cost = tensor_bytes(t.shape, higher) - tensor_bytes(t.shape, current)
            if value > 0:
                heapq.heappush(offers, (-value / cost, len(offers), t.name, higher, cost))

    by_name = {t.name: t for t in tensors}
    for t in tensors:
        if t.change > 0:
            offer(t)
    spent = 0
    while offers:
        _, _, name, higher, cost = heapq.heappop(offers)
        current = chosen[name]
        if higher not in higher_types(current, by_name[name].shape[-1]):
            continue  # made by an earlier type of this tensor
        real_cost = tensor_bytes(by_name[name].shape, higher) - tensor_bytes(by_name[name].shape, current)
        if real_cost != cost or spent + cost > budget:
            continue
        chosen[name] = higher
        spent += cost
        offer(by_name[name])
    return chosen
