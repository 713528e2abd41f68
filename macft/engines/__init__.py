"""What generates text for ``chat``, ``generate`` and ``eval``: MLX (``macft.chat``, the default) or
``llamacpp``, which runs the tuned model's Q8_0 GGUF export in llama.cpp (``--engine llama.cpp``).

``OpenedModel`` is what every engine opens: a base model with its adapter applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINES = ("mlx", "llama.cpp")  # what --engine accepts


@dataclass
class OpenedModel:
    """A loaded base model with the adapter (if any) applied in place."""

    loaded: Any  # macft.models.load.LoadedModel of the base
    model: Any  # what generates: the base with the adapter applied, or the base itself
    adapter: Path | None = None
    adapter_config: dict | None = None
    warnings: list[str] = field(default_factory=list)
    # (parent, key, original module) for each base module an adapter replaced, so it can be put back
    replaced: list[tuple[Any, Any, Any]] = field(default_factory=list)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer
