"""Generation engines other than MLX: ``llamacpp`` runs the tuned model's Q8_0 GGUF export in llama.cpp.

MLX (``macft.chat``) stays the default; ``ENGINES`` lists what ``--engine`` accepts.
"""

ENGINES = ("mlx", "llama.cpp")
