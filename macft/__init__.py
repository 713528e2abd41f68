"""macft: local fine-tuning of language models on Apple Silicon with MLX.

Importing macft loads OpenBLAS on Linux before MLX is imported (see ``macft.backend``).
"""

from macft.backend import load_openblas

load_openblas()

__version__ = "0.1.0"
