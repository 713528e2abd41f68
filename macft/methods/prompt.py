"""Prompt tuning and P-tuning: trainable virtual tokens placed before every input.

Prompt tuning (Lester et al., 2021) learns ``num_virtual_tokens`` embedding vectors that go in front
of the input's token embeddings; P-tuning (Liu et al., 2021) produces those vectors with a small
residual MLP over trainable seed embeddings, which trains more stably. The base model stays frozen.

    model = apply_prompt_tuning(model, recipe.method, tokenizer)   # method.name "prompt" or "ptuning"
    logits = model(tokens)               # (B, L, vocab): the virtual positions are already dropped

How it is wired, so that nothing downstream needs to know: the body (``model.model``) is replaced
by a ``WrappedBackbone`` that, on every call without a cache, runs the original body with an
embedding that prepends the soft prompt and drops the virtual positions from the hidden states;
generation caches are made holding the soft prompt already. So ``model(x)``,
``model.model(x)`` followed by the output head, and mlx-lm's generation (single or batched) all see
the same prompt-tuned model. Base weights keep their names; the new ones are ``model.soft_prompt.*``.
Packed rows are refused: the soft prompt would precede only the first example of a row.

The soft prompt flows through the model exactly as token embeddings do (Gemma's sqrt(hidden)
scaling included), which is why it is initialised by copying embedding rows: the tokens of
``init_text`` repeated or cut to ``num_virtual_tokens``, or random vocabulary tokens.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from macft.errors import MacftError
from macft.methods.base import AS_ADAPTER, MethodSpec
from macft.methods.backbone import WrappedBackbone, install_cache_factory
from macft.models.attention import MaskSource
from macft.options import Option

INIT_TEXT = Option("init_text", str | None, None, "initialise the virtual tokens from this text's tokens (default: random vocabulary rows)")
VIRTUAL_TOKENS = Option(
    "num_virtual_tokens", int, 20, "trainable virtual tokens placed before every input", valid=lambda n: n >= 0, must="0 or more"
)
PTUNING_HIDDEN = Option("ptuning_hidden_size", int, 128, "width of P-tuning's residual MLP", valid=lambda n: n > 0, must="at least 1")
# A packed row holds several examples, and virtual tokens would precede only the first.
ONE_EXAMPLE_PER_ROW = "they need one example per row (virtual tokens would precede only the first example of a packed row)"


def virtual_token_ids(tokenizer, init_text: str | None, count: int, vocab_size: int, seed: int = 0) -> list[int]:
    """``count`` token ids to initialise virtual tokens from: ``init_text``'s tokens, repeated or cut to
    length, or (without text or tokenizer) ids drawn uniformly from the vocabulary."""
    if count == 0:
        return []
    if init_text and tokenizer is not None:
        ids = tokenizer.encode(init_text, add_special_tokens=False)
        if not ids:
            raise MacftError("method.init_text tokenizes to nothing; give it some words or leave it unset.")
        return [ids[i % len(ids)] for i in range(count)]
    return mx.random.randint(0, vocab_size, (count,), key=mx.random.key(seed)).tolist()


def refuse_packed(cache) -> None:
    """Virtual tokens sit before one example; a packed row holds several, so refuse it plainly."""
    if cache is not None and isinstance(cache[0], MaskSource):  # only packing hands a body mask sources
        raise MacftError(
            "Prompt, P- and prefix tuning cannot train on packed rows (the virtual tokens would precede only "
            "the first example of each row); set data.packing: false."
        )


class SoftPrompt(nn.Module):
    """Prompt tuning: the virtual token embeddings are the parameters themselves."""

    def __init__(self, init: mx.array):
        super().__init__()
        self.embeddings = init

    def __call__(self) -> mx.array:
        return self.embeddings


class PTuningEncoder(nn.Module):
    """P-tuning: prompt = seed + up(gelu(down(seed))), with ``up`` zero-initialised so the first
    prompt equals the seed (the copied embedding rows)."""

    def __init__(self, init: mx.array, hidden_size: int):
        super().__init__()
        dims = init.shape[-1]
        self.seed = init
        self.down = nn.Linear(dims, hidden_size)
        self.up = nn.Linear(hidden_size, dims)
        self.up.weight = mx.zeros_like(self.up.weight)
        self.up.bias = mx.zeros_like(self.up.bias)
        self.set_dtype(init.dtype)

    def __call__(self) -> mx.array:
        return self.seed + self.up(nn.gelu(self.down(self.seed)))


class PromptedEmbedding(nn.Module):
    """The base token embedding with the soft prompt in front of every row."""

    def __init__(self, base: nn.Module, prompt: nn.Module):
        super().__init__()
        self.base = base
        self.prompt = prompt

    def __call__(self, ids: mx.array) -> mx.array:
        soft = self.prompt()
        soft = mx.broadcast_to(soft[None], (ids.shape[0], *soft.shape))
        if ids.shape[1] == 0:  # the soft prompt alone, to fill a generation cache
            return soft
        h = self.base(ids)
        return mx.concatenate([soft.astype(h.dtype), h], axis=1)


class PromptedBackbone(WrappedBackbone):
    """Stands in for ``model.model``. Without a cache (training, scoring) it prepends the soft prompt
    and returns hidden states for the real tokens only; a generation cache already holds the soft
    prompt (see ``fill``)."""

    def __init__(self, inner: nn.Module, prompt: nn.Module, num_virtual_tokens: int):
        super().__init__(inner)
        self.soft_prompt = prompt
        self.num_virtual_tokens = num_virtual_tokens

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        if input_embeddings is not None:
            raise MacftError("A prompt-tuned model takes token ids, not input embeddings.")
        refuse_packed(cache)
        if not self.enabled:
            return self.inner(inputs, cache)
        if cache is not None:
            if cache[0].empty():
                self.fill(cache, inputs.shape[0])
            return self.inner(inputs, cache)
        hidden = self.prompted(inputs, None)
        return hidden[:, self.num_virtual_tokens :]

    def fill(self, cache: list, batch: int) -> None:
        """Run the soft prompt alone through the model into an empty ``cache``."""
        if self.num_virtual_tokens:
            self.prompted(mx.zeros((batch, 0), mx.int32), cache)

    def prompted(self, inputs: mx.array, cache) -> mx.array:
        """The original body reading the soft prompt, then ``inputs``. The prompting embedding sits in
        the body only during this call, so the body itself is never left changed (``macft chat`` can
        take the method off by putting the original ``model.model`` back)."""
        base = self.inner.embed_tokens
        self.inner.embed_tokens = PromptedEmbedding(base, self.soft_prompt)
        try:
            return self.inner(inputs, cache)
        finally:
            self.inner.embed_tokens = base


def apply_prompt_tuning(model: nn.Module, cfg: Any, tokenizer: Any = None) -> nn.Module:
    """Freeze ``model`` and give it a trainable soft prompt (``cfg.name`` "prompt" or "ptuning").

    The model is changed in place and returned; without a tokenizer ``init_text`` cannot be read and
    the prompt starts from random vocabulary rows (fine when trained weights are loaded next).
    """
    if cfg.name not in ("prompt", "ptuning"):
        raise ValueError(f"apply_prompt_tuning got method {cfg.name!r}")
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "embed_tokens"):
        raise MacftError(f"Prompt tuning needs a model with model.embed_tokens; {type(model).__name__} has none.")
    if isinstance(inner, WrappedBackbone):
        raise MacftError("This model already has a soft prompt or prefix; load the base model again to apply another.")
    model.freeze()
    embedding = inner.embed_tokens
    vocab_size = embedding.weight.shape[0]
    ids = virtual_token_ids(tokenizer, cfg.init_text, cfg.num_virtual_tokens, vocab_size)
    # Embedding one token and slicing gives the empty prompt its width and dtype (a quantized table
    # cannot look up zero rows).
    init = embedding(mx.array(ids or [0], dtype=mx.int32))[: len(ids)]
    prompt = PTuningEncoder(init, cfg.ptuning_hidden_size) if cfg.name == "ptuning" else SoftPrompt(init)
    model.model = PromptedBackbone(inner, prompt, cfg.num_virtual_tokens)
    install_cache_factory(model)
    mx.eval(model.trainable_parameters())
    return model


def prompt_parameters(shape, settings: Any) -> int:
    return settings.num_virtual_tokens * shape.hidden


def ptuning_parameters(shape, settings: Any) -> int:
    # Seed embeddings plus the residual MLP hidden -> ptuning_hidden_size -> hidden (with biases).
    h, k = shape.hidden, settings.ptuning_hidden_size
    return settings.num_virtual_tokens * h + (h * k + k) + (k * h + h)


SOFT_PROMPT = "it trains a soft prompt read before every input"
METHODS = (
    MethodSpec(
        "prompt", "prompt tuning", (VIRTUAL_TOKENS, INIT_TEXT), 3e-2, (3e-3, 3e-1), 2000, prompt_parameters, apply_prompt_tuning,
        fusable=False, not_fusable_because=f"Prompt tuning has nothing to merge into the base weights ({SOFT_PROMPT}); " + AS_ADAPTER,
        packing_refused=ONE_EXAMPLE_PER_ROW,
    ),
    MethodSpec(
        "ptuning", "P-tuning", (VIRTUAL_TOKENS, INIT_TEXT, PTUNING_HIDDEN), 1e-3, (1e-4, 1e-2), 2000, ptuning_parameters,
        apply_prompt_tuning,
        fusable=False, not_fusable_because=f"P-tuning has nothing to merge into the base weights ({SOFT_PROMPT}); " + AS_ADAPTER,
        packing_refused=ONE_EXAMPLE_PER_ROW,
    ),
)
