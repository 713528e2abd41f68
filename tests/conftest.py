"""Shared fixtures: every test runs with MACFT_HOME in a tmp dir, no network, on tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import macft  # noqa: E402,F401  (loads OpenBLAS before mlx is imported)
from macft.models.random_init import FAMILIES, build_random_model, family_config  # noqa: E402


def _attention_only(family: str) -> bool:
    from mlx_lm.utils import _get_classes

    from macft.data.packing import has_recurrent_blocks

    model_class, args_class = _get_classes(family_config(family, 128))
    return not has_recurrent_blocks(model_class(args_class.from_dict(family_config(family, 128))))


# Families whose every block attends over a KV cache: what prompt/prefix tuning, adapters and packing need
ATTENTION_FAMILIES = tuple(f for f in FAMILIES if _attention_only(f))


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory):
    """One macft home for the session: never the user's, and shared so the 270M GGUF is imported once."""
    home = tmp_path_factory.mktemp("macft-home")
    previous = os.environ.get("MACFT_HOME")
    os.environ["MACFT_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("MACFT_HOME", None)
    else:
        os.environ["MACFT_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer llama with a trained byte-level BPE tokenizer and a chat template."""
    return build_random_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random model directory per supported family."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_random_model(family, root / family) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family_model_dir(request, tiny_models) -> Path:
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def ggml():
    """ggml's own quantizer (``ggml_quantize_chunk`` in llama-cpp-python's libggml): the reference
    for macft's encoders. ``ggml(rows, qtype, importance=None)`` -> packed (rows, bytes per row)."""
    import ctypes

    import numpy as np
    from gguf import GGML_QUANT_SIZES

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the llama.cpp oracle) is not installed")
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*"))
    if not candidates:
        pytest.skip("libggml-base is not shipped with this llama-cpp-python build")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def reference(rows, qtype, importance=None):
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        block, size = GGML_QUANT_SIZES[qtype]
        out = np.zeros((rows.shape[0], rows.shape[1] // block * size), dtype=np.uint8)
        weights = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
        pointer = None if weights is None else weights.ctypes.data
        lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], pointer)
        return out

    return reference


@pytest.fixture(scope="session")
def peft_reference(tmp_path_factory):
    """transformers + PEFT on CPU torch in a child process (``tests/peft_reference.py``), started on first use."""
    from peft_reference import Reference

    reference = Reference(tmp_path_factory.mktemp("peft-reference") / "stderr.log")
    yield reference
    reference.close()
