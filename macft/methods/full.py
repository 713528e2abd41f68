"""Full fine-tuning: every weight of the last ``method.num_layers`` transformer blocks trains
(all blocks, the embeddings and the final norm when ``num_layers`` is -1).

    model = apply_full(model, recipe.method)

There is nothing to fuse afterwards: the trained weights are the model. A quantized base cannot
be trained this way (its weights are integers); use LoRA (QLoRA) on it instead.
"""

from __future__ import annotations

import mlx.nn as nn

from macft.config import MethodConfig
from macft.errors import MacftError
from macft.models.quantized import has_quantized_layers


def apply_full(model: nn.Module, cfg: MethodConfig, tokenizer=None) -> nn.Module:
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
