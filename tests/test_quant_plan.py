"""The delta-aware quant plan: which tensors a fine-tune's changes lift above llama-quantize's types."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

from macft.export.quant_plan import SCHEMES, PlanTensor, guided_types, higher_types, relative_error, sample_rows, tensor_bytes

BITS = {t: tensor_bytes((256,), t) for t in (Q.Q4_0, Q.Q4_K, Q.Q5_0, Q.Q5_K, Q.Q5_1, Q.Q6_K, Q.Q8_0)}


def tensors(changes: list[float], width: int = 256, base: Q = Q.Q4_K) -> list[PlanTensor]:
    # The same weights for every tensor: only the fine-tune's change tells them apart.
    weights = np.random.default_rng(0).standard_normal((64, width)).astype(np.float32)
    return [PlanTensor(f"blk.{i}.ffn_up.weight", weights.shape, base, c, sample_rows(weights), None) for i, c in enumerate(changes)]


def plan_bytes(plan: list[PlanTensor], types: dict) -> int:
    return sum(tensor_bytes(t.shape, types[t.name]) for t in plan)


def test_the_most_changed_tensors_are_raised_first_within_the_budget():
    changes = [0.0, 0.001, 0.02, 0.3, 0.0, 0.05, 0.1]
    plan = tensors(changes)
    plain = {t.name: t.base for t in plan}
    for extra in (0.1, 0.3, 0.6):
        types = guided_types(plan, extra_bytes=extra)
        assert plan_bytes(plan, types) <= (1 + extra) * plan_bytes(plan, plain)
        for t in plan:
            assert BITS[types[t.name]] >= BITS[t.base]  # never below the plain type
            if t.change == 0:
                assert types[t.name] == t.base  # untouched by the fine-tune: nothing to protect
        by_change = sorted(plan, key=lambda t: t.change)
        assert [BITS[types[t.name]] for t in by_change] == sorted(BITS[types[t.name]] for t in by_change)
        assert types["blk.3.ffn_up.weight"] != Q.Q4_K  # the largest change is raised first
    assert guided_types(plan, extra_bytes=0.0) == plain


def test_upgrades_follow_the_row_length():
    assert higher_types(Q.Q4_K, 2048) == [Q.Q5_K, Q.Q6_K, Q.Q8_0]
    assert higher_types(Q.Q5_0, 640) == [Q.Q5_1, Q.Q8_0]  # 640 is no multiple of 256: no K-quant
    assert higher_types(Q.Q8_0, 640) == [] and higher_types(Q.F16, 256) == []
    plan = tensors([0.5, 0.2], width=640, base=Q.Q5_0)
    types = guided_types(plan, extra_bytes=1.0)
    assert set(types.values()) <= {Q.Q5_0, Q.Q5_1, Q.Q8_0} and types["blk.0.ffn_up.weight"] == Q.Q8_0


def test_relative_error_shrinks_with_more_bits_and_uses_the_importance():
    plan = tensors([1.0])[0]
    errors = [relative_error(plan, t) for t in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4 < errors[0] < 0.05
    # All importance on the first super-block of columns: only its error counts.
    weights = np.zeros(512, np.float32)
    weights[:256] = 1
    sample = np.concatenate([plan.sample, 1000 * plan.sample], axis=1)  # huge values where nothing is measured
    half = PlanTensor("x", sample.shape, Q.Q4_K, 1.0, sample, weights)
    assert relative_error(half, Q.Q4_K) < 1.5 * errors[0]


def test_which_types_are_guided_by_default():
    # Plain Q4_K_M and Q5_K_M lost 7-15x the F16 loss on the quickstart, plain Q6_K and Q8_0 nothing visible.
    assert {name for name, scheme in SCHEMES.items() if scheme.guided} == {"q4_0", "q4_k_m", "q5_k_m"}
