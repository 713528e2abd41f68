"""Shared fixtures: every test runs with MACFT_HOME in a tmp dir, no network, on tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import macft  # noqa: E402,F401  (loads OpenBLAS before mlx is imported)
from macft.models.random_init import FAMILIES, build_random_model  # noqa: E402


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
