"""Checks on weights as they are read: a damaged file must stop macft with one line, not train on NaNs."""

from __future__ import annotations

import math

from macft.errors import MacftError


def check_finite(weights, source) -> None:
    """Refuse weights holding NaN or inf (a damaged file), naming the first such tensor; one cheap
    reduction per float tensor (quantized weights are integers: their scales and biases are checked)."""
    import mlx.core as mx

    floats = [(name, value) for name, value in weights if mx.issubdtype(value.dtype, mx.floating)]
    # One pass and one evaluation for all tensors: a NaN or inf makes the float32 sum non-finite; a
    # finite tensor whose sum overflows is told apart by the exact check.
    sums = mx.stack([mx.sum(value.astype(mx.float32)) for _, value in floats]) if floats else mx.array([])
    for (name, value), total in zip(floats, sums.tolist()):
        if not math.isfinite(total) and not mx.all(mx.isfinite(value)).item():
            raise MacftError(f"{source}: tensor '{name}' holds NaN or infinite values; the file is damaged, so download or export it again.")
