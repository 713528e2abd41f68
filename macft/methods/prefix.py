"""Prefix tuning: trainable key/value prefixes in every attention layer.

Prefix tuning (Li & Liang, 2021) gives each attention layer ``prefix_length`` extra keys and values
that every real token can attend to, and trains only those. Here the prefix is what a KV cache
holds before the input: each layer's cache starts with its prefix (``layer.prefix``, shape
``(1, n_kv_heads, P, head_dim)``, broadcast to the batch), so mlx-lm's own attention, RoPE offsets
and causal masks treat the prefix as P earlier positions. The prefix keys are stored post-RoPE, as
cached keys always are.

    model = apply_prefix_tuning(model, recipe.method, tokenizer)
    logits = model(tokens)                 # no cache: each layer reads its prefix through PrefixCache
    mlx_lm.generate(model, tokenizer, ...) # model.make_cache() returns caches holding the prefix

The prefix starts as the keys and values the base model computes for ``init_text``'s tokens (or
random vocabulary tokens), so the untrained model behaves exactly like the base model reading that
text first; real activations train far more stably than random prefixes.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ConcatenateKVCache, RotatingKVCache, create_attention_mask

from macft.errors import MacftError
from macft.methods.backbone import WrappedBackbone, install_cache_factory
from macft.methods.base import AS_ADAPTER, MethodSpec
from macft.methods.prompt import INIT_TEXT, ONE_EXAMPLE_PER_ROW, refuse_packed, virtual_token_ids
from macft.options import Option

PREFIX_LENGTH = Option("prefix_length", int, 16, "trainable keys and values per attention layer", valid=lambda n: n > 0, must="at least 1")


class PrefixKV(nn.Module):
    """One layer's trainable prefix. It lives in the layer (``layer.prefix``) so that gradient
    checkpointing, which re-runs a layer with its own parameters, also differentiates the prefix.
    The layer itself never reads it, so with the original body put back it is inert."""

    def __init__(self, key_states: mx.array, value_states: mx.array):
        super().__init__()
        self.key_states = key_states
        self.value_states = value_states


class PrefixCache:
    """One layer's cache for a forward pass without a real cache: the prefix, then the input.

    Nothing is stored; the prefix is read when the layer attends, after a checkpointed layer has
    swapped its parameters in (see ``PrefixKV``).
    """

    def __init__(self, prefix: PrefixKV):
        self.prefix = prefix
        self.offset = prefix.key_states.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        def before(prefix: mx.array, states: mx.array) -> mx.array:
            prefix = mx.broadcast_to(prefix, (states.shape[0], *prefix.shape[1:])).astype(states.dtype)
            return mx.concatenate([prefix, states], axis=2)

        return before(self.prefix.key_states, keys), before(self.prefix.value_states, values)

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        return create_attention_mask(N, self.offset, return_array, window_size)


class PrefixedBackbone(WrappedBackbone):
    """Stands in for ``model.model``: runs the original body with every layer's cache starting with
    that layer's prefix (a ``PrefixCache`` per call without a cache; generation caches are made
    holding the prefix, see ``fill``)."""

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        refuse_packed(cache)
        if self.enabled and cache is None:
            cache = [PrefixCache(layer.prefix) for layer in self.layers]
        elif self.enabled and cache[0].empty():
            self.fill(cache, (inputs if input_embeddings is None else input_embeddings).shape[0])
        if input_embeddings is not None:
            return self.inner(inputs, cache, input_embeddings)
        return self.inner(inputs, cache)

    def fill(self, cache: list, batch: int) -> None:
        """Put every layer's prefix into its (empty) generation cache."""
        for layer_cache, layer in zip(cache, self.layers):
            k, v = layer.prefix.key_states, layer.prefix.value_states
            layer_cache.update_and_fetch(
                mx.broadcast_to(k, (batch, *k.shape[1:])), mx.broadcast_to(v, (batch, *v.shape[1:]))
            )


def base_prefix(model: nn.Module, token_ids: list[int]) -> list[PrefixKV]:
    """Per layer, the keys and values the (frozen) model caches while reading ``token_ids``."""
    caches = [ConcatenateKVCache() for _ in model.layers]
    model(mx.array([token_ids], dtype=mx.int32), cache=caches)
    prefixes = [PrefixKV(c.keys, c.values) for c in caches]
    mx.eval([p.parameters() for p in prefixes])
    return prefixes


def _check_window(model: nn.Module, length: int) -> None:
    # A sliding-window layer's generation cache keeps only the last `window` positions, so a prefix
    # that long could not stay whole there and generation would stop matching training.
    if not hasattr(model, "make_cache"):
        return
    windows = [c.max_size for c in model.make_cache() if isinstance(c, RotatingKVCache)]
    if windows and length >= min(windows):
        raise MacftError(
            f"method.prefix_length {length} does not fit this model's {min(windows)}-token sliding window; "
            f"use a prefix shorter than {min(windows)}."
        )


def apply_prefix_tuning(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    """Freeze ``model`` and give every attention layer ``cfg.prefix_length`` trainable keys and values.

    The model is changed in place and returned; without a tokenizer ``init_text`` cannot be read and
    the prefix starts from random vocabulary tokens (fine when trained weights are loaded next).
    """
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise MacftError(f"Prefix tuning needs a model with model.layers; {type(model).__name__} has none.")
    if isinstance(inner, WrappedBackbone):
        raise MacftError("This model already has a soft prompt or prefix; load the base model again to apply another.")
    _check_window(model, cfg.prefix_length)
    model.freeze()
    vocab_size = inner.embed_tokens.weight.shape[0]
    ids = virtual_token_ids(tokenizer, cfg.init_text, cfg.prefix_length, vocab_size)
    for layer, prefix in zip(inner.layers, base_prefix(model, ids)):
        layer.prefix = prefix
    model.model = PrefixedBackbone(inner)
    install_cache_factory(model)
    return model


def prefix_parameters(shape, settings: Any) -> int:
    # A key and a value prefix in every attention layer.
    return shape.layers * 2 * settings.prefix_length * shape.kv_dim


METHODS = (
    MethodSpec(
        "prefix", "prefix tuning", (PREFIX_LENGTH, INIT_TEXT), 1e-2, (1e-3, 3e-2), 2000, prefix_parameters, apply_prefix_tuning,
        fusable=False,
        not_fusable_because="Prefix tuning has nothing to merge into the base weights (it trains attention keys and values "
        "placed before every input); " + AS_ADAPTER,
        packing_refused=ONE_EXAMPLE_PER_ROW,
        block_attention=False,
    ),
)
