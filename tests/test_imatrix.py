"""The importance matrix: mean x² per input column of every linear layer, checked against mlx-lm's
own layers run by hand, stored in the run and recomputed when the adapter changes."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from macft.data import Example
from macft.export.imatrix import Imatrix, compute_imatrix, load_imatrix, save_imatrix
from macft.models.load import load_model


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return load_model(str(tiny_models["llama"]))


def examples(tokenizer) -> list[Example]:
    texts = ["The cat sat on the mat.", "SELECT name FROM users WHERE age > 30;", "Hello", "A longer sentence, with commas, and more words in it."]
    out = []
    for text in texts:
        tokens = tokenizer.encode(text)
        out.append(Example(tokens, [False] + [True] * (len(tokens) - 1)))
    return out


def test_imatrix_matches_the_layers_inputs(tiny):
    model, data = tiny.model, examples(tiny.tokenizer)
    ids = [mx.array(e.tokens[:-1])[None] for e in data]
    before = [np.array(model(x)) for x in ids]
    imatrix = compute_imatrix(model, data, max_tokens=10_000)

    # The reference: mlx-lm's own modules, run one at a time over every example.
    body = model.model
    first = [body.layers[0].input_layernorm(body.embed_tokens(x))[0] for x in ids]
    hidden = [body(x)[0] for x in ids]

    def mean_square(rows):
        stacked = np.concatenate([np.array(r.astype(mx.float32)) for r in rows])
        return np.square(stacked).mean(axis=0)

    assert imatrix.tokens == sum(len(e.tokens) - 1 for e in data) and imatrix.examples == len(data)
    for name in ("q_proj", "k_proj", "v_proj"):
        np.testing.assert_allclose(imatrix.columns[f"model.layers.0.self_attn.{name}.weight"], mean_square(first), rtol=1e-4)
    head = "lm_head.weight" if "lm_head" in model else "model.embed_tokens.weight"
    np.testing.assert_allclose(imatrix.columns[head], mean_square(hidden), rtol=1e-4)
    linear = {f"{p}.weight": m.weight.shape[1] for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {n: v.shape[0] for n, v in imatrix.columns.items() if n in linear} == linear
    assert set(imatrix.columns) == set(linear) | {head}
    # The recording layers are gone again: the model computes what it did before.
    for x, reference in zip(ids, before):
        np.testing.assert_array_equal(np.array(model(x)), reference)


def test_imatrix_counts_a_token_budget_and_round_trips(tiny, tmp_path):
    data = examples(tiny.tokenizer)
    small = compute_imatrix(tiny.model, data, max_tokens=12)
    assert small.tokens == 12
    small.adapter_sha256 = "abc"
    back = load_imatrix(save_imatrix(small, tmp_path / "imatrix.safetensors"))
    assert isinstance(back, Imatrix) and (back.tokens, back.examples, back.adapter_sha256) == (12, small.examples, "abc")
    for name, values in small.columns.items():
        np.testing.assert_array_equal(back.columns[name], values)
