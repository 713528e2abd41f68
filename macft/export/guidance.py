"""What a run tells the quantizer: per weight, the importance of its input columns and how much the
fine-tune changed it.

    snapshot = base_layers(base_model)                        # before the adapter is applied (references, no copies)
    ...                                                       # apply the adapter, fuse
    guide = QuantGuide.build(snapshot, fused_model, imatrix)
    guide.importance["model.layers.0.mlp.down_proj.weight"]   # mean x² per input column
    guide.change["model.layers.0.mlp.down_proj.weight"]       # ‖ΔW‖² / ‖W‖², both weighted by the importance

The change is measured where it matters: with column j weighted by its importance, ‖ΔW‖² is the
mean squared change the fine-tune made to the layer's output on the training data, and dividing
by ‖W‖² makes layers of different sizes comparable. ``quant_plan.guided_types`` spends extra
bits on the tensors with the largest change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np


@dataclass
class QuantGuide:
    importance: dict[str, np.ndarray] = field(default_factory=dict)  # mlx-lm weight name -> per input column
    change: dict[str, float] = field(default_factory=dict)  # mlx-lm weight name -> relative weighted change

    @classmethod
    def build(cls, snapshot: dict, fused_model, imatrix) -> "QuantGuide":
        """``snapshot`` from ``base_layers`` (taken before the adapter), ``fused_model`` after fusing."""
        guide = cls(importance=dict(imatrix.columns) if imatrix is not None else {})
        for path, fused in _weight_layers(fused_model):
            base = snapshot.get(path)
            if base is None:
                continue
            name = f"{path}.weight"
            if all(fused.get(k) is base.get(k) for k in ("weight", "scales", "biases")):
                guide.change[name] = 0.0  # the very same arrays: untouched by the fine-tune
                continue
            after, before = _float(fused), _float(base)
            if after.shape != before.shape:
                continue
            weight = guide.importance.get(name)
            if weight is None or weight.shape[0] != after.shape[1]:
                weight = np.ones(after.shape[1], np.float32)
            energy = float(np.square(after).sum(axis=0) @ weight)
            delta = float(np.square(after - before).sum(axis=0) @ weight)
            guide.change[name] = delta / energy if energy > 0 else 0.0
        return guide


def _weight_layers(model) -> list[tuple[str, object]]:
    import mlx.nn as nn

    kinds = (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding)
    return [(path, m) for path, m in model.named_modules() if isinstance(m, kinds)]


def base_layers(model) -> dict:
    """Shallow copies of every linear and embedding layer: they hold the base's weight arrays
    (MLX arrays are immutable, so nothing is copied) even after fusing or loading new weights."""
    return {path: copy.copy(m) for path, m in _weight_layers(model)}


def _float(layer) -> np.ndarray:
    import mlx.core as mx

    from macft.models.quantized import QUANTIZED, float_weight

    weight = float_weight(layer) if isinstance(layer, QUANTIZED) else layer.weight
    return np.array(weight.astype(mx.float32))
