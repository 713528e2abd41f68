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
def peft_reference(tmp_path_factory):
    """transformers + PEFT on CPU torch in a child process (``tests/peft_reference.py``), started on first use."""
    from peft_reference import Reference

    reference = Reference(tmp_path_factory.mktemp("peft-reference") / "stderr.log")
    yield reference
    reference.close()
