"""Full fine-tuning: every weight of the last ``method.num_layers`` transformer blocks trains
(all blocks, the embeddings and the final norm when ``num_layers`` is -1).

    model = apply_full(model, recipe.method)

There is nothing to fuse afterwards: the trained weights are the model. A quantized base cannot
be trained this way (its weights are integers); use LoRA (QLoRA) on it instead.
"""

from __future__ import annotations

from typing import Any

import mlx.nn as nn

from macft.errors import MacftError
from macft.methods.base import NUM_LAYERS, MethodSpec, adapted_layers
from macft.models.quantized import has_quantized_layers


def apply_full(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    if has_quantized_layers(model):
        raise MacftError(
            "Full fine-tuning needs a float base model, but this one is quantized; "
            "use --method lora (QLoRA) or load the model without quantization (model.dequantize: true for GGUF)."
        )
    layers = model.layers
    if cfg.num_layers == -1 or cfg.num_layers >= len(layers):
        model.unfreeze()
        return model
    model.freeze()
    for layer in layers[len(layers) - cfg.num_layers :]:
        layer.unfreeze()
    return model


def full_parameters(shape, settings: Any) -> int:
    layers = adapted_layers(shape, settings)
    # Training every layer includes the embeddings; training the last N layers does not.
    return shape.params if layers == shape.layers else layers * shape.layer_params


# Full fine-tuning overwrites a pretrained model at LoRA's rates: 1e-5 trains it, 2e-4 wrecks it in three steps.
METHODS = (
    MethodSpec(
        "full", "full fine-tuning", (NUM_LAYERS,), 1e-5, (1e-6, 5e-5), 500, full_parameters, apply_full,
        fusable=True, switchable=False,
    ),
)
