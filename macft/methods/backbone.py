"""A stand-in for an mlx-lm model's body (``model.model``) for methods that add virtual tokens.

Prompt and prefix tuning change how the body is run (virtual tokens come before the input), so
they replace ``model.model`` by a subclass of ``WrappedBackbone``. The original body is kept out
of the module tree and its children (``embed_tokens``, ``layers``, ``norm``) are shared, so the
base weights are still ``model.layers.0…``, the loss's body/head split still finds
``model.model.embed_tokens`` for tied heads, and only the method's own parameters are new.
Anything else asked of the wrapper (``sliding_window``, ``args``…) is answered by the original.

Generation: ``install_cache_factory(model)`` makes ``model.make_cache()`` (which mlx-lm's
``generate``, ``stream_generate`` and ``batch_generate`` call for every new sequence) return caches
that already hold the virtual tokens, via the subclass's ``fill(cache, batch)``. Filled before
mlx-lm prepares a batch's padding, they are ordinary cache contents to it. A cache that arrives
empty anyway (built by hand) is filled on its first call.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache


class WrappedBackbone(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        # Kept off the tree: listed there, every base weight would appear under a second name.
        object.__setattr__(self, "inner", inner)
        for name, child in inner.items():
            self[name] = child
        self.enabled = True  # off inside macft.methods.adapters_disabled: the base model

    def fill(self, cache: list, batch: int) -> None:
        """Put the virtual tokens into an empty generation ``cache`` for ``batch`` sequences."""
        raise NotImplementedError

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("inner")
            if inner is None:
                raise
            return getattr(inner, name)


def install_cache_factory(model: nn.Module) -> None:
    """Give ``model`` a ``make_cache`` that returns caches holding the virtual tokens of whichever
    ``WrappedBackbone`` is its ``model.model`` at the time (plain caches when the method is switched
    off, or when the original body has been put back)."""
    base_factory = getattr(model, "make_cache", None)
    base_factory = getattr(base_factory, "base_factory", base_factory)  # installed before: its original

    def make_cache() -> list:
        cache = base_factory() if base_factory is not None else [KVCache() for _ in model.layers]
        backbone = model.model
        if isinstance(backbone, WrappedBackbone) and backbone.enabled:
            backbone.fill(cache, 1)
            mx.eval([c.state for c in cache])
        return cache

    make_cache.base_factory = base_factory
    # An instance attribute, so only this model's generation changes, not its architecture class.
    object.__setattr__(model, "make_cache", make_cache)
