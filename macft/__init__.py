"""macft: local fine-tuning of language models on Apple Silicon with MLX.

Importing macft loads OpenBLAS on Linux before MLX is imported, and on a CPU widens MLX's evaluation
order before its first evaluation (see ``macft.backend``).
"""

from macft.backend import load_openblas, widen_eval_order

load_openblas()
widen_eval_order()

__version__ = "0.1.0"
